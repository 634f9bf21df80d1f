"""The RWKV-7 WKV operator on NVIDIA GPUs (backend ``"cuda"``).

``csrc/wkv7_cuda.cu``: a sequential scan, one thread block per (batch row,
head) and one thread per row or column of the N x N state; forward, a
three-pass backward that keeps only ``sa = S a`` from the forward, and the
decode step (the forward with T = 1).  Built on first use with nvcc alone
(:mod:`rwkvkit.ops.cuda_lib`) and loaded with ctypes; where it cannot be
built, one warning and the ``"torch"`` (chunked) backend.  Head sizes 16, 32,
64, 128; others, float64 inputs (gradient checks) and T = 0 go to the chunked
form.  The maths of the backward: ``ops/wkv7/NOTES.md`` ("CUDA kernels").
"""

from __future__ import annotations

import ctypes

import torch

from ..cuda_lib import CudaLibrary, check, kernel_dtype as _kernel_dtype, on_device as _on_device, ptr, stream_of
from .types import check_inputs, check_step_inputs

HEAD_SIZES = (16, 32, 64, 128)


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.rwkvkit_wkv7_supports.restype = I
    lib.rwkvkit_wkv7_supports.argtypes = [I]
    lib.rwkvkit_wkv7_forward.restype = I
    lib.rwkvkit_wkv7_forward.argtypes = [I] * 5 + [P] * 11
    lib.rwkvkit_wkv7_backward.restype = I
    lib.rwkvkit_wkv7_backward.argtypes = [I] * 5 + [P] * 21
    lib.rwkvkit_cuda_error_string.restype = ctypes.c_char_p
    lib.rwkvkit_cuda_error_string.argtypes = [I]


LIBRARY = CudaLibrary("wkv7_cuda", "WKV-7", _declare)

# Tests point this at the host-C++ build of the same source (cuda_lib.build_emulation)
# to run the kernels' code on CPU tensors; never set in normal use.
_emulation: ctypes.CDLL | None = None


def _lib(device: torch.device) -> ctypes.CDLL:
    if device.type == "cuda":
        return LIBRARY.load()
    if _emulation is not None:
        return _emulation
    raise ValueError(f"wkv7 backend 'cuda' needs CUDA tensors, got them on {device}")


def get_implementation():
    """``wkv7_cuda`` if the kernel can run here, else None (one warning if the build failed)."""
    return wkv7_cuda if LIBRARY.available() else None


def supported(r: torch.Tensor) -> bool:
    """Whether the kernel handles these inputs (else the chunked form runs)."""
    return r.dtype != torch.float64 and r.shape[-1] in HEAD_SIZES


class _WKV7Function(torch.autograd.Function):
    """Inputs contiguous, all six of one dtype (fp32 or bf16); s0 fp32 contiguous or None."""

    @staticmethod
    def forward(ctx, r, logw, k, v, a, b, s0):
        lib = _lib(r.device)
        B, T, H, N = r.shape
        need_grad = any(ctx.needs_input_grad)
        f32 = dict(device=r.device, dtype=torch.float32)
        y = torch.empty(B, T, H, N, **f32)
        sT = torch.empty(B, H, N, N, **f32)
        sa = torch.empty(B, T, H, N, **f32) if need_grad else None
        code = lib.rwkvkit_wkv7_forward(
            int(r.dtype == torch.bfloat16), B, T, H, N,
            ptr(r), ptr(logw), ptr(k), ptr(v), ptr(a), ptr(b), ptr(s0), ptr(y), ptr(sT), ptr(sa), stream_of(r),
        )  # fmt: skip
        check(lib, code, "WKV-7 forward")
        if need_grad:
            ctx.save_for_backward(r, logw, k, v, a, b, s0, sa)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gsT):
        r, logw, k, v, a, b, s0, sa = ctx.saved_tensors
        lib = _lib(r.device)
        B, T, H, N = r.shape
        gy = gy.float().contiguous()
        gsT = gsT.float().contiguous()
        dt, dev = r.dtype, r.device
        grads = [torch.empty_like(x) for x in (r, logw, k, v, a, b)]  # dr, dlogw, dk, dv, da, db
        dr, dlogw, dk, dv, da, db = grads
        f32 = dict(device=dev, dtype=torch.float32)
        dsa = torch.empty(B, T, H, N, **f32)
        if dt == torch.float32:
            dk32, db32 = dk, db
        else:
            dk32, db32 = torch.empty(B, T, H, N, **f32), torch.empty(B, T, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32) if s0 is not None else None
        code = lib.rwkvkit_wkv7_backward(
            int(dt == torch.bfloat16), B, T, H, N,
            ptr(r), ptr(logw), ptr(k), ptr(v), ptr(a), ptr(b), ptr(s0), ptr(sa), ptr(gy), ptr(gsT),
            ptr(dr), ptr(dlogw), ptr(dk), ptr(dv), ptr(da), ptr(db), ptr(ds0), ptr(dsa), ptr(dk32), ptr(db32),
            stream_of(r),
        )  # fmt: skip
        check(lib, code, "WKV-7 backward")
        return dr, dlogw, dk, dv, da, db, ds0


def wkv7_cuda(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rwkvkit.ops.wkv7.wkv7` on a GPU: same contract as the reference.

    y [B, T, H, N] and the final state are float32; differentiable in every
    input, the state included.  Inputs the kernel does not cover (float64,
    head sizes outside 16/32/64/128, T = 0) run the chunked form.
    """
    B, T, H, N = check_inputs(r, logw, k, v, a, b, state)
    if r.device.type != "cuda" and _emulation is None:
        raise ValueError(f"wkv7 backend 'cuda' needs CUDA tensors, got r on {r.device}")
    if not supported(r) or T == 0:
        from .chunked import wkv7_chunked

        return wkv7_chunked(r, logw, k, v, a, b, state)
    xs = (r, logw, k, v, a, b)
    dt = _kernel_dtype(xs)
    dev = r.device
    r, logw, k, v, a, b = (x.to(device=dev, dtype=dt).contiguous() for x in xs)
    s0 = None if state is None else state.to(device=dev, dtype=torch.float32).contiguous()
    with _on_device(dev):
        return _WKV7Function.apply(r, logw, k, v, a, b, s0)


def wkv7_step_cuda(r, logw, k, v, a, b, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (:func:`rwkvkit.ops.wkv7.wkv7_step`'s contract) in one launch; not differentiable.

    r, ... [B, H, N], state [B, H, N, N]; returns y [B, H, N] and a new state, float32.
    """
    check_step_inputs(r, logw, k, v, a, b, state)
    B, H, N = r.shape
    dev = r.device
    lib = _lib(dev)
    xs = (r, logw, k, v, a, b)
    dt = _kernel_dtype(xs)
    r, logw, k, v, a, b = (x.to(dtype=dt).contiguous() for x in xs)
    s0 = state.to(dtype=torch.float32).contiguous()
    y = torch.empty(B, H, N, device=dev, dtype=torch.float32)
    sT = torch.empty(B, H, N, N, device=dev, dtype=torch.float32)
    with _on_device(dev):
        code = lib.rwkvkit_wkv7_forward(
            int(dt == torch.bfloat16), B, 1, H, N,
            ptr(r), ptr(logw), ptr(k), ptr(v), ptr(a), ptr(b), ptr(s0), ptr(y), ptr(sT), None, stream_of(r),
        )  # fmt: skip
    check(lib, code, "WKV-7 step")
    return y, sT
