"""Input checks and dtype rules shared by the RWKV-5/6 WKV implementations."""

from __future__ import annotations

import torch

from ...errors import InputShapeError

ARG_NAMES = ("r", "k", "v", "logw")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradient checks); everything else (bf16, fp16, fp32) runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(r, k, v, logw, u, state) -> tuple[int, int, int, int]:
    """(B, T, H, N) of a sequence call; InputShapeError naming the first bad argument."""
    if r.dim() != 4:
        raise InputShapeError(f"wkv6: r must be [B, T, H, N], got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    for name, x in zip(ARG_NAMES[1:], (k, v, logw)):
        if x.shape != r.shape:
            raise InputShapeError(f"wkv6: {name} has shape {tuple(x.shape)}, expected [B, T, H, N] = {(B, T, H, N)} like r")
    if tuple(u.shape) != (H, N):
        raise InputShapeError(f"wkv6: u has shape {tuple(u.shape)}, expected [H, N] = {(H, N)}")
    if state is not None and state.shape != (B, H, N, N):
        raise InputShapeError(f"wkv6: state has shape {tuple(state.shape)}, expected [B, H, N, N] = {(B, H, N, N)}")
    return B, T, H, N


def check_step_inputs(r, k, v, logw, u, state) -> None:
    """Shapes of one decode step: four [B, H, N] vectors, u [H, N] and a [B, H, N, N] state."""
    if r.dim() != 3:
        raise InputShapeError(f"wkv6_step: r must be [B, H, N], got shape {tuple(r.shape)}")
    B, H, N = r.shape
    for name, x in zip(ARG_NAMES[1:], (k, v, logw)):
        if x.shape != r.shape:
            raise InputShapeError(f"wkv6_step: {name} has shape {tuple(x.shape)}, expected [B, H, N] = {(B, H, N)} like r")
    if tuple(u.shape) != (H, N):
        raise InputShapeError(f"wkv6_step: u has shape {tuple(u.shape)}, expected [H, N] = {(H, N)}")
    if state.shape != (B, H, N, N):
        raise InputShapeError(f"wkv6_step: state has shape {tuple(state.shape)}, expected [B, H, N, N] = {(B, H, N, N)}")
