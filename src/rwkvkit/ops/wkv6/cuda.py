"""The RWKV-5/6 WKV operator on NVIDIA GPUs (backend ``"cuda"``).

``csrc/wkv6_cuda.cu``: a sequential scan, one thread block per (batch row,
head) and one thread per row or column of the N x N state; forward (nothing
saved), a three-pass backward and the decode step (the forward with T = 1).
RWKV-5 uses it with its constant decay broadcast over T.  Built on first use
with nvcc alone (:mod:`rwkvkit.ops.cuda_lib`) and loaded with ctypes; where it
cannot be built, one warning and the ``"torch"`` (chunked) backend.  Head
sizes 16, 32, 64, 128; others, float64 inputs and T = 0 go to the chunked
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
    lib.rwkvkit_wkv6_supports.restype = I
    lib.rwkvkit_wkv6_supports.argtypes = [I]
    lib.rwkvkit_wkv6_forward.restype = I
    lib.rwkvkit_wkv6_forward.argtypes = [I] * 5 + [P] * 9
    lib.rwkvkit_wkv6_backward.restype = I
    lib.rwkvkit_wkv6_backward.argtypes = [I] * 5 + [P] * 16
    lib.rwkvkit_cuda_error_string.restype = ctypes.c_char_p
    lib.rwkvkit_cuda_error_string.argtypes = [I]


LIBRARY = CudaLibrary("wkv6_cuda", "WKV-6", _declare)

# Tests point this at the host-C++ build of the same source; never set in normal use.
_emulation: ctypes.CDLL | None = None


def _lib(device: torch.device) -> ctypes.CDLL:
    if device.type == "cuda":
        return LIBRARY.load()
    if _emulation is not None:
        return _emulation
    raise ValueError(f"wkv6 backend 'cuda' needs CUDA tensors, got them on {device}")


def get_implementation():
    """``wkv6_cuda`` if the kernel can run here, else None (one warning if the build failed)."""
    return wkv6_cuda if LIBRARY.available() else None


def supported(r: torch.Tensor) -> bool:
    """Whether the kernel handles these inputs (else the chunked form runs)."""
    return r.dtype != torch.float64 and r.shape[-1] in HEAD_SIZES


class _WKV6Function(torch.autograd.Function):
    """r, k, v, logw contiguous of one dtype (fp32 or bf16); u fp32 [H, N]; s0 fp32 or None."""

    @staticmethod
    def forward(ctx, r, k, v, logw, u, s0):
        lib = _lib(r.device)
        B, T, H, N = r.shape
        f32 = dict(device=r.device, dtype=torch.float32)
        y = torch.empty(B, T, H, N, **f32)
        sT = torch.empty(B, H, N, N, **f32)
        code = lib.rwkvkit_wkv6_forward(
            int(r.dtype == torch.bfloat16), B, T, H, N,
            ptr(r), ptr(k), ptr(v), ptr(logw), ptr(u), ptr(s0), ptr(y), ptr(sT), stream_of(r),
        )  # fmt: skip
        check(lib, code, "WKV-6 forward")
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(r, k, v, logw, u, s0)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gsT):
        r, k, v, logw, u, s0 = ctx.saved_tensors
        lib = _lib(r.device)
        B, T, H, N = r.shape
        gy = gy.float().contiguous()
        gsT = gsT.float().contiguous()
        dr, dk, dv, dlogw = (torch.empty_like(x) for x in (r, k, v, logw))
        f32 = dict(device=r.device, dtype=torch.float32)
        du_part = torch.empty(B, H, N, **f32)
        xs = torch.empty(B, T, H, N, **f32)
        ds0 = torch.empty(B, H, N, N, **f32) if s0 is not None else None
        code = lib.rwkvkit_wkv6_backward(
            int(r.dtype == torch.bfloat16), B, T, H, N,
            ptr(r), ptr(k), ptr(v), ptr(logw), ptr(u), ptr(s0), ptr(gy), ptr(gsT),
            ptr(dr), ptr(dk), ptr(dv), ptr(dlogw), ptr(du_part), ptr(ds0), ptr(xs), stream_of(r),
        )  # fmt: skip
        check(lib, code, "WKV-6 backward")
        return dr, dk, dv, dlogw, du_part.sum(0), ds0


def wkv6_cuda(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rwkvkit.ops.wkv6.wkv6` on a GPU: same contract as the reference.

    y [B, T, H, N] and the final state are float32; differentiable in every
    input, u and the state included.  A logw broadcast over T (RWKV-5: an
    expanded view) is materialised.  Inputs the kernel does not cover
    (float64, head sizes outside 16/32/64/128, T = 0) run the chunked form.
    """
    B, T, H, N = check_inputs(r, k, v, logw, u, state)
    if r.device.type != "cuda" and _emulation is None:
        raise ValueError(f"wkv6 backend 'cuda' needs CUDA tensors, got r on {r.device}")
    if not supported(r) or T == 0:
        from .chunked import wkv6_chunked

        return wkv6_chunked(r, k, v, logw, u, state)
    xs = (r, k, v, logw)
    dt = _kernel_dtype(xs)
    dev = r.device
    r, k, v, logw = (x.to(device=dev, dtype=dt).contiguous() for x in xs)
    u = u.to(device=dev, dtype=torch.float32).contiguous()
    s0 = None if state is None else state.to(device=dev, dtype=torch.float32).contiguous()
    with _on_device(dev):
        return _WKV6Function.apply(r, k, v, logw, u, s0)


def wkv6_step_cuda(r, k, v, logw, u, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (:func:`rwkvkit.ops.wkv6.wkv6_step`'s contract) in one launch; not differentiable."""
    check_step_inputs(r, k, v, logw, u, state)
    B, H, N = r.shape
    dev = r.device
    lib = _lib(dev)
    xs = (r, k, v, logw)
    dt = _kernel_dtype(xs)
    r, k, v, logw = (x.to(dtype=dt).contiguous() for x in xs)
    u = u.to(dtype=torch.float32).contiguous()
    s0 = state.to(dtype=torch.float32).contiguous()
    y = torch.empty(B, H, N, device=dev, dtype=torch.float32)
    sT = torch.empty(B, H, N, N, device=dev, dtype=torch.float32)
    with _on_device(dev):
        code = lib.rwkvkit_wkv6_forward(
            int(dt == torch.bfloat16), B, 1, H, N,
            ptr(r), ptr(k), ptr(v), ptr(logw), ptr(u), ptr(s0), ptr(y), ptr(sT), stream_of(r),
        )  # fmt: skip
    check(lib, code, "WKV-6 step")
    return y, sT
