"""Compiled C++ WKV for the CPU ("cpu" backend): forward and backward scans.

The extension (``csrc/wkv_cpu.cpp``) is built on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extension folder, so
only the first process on a machine pays the compile (tens of seconds).  If it
cannot be built (no compiler, no ninja, no headers), one warning names the
cause and :func:`get_implementation` returns None: the dispatcher then uses
the pure-PyTorch ``"torch"`` backend.  float32 and float64 run natively.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from .types import WKVState, check_inputs, compute_dtype, initial_state

_log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "wkv_cpu.cpp"]  # includes wkv_cpu_kernels.h
# -ffast-math is what lets GCC call glibc's vector exp (libmvec) in the inner
# loop; the kernel never relies on inf/NaN (the empty state is pp = -1e30).
# It is a compile flag only: linking with it would pull in crtfastmath, which
# flips the whole process to flush-to-zero.  No -march=native: the build cache
# may be shared by machines with different CPUs; the source compiles an AVX2
# variant of its loops itself and picks it at run time.
_CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]

# force_fail -> built module or None; one entry per process and flag.
_builds: dict[bool, object | None] = {}
_build_seconds: float | None = None


def _build(force_fail: bool = False):
    """Compile (or load from cache) the extension; None and one warning on failure.

    ``force_fail=True`` takes the failure path without compiling, so tests can
    check the fallback on a machine that does have a compiler.
    """
    global _build_seconds
    if force_fail in _builds:
        return _builds[force_fail]
    ext = None
    try:
        if force_fail:
            raise RuntimeError("build disabled by _build(force_fail=True)")
        from .._cbuild import build_extension

        start = time.perf_counter()
        _log.info("building (or loading the cached build of) the C++ WKV kernel")
        ext = build_extension("rwkvkit_wkv_cpu_v1", [str(x) for x in _SOURCES], _CFLAGS, "C++ WKV kernel")
        _build_seconds = time.perf_counter() - start
        _log.info("C++ WKV kernel ready after %.1f s", _build_seconds)
    except Exception as exc:  # any failure means: fall back, say why once
        warnings.warn(
            f"rwkvkit: could not build the C++ WKV kernel ({_cause(exc)}); "
            "falling back to the pure-PyTorch 'torch' backend",
            RuntimeWarning,
            stacklevel=2,
        )
        ext = None
    _builds[force_fail] = ext
    return ext


def _cause(exc: BaseException) -> str:
    from .._cbuild import failure_cause

    return failure_cause(exc)


def uses_avx2() -> bool | None:
    """Whether the AVX2 variant of the kernels runs here (None: not built)."""
    ext = _builds.get(False)
    return None if ext is None else bool(ext.uses_avx2())


def build_seconds() -> float | None:
    """Seconds the first successful build (or cache load) took in this process."""
    return _build_seconds


class _WKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        ext = _builds[False]
        y, aa_o, bb_o, pp_o = ext.forward(w, u, k, v, aa, bb, pp)
        ctx.save_for_backward(w, u, k, v, aa, bb, pp)
        return y, aa_o, bb_o, pp_o

    @staticmethod
    def backward(ctx, gy, gaa, gbb, gpp):
        w, u, k, v, aa, bb, pp = ctx.saved_tensors
        ext = _builds[False]
        gw, gu, gk, gv, ga, gb, gp = ext.backward(
            w, u, k, v, aa, bb, pp,
            gy.contiguous(), gaa.contiguous(), gbb.contiguous(), gpp.contiguous(),
        )
        # u and w are shared by the batch rows: the kernel leaves [B, C] partials.
        return gw.sum(0), gu.sum(0), gk, gv, ga, gb, gp


def wkv_cpu(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
) -> tuple[torch.Tensor, WKVState]:
    """The WKV operator (contract of :func:`rwkvkit.ops.reference.wkv_reference`) in C++."""
    B, T, C = check_inputs(w, u, k, v, state)
    dt = compute_dtype(k)
    if k.device.type != "cpu":
        raise ValueError(f"wkv_cpu: tensors must be on the CPU, got {k.device}")
    w, u, k, v = (x.to(dt).contiguous() for x in (w, u, k, v))
    if state is None:
        state = initial_state(B, C, dt, k.device)
    aa, bb, pp = (s.to(dt).contiguous() for s in state)
    if T == 0:
        return k.new_zeros((B, 0, C)), (aa, bb, pp)
    y, aa, bb, pp = _WKVFunction.apply(w, u, k, v, aa, bb, pp)
    return y, (aa, bb, pp)


def get_implementation(force_fail: bool = False):
    """:func:`wkv_cpu` once the extension is built, or None (after one warning)."""
    if _build(force_fail) is None:
        return None
    return wkv_cpu
