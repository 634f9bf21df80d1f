"""The executable specification of the RWKV-7 WKV operator (spec 3.4, step 9).

A plain loop over tokens, per batch row and head, with the state S[i][j]
indexed (value channel i, key channel j) as in the ``rwkv`` pip package:

    sa = S @ a                                   (the old S)
    S  = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
    y  = S @ r                                   (the new S)

It is slow on purpose: the chunked form is tested against it (outputs, final
state and every gradient, autograd through this loop).  It computes in float32,
or float64 for float64 inputs (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import torch

from .types import check_inputs, compute_dtype


def wkv7_reference(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[b, t, h] = S_t r_t with S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T.

    Args:
        r, logw, k, v, a, b: [B, T, H, N]; logw = log of the decay w (<= 0).
        state: [B, H, N, N] carried-in S (value x key), or None for zeros.

    Returns:
        y [B, T, H, N] and the state after the last token, in the compute dtype.
    """
    B, T, H, N = check_inputs(r, logw, k, v, a, b, state)
    dt = compute_dtype(r)
    r, logw, k, v, a, b = (x.to(dt) for x in (r, logw, k, v, a, b))
    S = r.new_zeros((B, H, N, N)) if state is None else state.to(dt).clone()  # never alias the caller's state
    w = torch.exp(logw)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])  # [B, H, N(value)]
        S = (
            S * w[:, t, :, None, :]
            + sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )  # [B, H, N(value), N(key)]
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros((B, 0, H, N))
    return y, S
