"""The executable specification of the RWKV-5/6 WKV operator (rwkv5-7 spec 3.2, 3.3).

A plain loop over tokens, per batch row and head, with the state S[i][j]
indexed (key channel i, value channel j) as in the ``rwkv`` pip package's
RWKV-5/6 (the transpose of its RWKV-7 orientation):

    y[j] = sum_i r[i] * (S[i][j] + u[i] * k[i] * v[j])    (the old S, plus the bonus)
    S    = diag(w) S + k v^T,    w = exp(logw)

It is slow on purpose: the chunked form is tested against it (outputs, final
state and every gradient, autograd through this loop).  It computes in float32,
or float64 for float64 inputs (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import torch

from .types import check_inputs, compute_dtype


def wkv6_reference(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T), S_t = diag(w_t) S_{t-1} + k_t v_t^T.

    Args:
        r, k, v, logw: [B, T, H, N]; logw = log of the decay w (<= 0), per
            token and key channel (RWKV-5 passes one value broadcast over T).
        u: [H, N] the bonus of the current token.
        state: [B, H, N, N] carried-in S (key x value), or None for zeros.

    Returns:
        y [B, T, H, N] and the state after the last token, in the compute dtype.
    """
    B, T, H, N = check_inputs(r, k, v, logw, u, state)
    dt = compute_dtype(r)
    r, k, v, logw, u = (x.to(dt) for x in (r, k, v, logw, u))
    S = r.new_zeros((B, H, N, N)) if state is None else state.to(dt).clone()  # never alias the caller's state
    w = torch.exp(logw)
    ys = []
    for t in range(T):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]  # [B, H, N]
        bonus = (rt * u * kt).sum(-1, keepdim=True) * vt  # [B, H, N(value)]
        ys.append(torch.einsum("bhi,bhij->bhj", rt, S) + bonus)
        S = S * w[:, t, :, :, None] + kt[..., :, None] * vt[..., None, :]  # [B, H, N(key), N(value)]
    y = torch.stack(ys, dim=1) if ys else r.new_zeros((B, 0, H, N))
    return y, S
