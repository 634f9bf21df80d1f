"""The RWKV-5/6 ("Eagle"/"Finch") WKV operator: one signature, two implementations.

``wkv6(r, k, v, logw, u, state=None) -> (y, new_state)`` with r, k, v, logw
[B, T, H, N], u [H, N] and state [B, H, N, N] (S[i][j]: i = key channel, j =
value channel, the ``rwkv`` pip package's RWKV-5/6 orientation; RWKV-7's is
the transpose).  Per head and token (spec 3.2 step 4, 3.3 step 6):

    y_t[j] = sum_i r_t[i] (S[i][j] + u[i] k_t[i] v_t[j]),
    S <- diag(w_t) S + k_t v_t^T,   w_t = exp(logw_t).

RWKV-6 passes its per-token decay logw = -exp(d_t); RWKV-5 the constant
-exp(time_decay) broadcast over T (a 5.0/5.1 per-head decay broadcast over N
too).  The log-decay is what the chunked form needs, and -exp(d) never takes
the log of an underflowed w.  y and the state are float32 (float64 for
float64 inputs); bf16/fp16 inputs are computed in float32.  The input state is
never modified; gradients reach every input, u and the state included.

Backends:

- ``"reference"``: :mod:`.reference`, the per-token loop; the spec, slow.
- ``"torch"``: :mod:`.chunked`, the sub-chunked form (spec 6.1), stable for
  any logw <= 0; any device, autograd backward.
- ``"auto"``: ``"torch"``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .chunked import DEFAULT_CHUNK, DEFAULT_SUB_CHUNK, wkv6_chunked
from .reference import wkv6_reference
from .types import check_step_inputs, compute_dtype

BACKENDS = ("auto", "reference", "torch")

_IMPLS: dict[str, Callable] = {"reference": wkv6_reference, "torch": wkv6_chunked}


def resolve_backend(backend: str) -> str:
    """Which implementation ``backend`` means ("auto" is the chunked form)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown WKV6 backend {backend!r}; expected one of {BACKENDS}")
    return "torch" if backend == "auto" else backend


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the RWKV-5/6 WKV operator over a sequence (see the module docstring)."""
    return _IMPLS[resolve_backend(backend)](r, k, v, logw, u, state)


def wkv6_step(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token on [B, H, N] tensors, u [H, N], a [B, H, N, N] state: the decode path.

    Differentiable; returns y [B, H, N] (from the old state plus the bonus)
    and the new state (a new tensor).
    """
    check_step_inputs(r, k, v, logw, u, state)
    dt = compute_dtype(r)
    r, k, v, logw, u, state = (x.to(dt) for x in (r, k, v, logw, u, state))  # no-ops in fp32
    bonus = (r * u * k).sum(-1, keepdim=True)  # [B, H, 1]
    y = torch.addcmul((r.unsqueeze(-2) @ state).squeeze(-2), bonus, v)
    S = torch.addcmul(state * torch.exp(logw).unsqueeze(-1), k.unsqueeze(-1), v.unsqueeze(-2))
    return y, S


__all__ = [
    "wkv6",
    "wkv6_step",
    "wkv6_reference",
    "wkv6_chunked",
    "resolve_backend",
    "BACKENDS",
    "DEFAULT_CHUNK",
    "DEFAULT_SUB_CHUNK",
]
