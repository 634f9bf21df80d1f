"""The RWKV-5/6 WKV operator in compiled C++ for the CPU (backend ``"cpu"``).

``csrc/wkv6_cpu.cpp`` (kernels in ``csrc/wkv6_cpu_kernels.h``): a sequential
scan per (batch row, head), parallel over those pairs, SIMD over the N
channels (AVX-512, AVX2 or scalar, picked at run time); forward, and a
backward that re-runs K-token segments from state checkpoints the forward
saved (the maths and the memory cost in ``NOTES.md`` beside this file).  Built
on first use through :mod:`rwkvkit._cbuild` and cached; where it cannot be
built, one warning and :func:`get_implementation` returns None (the dispatcher
then uses ``"torch"``).

fp32 math and state; fp32, bf16 or fp16 inputs are upcast (their gradients
come back in their own dtype through autograd); float64 inputs run the
chunked form.  A logw broadcast over T or B (RWKV-5's expanded view) is read
through its strides, never materialised.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from .types import check_inputs, compute_dtype

_log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SOURCES = [_CSRC / "wkv6_cpu.cpp"]  # includes wkv6_cpu_kernels.h
# -ffp-contract=fast turns a * b + c into FMAs (ISO C++ mode would not);
# no -ffast-math (nothing here needs it, and no -march=native: the source
# compiles its AVX2 and AVX-512 variants itself and picks one at run time).
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]

# The forward keeps the state before every CHECKPOINT_EVERY-th token when a
# gradient is wanted: memory N / CHECKPOINT_EVERY times y's ([B, T, H, N]
# fp32), and the backward's per-thread scratch is CHECKPOINT_EVERY states
# (512 KiB for N = 64).  Measured choice: NOTES.md, "Checkpoints".
CHECKPOINT_EVERY = 32
# Head sizes the kernel takes (the scratch grows as N^2 per state).
MAX_HEAD_SIZE = 256

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}

_builds: dict[bool, object | None] = {}
_build_seconds: float | None = None


def _build(force_fail: bool = False):
    """Compile (or load from cache) the extension; None and one warning on failure.

    ``force_fail=True`` takes the failure path without compiling (tests).
    """
    global _build_seconds
    if force_fail in _builds:
        return _builds[force_fail]
    ext = None
    try:
        if force_fail:
            raise RuntimeError("build disabled by _build(force_fail=True)")
        from ..._cbuild import build_extension

        start = time.perf_counter()
        _log.info("building (or loading the cached build of) the C++ WKV-6 kernel")
        ext = build_extension("rwkvkit_wkv6_cpu_v1", [str(x) for x in _SOURCES], _CFLAGS, "C++ WKV-6 kernel")
        _build_seconds = time.perf_counter() - start
        _log.info("C++ WKV-6 kernel ready after %.1f s", _build_seconds)
    except Exception as exc:  # any failure means: fall back, say why once
        from ..._cbuild import failure_cause

        warnings.warn(
            f"rwkvkit: could not build the C++ WKV-6 kernel ({failure_cause(exc)}); "
            "falling back to the pure-PyTorch 'torch' backend",
            RuntimeWarning,
            stacklevel=2,
        )
        ext = None
    _builds[force_fail] = ext
    return ext


def load_extension():
    """The compiled module (building it on first use), or None where it cannot be built."""
    return _build(False)


def build_seconds() -> float | None:
    """Seconds the first successful build (or cache load) took in this process."""
    return _build_seconds


def set_isa(isa: int) -> int:
    """Force the SIMD family: 0 scalar, 1 AVX2, 2 AVX-512, -1 the best this CPU has.

    Returns the family now in use (the best available where ``isa`` is not
    supported).  A head size the family's width does not divide steps down to
    a narrower one (:func:`plan`).  For tests and benchmarks.
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the C++ WKV-6 kernel is not available")
    return ext.set_isa(isa)


