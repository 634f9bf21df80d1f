"""The executable specification of the RWKV-4 WKV operator.

A plain loop over time running the numerically stable recurrence of the paper
(arXiv 2305.13048, appendix B; spec section 2.4).  It is slow on purpose: every
fast implementation in this package is tested against it, value, final state
and gradients.  It computes in float32, or float64 when given float64 inputs
(for `torch.autograd.gradcheck`).  Autograd differentiates through the loop.
"""

from __future__ import annotations

import torch

from .types import WKVState, check_inputs, compute_dtype, initial_state


def wkv_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
) -> tuple[torch.Tensor, WKVState]:
    """y[b, t, c] = wkv_t for every batch row and channel.

    Args:
        w: [C] log-decay per step, omega = -exp(time_decay) (<= 0).
        u: [C] bonus of the current token (time_first, used raw).
        k, v: [B, T, C] keys and values.
        state: (aa, bb, pp), each [B, C]: the carried-in numerator and
            denominator scaled by exp(-pp), and the log-scale pp.  None means an
            empty context (0, 0, -1e30).

    Returns:
        y [B, T, C] in the compute dtype, and the state after the last token.
    """
    B, T, C = check_inputs(w, u, k, v, state)
    dt = compute_dtype(k)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    aa, bb, pp = initial_state(B, C, dt, k.device) if state is None else (s.to(dt) for s in state)
    ys = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        # Output: the current token enters with the bonus u instead of a decay.
        ww = u + kt
        q = torch.maximum(pp, ww)
        e1 = torch.exp(pp - q)
        e2 = torch.exp(ww - q)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        # Update: decay the past by exp(w), add this token with weight exp(k).
        ww = pp + w
        q = torch.maximum(ww, kt)
        e1 = torch.exp(ww - q)
        e2 = torch.exp(kt - q)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = q
    y = torch.stack(ys, dim=1) if ys else k.new_zeros((B, 0, C))
    return y, (aa, bb, pp)


def wkv_closed_form(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """The T x T closed form of spec 2.2 as a per-channel causal softmax.

    An independent second statement of the operator (empty initial state only),
    O(B C T^2) memory: for tests on short sequences.
    """
    B, T, C = k.shape
    dt = compute_dtype(k)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    t_idx = torch.arange(T, device=k.device)
    dist = (t_idx[:, None] - 1 - t_idx[None, :]).to(dt)  # [T, T]: t-1-i
    # s[b, c, t, i] = (t-1-i) w + k_i for i < t, u + k_t on the diagonal.
    s = dist[None, None] * w[None, :, None, None] + k.transpose(1, 2)[:, :, None, :]
    diag = (u[None, :] + k).transpose(1, 2)  # [B, C, T]
    s = s.clone()
    s[:, :, t_idx, t_idx] = diag
    mask = t_idx[None, :] > t_idx[:, None]
    s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    y = torch.einsum("bcti,bic->btc", p, v)
    return y
