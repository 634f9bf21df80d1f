"""The RWKV-7 WKV operator compiled for the CPU (backend ``"cpu"``).

``csrc/wkv7_cpu.cpp``: a sequential scan per (batch row, head), shared out
over the torch threads, with the N x N fp32 state kept in cache and the
per-token work vectorised over the N channels (AVX-512, AVX2 or the baseline
ISA, chosen at run time).  The forward saves ``sa = S_{t-1} a`` ([B, T, H, N]
fp32) and nothing else; the backward is two passes (the state's adjoint
backwards, the state rebuilt forwards) and gets ``dlogw`` from the scaling
identity of NOTES.md ("CPU kernel").

Built on first use through :mod:`rwkvkit._cbuild` and cached in torch's
extension folder; if the build fails, one warning and
:func:`get_implementation` returns None (the dispatcher then runs
``"torch"``, the chunked form).  float32 and bfloat16 inputs run in the kernel
(fp32 arithmetic, fp32 state); float16 and mixed inputs are upcast to
float32; float64 inputs (gradient checks), T = 0 and head sizes above
:data:`MAX_HEAD_SIZE` run the chunked form.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from .types import check_inputs

_log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "wkv7_cpu.cpp"
# No -ffast-math: the dlogw running sums rely on ordinary rounding, and the
# kernel's exp is its own.  No -march: the source compiles an AVX-512, an AVX2
# and a baseline copy of its kernels and picks one at run time.
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-tree-loop-distribute-patterns", "-fopenmp", "-Wno-psabi"]

MAX_HEAD_SIZE = 128
ISA_NAMES = ("scalar", "avx2", "avx512")  # set_isa's numbering: 0 baseline, 1 AVX2, 2 AVX-512

_builds: dict[bool, object | None] = {}
_build_seconds: float | None = None


def _build(force_fail: bool = False):
    """Compile (or load from cache) the extension; None and one warning on failure.

    ``force_fail=True`` takes the failure path without compiling (tests)."""
    global _build_seconds
    if force_fail in _builds:
        return _builds[force_fail]
    ext = None
    try:
        if force_fail:
            raise RuntimeError("build disabled by _build(force_fail=True)")
        from ..._cbuild import build_extension

        start = time.perf_counter()
        ext = build_extension("rwkvkit_wkv7_cpu_v1", [str(_SOURCE)], _CFLAGS, "C++ WKV-7 kernel")
        _build_seconds = time.perf_counter() - start
        _log.info("C++ WKV-7 kernel ready after %.1f s", _build_seconds)
    except Exception as exc:  # any failure means: fall back, say why once
        from ..._cbuild import failure_cause

        warnings.warn(
            f"rwkvkit: could not build the C++ WKV-7 kernel ({failure_cause(exc)}); "
            "falling back to the pure-PyTorch 'torch' backend",
            RuntimeWarning,
            stacklevel=2,
        )
        ext = None
    _builds[force_fail] = ext
    return ext


def load_extension():
    """The built extension module, or None (after one warning) where it cannot be built."""
    return _build(False)


def set_isa(isa: int) -> int:
    """Force a SIMD kernel family (0 baseline, 1 AVX2, 2 AVX-512; -1 the best
    this CPU has).  Returns the family now in use, which is the best available
    when ``isa`` is beyond this CPU.  For tests and benchmarks."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the C++ WKV-7 kernel is not available")
    return int(ext.set_isa(int(isa)))


def get_isa() -> int | None:
    """The kernel family in use (None: not built)."""
    ext = _builds.get(False)
    return None if ext is None else int(ext.get_isa())


def build_seconds() -> float | None:
    """Seconds the first successful build (or cache load) took in this process."""
    return _build_seconds


def supported(r: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (else the chunked form runs)."""
    return r.dtype != torch.float64 and 1 <= r.shape[-1] <= MAX_HEAD_SIZE and r.shape[1] > 0


class _WKV7Function(torch.autograd.Function):
    """r, logw, k, v, a, b contiguous, all fp32 or all bf16; s0 fp32 contiguous or None."""

    @staticmethod
    def forward(ctx, r, logw, k, v, a, b, s0):
        ext = _builds[False]
        B, T, H, N = r.shape
        need_grad = any(ctx.needs_input_grad)
        y = torch.empty(B, T, H, N, dtype=torch.float32)
        sT = torch.empty(B, H, N, N, dtype=torch.float32)
        sa = torch.empty(B, T, H, N, dtype=torch.float32) if need_grad else None
        ext.forward(
            int(r.dtype == torch.bfloat16), B, T, H, N,
            *(x.data_ptr() for x in (r, logw, k, v, a, b)),
            0 if s0 is None else s0.data_ptr(), y.data_ptr(), sT.data_ptr(), 0 if sa is None else sa.data_ptr(),
        )  # fmt: skip
        if need_grad:
            ctx.save_for_backward(r, logw, k, v, a, b, s0, sa)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gsT):
        ext = _builds[False]
        r, logw, k, v, a, b, s0, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        gy = gy.to(torch.float32).contiguous()
        gsT = gsT.to(torch.float32).contiguous()
        grads = [torch.empty_like(x) for x in (r, logw, k, v, a, b)]  # dr, dlogw, dk, dv, da, db
        ds0 = torch.empty(B, H, N, N, dtype=torch.float32) if s0 is not None else None
        ext.backward(
            int(r.dtype == torch.bfloat16), B, T, H, N,
            *(x.data_ptr() for x in (r, logw, k, v, a, b)),
            0 if s0 is None else s0.data_ptr(), sa.data_ptr(), gy.data_ptr(), gsT.data_ptr(),
            *(g.data_ptr() for g in grads), 0 if ds0 is None else ds0.data_ptr(),
        )  # fmt: skip
        return (*grads, ds0)


def wkv7_cpu(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rwkvkit.ops.wkv7.wkv7` in C++ on CPU tensors (same contract as the reference).

    y [B, T, H, N] and the final state are float32; differentiable in every
    input, the state included (gradients in the inputs' dtypes).  Inputs the
    kernel does not take (see the module docstring) run the chunked form.
    """
    B, T, H, N = check_inputs(r, logw, k, v, a, b, state)
    xs = (r, logw, k, v, a, b)
    for name, x in zip(("r", "logw", "k", "v", "a", "b", "state"), (*xs, state)):
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"wkv7 backend 'cpu' needs CPU tensors, got {name} on {x.device}")
    if not supported(r):
        from .chunked import wkv7_chunked

        return wkv7_chunked(r, logw, k, v, a, b, state)
    if _build(False) is None:
        raise RuntimeError("wkv7 backend 'cpu': the C++ kernel is not available (see the earlier warning)")
    dt = torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in xs) else torch.float32
    r, logw, k, v, a, b = (x.to(dt).contiguous() for x in xs)
    s0 = None if state is None else state.to(torch.float32).contiguous()
    return _WKV7Function.apply(r, logw, k, v, a, b, s0)


def get_implementation(force_fail: bool = False):
    """:func:`wkv7_cpu` once the extension is built, or None (after one warning)."""
    if _build(force_fail) is None:
        return None
    return wkv7_cpu
