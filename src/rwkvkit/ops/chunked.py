"""Chunked pure-PyTorch WKV ("torch" backend): parallel inside chunks, a scan across them.

Time is cut into chunks of ``chunk_size`` tokens.  Inside a chunk every output
is a masked log-sum-exp over the chunk's tokens plus one term for the state
carried in (spec 2.2 restricted to the chunk); every exponent is taken
relative to its row maximum, so nothing overflows whatever k and w are.  The
chunks' own contributions to their end state are reduced in parallel; only the
(aa, bb, pp) hand-over between chunks is a sequential loop, T / chunk_size steps
of [B, C] element-wise work.  Autograd differentiates all of it (see NOTES.md).
Runs on any device, in float32 (float64 for gradient checks), any length.
"""

from __future__ import annotations

import torch

from .types import WKVState, check_inputs, compute_dtype, initial_state

DEFAULT_CHUNK = 16

_NEG_INF = float("-inf")


def wkv_chunked(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, WKVState]:
    """The WKV operator (same contract as :func:`rwkvkit.ops.reference.wkv_reference`).

    Args:
        w, u: [C] log-decay (<= 0) and bonus.
        k, v: [B, T, C].
        state: (aa, bb, pp) each [B, C], or None for an empty context.
        chunk_size: tokens per chunk; memory and work grow as B*T*C*chunk_size.

    Returns:
        y [B, T, C] in the compute dtype and the final state.
    """
    B, T, C = check_inputs(w, u, k, v, state)
    if chunk_size < 1:
        raise ValueError(f"wkv_chunked: chunk_size must be >= 1, got {chunk_size}")
    dt = compute_dtype(k)
    dev = k.device
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    aa, bb, pp = initial_state(B, C, dt, dev) if state is None else tuple(s.to(dt) for s in state)
    if T == 0:
        return k.new_zeros((B, 0, C)), (aa, bb, pp)

    L = min(chunk_size, T)
    N = -(-T // L)  # number of chunks
    last = T - (N - 1) * L  # real tokens in the last chunk, 1..L
    pad = N * L - T
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    kc = k.view(B, N, L, C)  # [B, N, L, C]
    vc = v.view(B, N, L, C)

    pos = torch.arange(L, device=dev)
    real = torch.ones(N, L, dtype=torch.bool, device=dev)  # [N, L]: not padding
    real[N - 1, last:] = False

    # --- each chunk's own contribution to its end state (parallel over chunks) ---
    # The end of chunk n is its last real token; a token i of the chunk has
    # decayed (end - i) steps there.
    end = torch.full((N,), L - 1, device=dev)
    end[N - 1] = last - 1
    steps = (end[:, None] - pos[None, :]).to(dt)  # [N, L]
    # Masks enter as -inf in the small [.., L, C] decay term, before the big
    # add: one pass over the large tensor instead of two.
    decay_end = torch.where(real[:, :, None], steps[:, :, None] * w, _NEG_INF)  # [N, L, C]
    s_end = decay_end + kc  # [B, N, L, C]
    m_end = s_end.amax(dim=2)  # [B, N, C]; every chunk has >= 1 real token
    e_end = torch.exp(s_end - m_end[:, :, None])
    A = (e_end * vc).sum(dim=2)  # [B, N, C]: scaled numerator of the chunk alone
    Bd = e_end.sum(dim=2)  # scaled denominator

    # --- sequential hand-over of (aa, bb, pp) from chunk to chunk ---
    # pp is the max of all log-weights, as in the stable recurrence, so the
    # final state equals the reference's representation and not just its ratio.
    n_tok = (end + 1).to(dt)  # tokens per chunk
    starts_aa, starts_bb, starts_pp = [], [], []
    for n in range(N):
        starts_aa.append(aa)
        starts_bb.append(bb)
        starts_pp.append(pp)
        decayed = pp + n_tok[n] * w
        q = torch.maximum(decayed, m_end[:, n])
        e1 = torch.exp(decayed - q)
        e2 = torch.exp(m_end[:, n] - q)
        aa = e1 * aa + e2 * A[:, n]
        bb = e1 * bb + e2 * Bd[:, n]
        pp = q
    aa0 = torch.stack(starts_aa, dim=1)  # [B, N, C]: state entering each chunk
    bb0 = torch.stack(starts_bb, dim=1)
    pp0 = torch.stack(starts_pp, dim=1)

    # --- outputs (parallel over chunks) ---
    # Scores of output t on token i < t of its chunk: (t-1-i) w + k_i;
    # on itself u + k_t; on the carried state pp0 + t w.
    dist = (pos[:, None] - 1 - pos[None, :]).to(dt)  # [L(t), L(i)]
    causal = pos[None, :] < pos[:, None]  # strictly earlier tokens
    decay = torch.where(causal[:, :, None], dist[:, :, None] * w, _NEG_INF)  # [L, L, C]
    s = decay + kc[:, :, None, :, :]  # [B, N, L(t), L(i), C]
    s_diag = u + kc  # [B, N, L, C]
    s_state = pp0[:, :, None, :] + pos[:, None].to(dt) * w  # [B, N, L, C]
    # The row maximum only stabilises; y does not depend on it.
    m = torch.maximum(torch.maximum(s.amax(dim=3), s_diag), s_state).detach()
    e = torch.exp(s - m[:, :, :, None, :])  # [B, N, L, L, C]
    e_diag = torch.exp(s_diag - m)
    e_state = torch.exp(s_state - m)
    num = (e * vc[:, :, None, :, :]).sum(dim=3) + e_diag * vc + e_state * aa0[:, :, None, :]
    den = e.sum(dim=3) + e_diag + e_state * bb0[:, :, None, :]
    y = (num / den).reshape(B, N * L, C)[:, :T]
    return y, (aa, bb, pp)


def get_implementation():
    """The chunked operator; pure PyTorch, so always available."""
    return wkv_chunked