def plan(head_size: int) -> tuple[str, int]:
    """(family name, vectors per pass) the kernels use now for ``head_size``."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the C++ WKV-6 kernel is not available")
    isa, ch = ext.plan(head_size)
    return ISA_NAMES[isa], ch


def _unbroadcast(x: torch.Tensor) -> torch.Tensor:
    """x with every stride-0 (broadcast) dimension narrowed to size 1."""
    for d in range(x.dim()):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def _decay(logw: torch.Tensor) -> torch.Tensor:
    """w = exp(logw) with logw's broadcast over B, T, H kept as a view (the
    kernel reads it through its strides); contiguous along N (a per-head decay
    broadcast over N, RWKV-5.0/5.1's, is widened to [.., N] before the exp)."""
    base = _unbroadcast(logw)
    if base.shape[-1] != logw.shape[-1]:
        base = base.expand(*base.shape[:-1], logw.shape[-1])
    w = torch.exp(base)
    if w.stride(-1) != 1:
        w = w.contiguous()
    return w.expand(logw.shape)


class _WKV6CPU(torch.autograd.Function):
    """r, k, v contiguous fp32; logw fp32 (a broadcast view is fine); u fp32 [H, N]; s0 fp32 or None."""

    @staticmethod
    def forward(ctx, r, k, v, logw, u, s0, K):
        # K: checkpoint interval, 0 when no gradient is wanted (the caller
        # knows: inside forward, grad mode is off and needs_input_grad
        # reflects requires_grad even under torch.no_grad()).
        ext = _builds[False]
        w = _decay(logw)
        y, sT, ckpt = ext.forward(r, k, v, w, u, s0, K)
        if K:
            ctx.save_for_backward(r, k, v, w, u, ckpt)
            ctx.has_s0, ctx.K = s0 is not None, K
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gsT):
        r, k, v, w, u, ckpt = ctx.saved_tensors
        ext = _builds[False]
        dr, dk, dv, dlw, du, ds0 = ext.backward(
            r, k, v, w, u, ckpt, gy.float().contiguous(), gsT.float().contiguous(), ctx.K, ctx.has_s0
        )
        # dlw is per token: where logw was an expanded view, autograd's
        # ExpandBackward sums it over the broadcast dimensions.
        return dr, dk, dv, dlw, du.sum(0), ds0 if ctx.has_s0 else None, None


def wkv6_cpu(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rwkvkit.ops.wkv6.wkv6` in C++ on the CPU: the reference's contract.

    y [B, T, H, N] and the final state are float32 (float64 inputs, head
    sizes above :data:`MAX_HEAD_SIZE`: the chunked form, its own dtype);
    differentiable in every input, u and the state included.  The input state
    is never modified.
    """
    B, T, H, N = check_inputs(r, k, v, logw, u, state)
    for name, x in (("r", r), ("k", k), ("v", v), ("logw", logw), ("u", u), ("state", state)):
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"wkv6 backend 'cpu' needs CPU tensors, got {name} on {x.device}")
    dt = compute_dtype(r)
    if dt == torch.float64 or N > MAX_HEAD_SIZE:
        from .chunked import wkv6_chunked

        return wkv6_chunked(r, k, v, logw, u, state)
    f32 = torch.float32
    if T == 0:
        s = r.new_zeros((B, H, N, N), dtype=f32) if state is None else state.to(f32).clone()
        return r.new_zeros((B, 0, H, N), dtype=f32), s
    r, k, v = (x.to(f32).contiguous() for x in (r, k, v))
    if logw.dtype != f32:  # convert the broadcast base only, then view it at full shape again
        logw = _unbroadcast(logw).to(f32).expand(B, T, H, N)
    u = u.to(f32).contiguous()
    s0 = None if state is None else state.to(f32).contiguous()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, k, v, logw, u, s0))
    return _WKV6CPU.apply(r, k, v, logw, u, s0, CHECKPOINT_EVERY if grad else 0)


def get_implementation(force_fail: bool = False):
    """:func:`wkv6_cpu` once the extension is built, or None (after one warning)."""
    if _build(force_fail) is None:
        return None
    return wkv6_cpu
