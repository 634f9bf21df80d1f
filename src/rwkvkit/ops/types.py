"""Shared types and input checks of the WKV operator implementations."""

from __future__ import annotations

from typing import Tuple

import torch

from ..errors import InputShapeError

# (aa, bb, pp), each [B, C], float32 (float64 in gradient checks).
WKVState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

PP_INIT = -1e30


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradient checks); everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def initial_state(B: int, C: int, dtype: torch.dtype, device) -> WKVState:
    return (
        torch.zeros(B, C, dtype=dtype, device=device),
        torch.zeros(B, C, dtype=dtype, device=device),
        torch.full((B, C), PP_INIT, dtype=dtype, device=device),
    )


def check_inputs(w, u, k, v, state) -> tuple[int, int, int]:
    if k.dim() != 3:
        raise InputShapeError(f"wkv: k must be [B, T, C], got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise InputShapeError(f"wkv: v has shape {tuple(v.shape)}, expected {tuple(k.shape)} like k")
    if w.shape != (C,) or u.shape != (C,):
        raise InputShapeError(f"wkv: w and u must be [{C}], got {tuple(w.shape)} and {tuple(u.shape)}")
    if state is not None:
        if len(state) != 3:
            raise InputShapeError("wkv: state must be a tuple (aa, bb, pp)")
        for name, s in zip(("aa", "bb", "pp"), state):
            if s.shape != (B, C):
                raise InputShapeError(f"wkv: state {name} has shape {tuple(s.shape)}, expected {(B, C)}")
    return B, T, C
