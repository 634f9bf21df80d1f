"""Chunked RWKV-7 WKV ("torch" backend): the WY/UT form of spec 6.2.

Time is cut into chunks of ``chunk_size`` tokens.  Everything that depends
only on a chunk's own tokens is computed for all chunks at once (batched
matmuls and one triangular solve); what is left sequential is one
``S <- S M_n + C_n`` per chunk, an [N, N] x [N, N] product, so the Python loop
runs T / chunk_size times instead of T times.  The derivation, the numerics and
measured accuracy are in NOTES.md next to this file.

The intra-chunk decays gamma_t / gamma_s (s <= t, at most 1) are evaluated in
one of two ways, both exact in exact arithmetic:

- factorised (the default whenever it is safe): gamma_t * (1 / gamma_s) as two
  batched matmuls.  1 / gamma_s grows like exp(-sum of logw over the chunk);
  the model's clamp (logw >= -0.6066) keeps it below e^39 even for chunks of
  64, and the call checks every chunk's total log-decay against
  ``_FACTOR_LIMIT`` (one host sync) before taking this path.
- pairwise: exp(g_t - g_s) from the difference of the cumulative log-decay, so
  no exponent is positive, for any logw <= 0 (extreme decays beyond the
  limit).  The price is [.., chunk, chunk, N] intermediates, several times
  slower.

All other exponentials (gamma_t, gamma_{t-1}, gamma_L / gamma_s) have
exponents <= 0.

Autograd differentiates all of it.  Memory kept for the backward, per call:
about a dozen [B, H, T, N]-sized tensors, the [B, H, T, chunk] score matrices
and the state entering each chunk, B*H*(T/chunk_size)*N*N floats (for
N = 64 and chunks of 32, the states alone are 2x the size of one input); the
pairwise path adds several B*H*T*chunk_size*N tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import check_inputs, compute_dtype

DEFAULT_CHUNK = 32  # measured fastest on CPU of 16/32/64 (NOTES.md)

# The factorised scores use exp(-g_s) <= exp(limit): e^60 ~ 1e26 leaves float32
# (max 3e38) twelve orders of magnitude for the products with a, b, k, r and
# their gradients; exp(g) >= e^-60 is still a normal float32 (min 1e-38), so
# no factor underflows either.  float64 affords e^600.
_FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
# CPU: elements of one [B, T, heads, N] group per call (2^17 floats = 512 KiB).
_GROUP_ELEMENTS = 1 << 17


def _scores_factorised(rg, ag, g, bk):
    """The four score matrices as two batched matmuls around the chunk start:
    gamma_t / gamma_s = gamma_t * (1 / gamma_s).  Exact while 1 / gamma_s is
    finite and far from overflow (the caller checks the chunk's total decay);
    the entries above the diagonal (s > t, not part of the form, up to
    e^limit) are masked to zero after the product."""
    L = g.shape[1]
    X, L, N = g.shape
    inv = torch.neg(g).exp_()  # 1 / gamma_s >= 1 (exp_ in place: one allocation, not two)
    right = (bk.view(X, 2, L, N) * inv[:, None]).view(X, 2 * L, N)  # [X, 2L(s), N]: b and k times 1 / gamma_s
    left = torch.cat((rg, ag), dim=1)  # [X, 2L(t), N]
    A = left @ right.transpose(1, 2)  # [X, 2L, 2L]
    # tril keeps s <= t, tril(-1) s < t (one pass each, cheaper than a masked where).
    A_rb = A[:, :L, :L].tril()
    A_rk = A[:, :L, L:].tril()
    A_ab = A[:, L:, :L].tril(-1)
    A_ak = A[:, L:, L:].tril(-1)
    return A_rb, A_rk, A_ab, A_ak


def _scores_pairwise(r, a, g, gp, b, k):
    """The four score matrices with every decay exp(g_t - g_s) evaluated from
    the pairwise difference (s <= t, exponent <= 0): correct for any logw <= 0,
    at the cost of [X, L, L, N] intermediates (several times slower)."""
    L = g.shape[1]
    pos = torch.arange(L, device=g.device)
    incl = (pos[None, :] <= pos[:, None])[None, :, :, None]  # [1, L(t), L(s), 1]: s <= t
    strict = (pos[None, :] < pos[:, None])[None, :, :, None]  # s < t
    # Masked to -inf *before* exp: exp of the (positive) upper-triangle
    # differences could overflow, and inf * 0 poisons gradients.
    e_r = torch.exp(torch.where(incl, g[:, :, None] - g[:, None], float("-inf")))  # [X, L, L, N]: gamma_t / gamma_s
    e_a = torch.exp(torch.where(strict, gp[:, :, None] - g[:, None], float("-inf")))  # gamma_{t-1} / gamma_s
    bk = torch.stack((b, k), dim=1)  # [X, 2, L, N]
    ra = (r[:, :, None] * e_r).unsqueeze(1)  # [X, 1, L, L, N]
    aa = (a[:, :, None] * e_a).unsqueeze(1)
    A_rb, A_rk = (ra * bk[:, :, None]).sum(-1).unbind(1)  # each [X, L, L]
    A_ab, A_ak = (aa * bk[:, :, None]).sum(-1).unbind(1)
    return A_rb, A_rk, A_ab, A_ak


def wkv7_chunked(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    factorised: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RWKV-7 WKV operator (same contract as :func:`.reference.wkv7_reference`).

    Args:
        r, logw, k, v, a, b: [B, T, H, N]; logw <= 0.
        state: [B, H, N, N] (value x key) or None for zeros; never modified.
        chunk_size: tokens per chunk; work inside a chunk grows as chunk_size^2.
        factorised: how the intra-chunk decays are evaluated (see the module
            docstring): None picks the factorised matmuls when every chunk's
            total log-decay is above -_FACTOR_LIMIT (always true for the
            model's decays) and the pairwise form otherwise; True/False force
            one (tests).  Forcing True beyond the limit can overflow.

    Returns:
        y [B, T, H, N] and the final state [B, H, N, N], in the compute dtype.
    """
    B, T, H, N = check_inputs(r, logw, k, v, a, b, state)
    if chunk_size < 1:
        raise ValueError(f"wkv7_chunked: chunk_size must be >= 1, got {chunk_size}")
    dt = compute_dtype(r)
    dev = r.device
    S = r.new_zeros((B, H, N, N), dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros((B, 0, H, N), dtype=dt), S.clone()  # never alias the caller's state
    # Heads are independent.  On the CPU the time goes into writing and reading
    # the dozen [X, L, N]-sized temporaries, so long inputs run in groups of
    # heads small enough for those to stay in cache (B=1, T=512, H=12, N=64:
    # groups of 4 heads, 15.3 ms a call instead of 17-20 ms); bit-identical.
    G = max(1, _GROUP_ELEMENTS // (B * T * N))
    if r.device.type == "cpu" and G < H:
        parts = [
            wkv7_chunked(*(x[:, :, h : h + G] for x in (r, logw, k, v, a, b)), S[:, h : h + G], chunk_size, factorised)
            for h in range(0, H, G)
        ]
        return torch.cat([y for y, _ in parts], dim=2), torch.cat([s for _, s in parts], dim=1)

    L = min(chunk_size, T)
    NC = -(-T // L)  # number of chunks
    pad = NC * L - T
    X = B * H * NC  # independent (batch, head, chunk) blocks

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, N] -> [X, L, N].  Padding tokens are zeros everywhere, logw
        # included: w = 1, a = b = k = v = 0 make them identity steps, so they
        # change neither the state nor any real output (no artefacts).
        x = x.to(dt).transpose(1, 2)  # [B, H, T, N]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(X, L, N)

    r, logw, k, v, a, b = (blocks(x) for x in (r, logw, k, v, a, b))
    bk = torch.cat((b, k), dim=1)  # [X, 2L, N]: b and k are always scaled alike, so in one tensor

    # g[t] = sum_{m <= t} logw[m] (inclusive), gp[t] = g[t-1] (exclusive; the
    # same stored partial sums shifted, so gp[t] - g[t-1] is exactly 0).
    g = torch.cumsum(logw, dim=1)  # [X, L, N]
    gp = F.pad(g[:, :-1], (0, 0, 1, 0))
    g_end = g[:, -1]  # [X, N]: log of the decay over the whole chunk

    # Intra-chunk score matrices [X, L(t), L(s)]:
    #   A_ab[t, s] = sum_j a_t[j] b_s[j] gamma_{t-1}[j] / gamma_s[j]   (s < t)
    #   A_ak likewise with k; A_rb, A_rk with r_t and gamma_t (s <= t).
    rg = r * torch.exp(g)  # rows r_t * gamma_t      (exponents <= 0)
    ag = a * torch.exp(gp)  # rows a_t * gamma_{t-1}
    if factorised is None:
        factorised = bool(-g_end.min() <= _FACTOR_LIMIT[dt]) if X else True
    if factorised:
        A_rb, A_rk, A_ab, A_ak = _scores_factorised(rg, ag, g, bk)
    else:
        A_rb, A_rk, A_ab, A_ak = _scores_pairwise(r, a, g, gp, b, k)

    # The in-chunk "removal" vectors u_t = S_{t-1} a_t (rows of U) solve
    #   (I - A_ab) U = A_ak V + (a * gamma_{t-1}) S_0^T.
    # Solve both right-hand sides at once: U = P + Q S_0^T.
    rhs = torch.cat((A_ak @ v, ag), dim=-1)  # [X, L, 2N]
    PQ = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)  # diagonal read as 1
    P, Q = PQ[..., :N], PQ[..., N:]  # [X, L, N(value)], [X, L, N(key)]

    # Chunk end: S_end = S_0 diag(gamma_L) + U^T (B * gamma_L / gamma) + V^T (K * gamma_L / gamma)
    #                  = S_0 M + C  with  M = diag(gamma_L) + Q^T B^,  C = P^T B^ + V^T K^.
    c = (g_end[:, None] - g).exp_()  # [X, L, N], exponent <= 0
    bkh = (bk.view(X, 2, L, N) * c[:, None]).view(X, 2 * L, N)  # b and k times gamma_L / gamma
    bh = bkh[:, :L]
    M = Q.transpose(1, 2) @ bh  # [X, N(key), N(key)]
    M.diagonal(dim1=1, dim2=2).add_(torch.exp(g_end))  # + diag(gamma_L), in place (no [X, N, N] diag_embed)
    Pv = torch.cat((P, v), dim=1)  # [X, 2L, N(value)]
    C = Pv.transpose(1, 2) @ bkh  # [X, N(value), N(key)]

    # Outputs: Y = (R * Gamma) S_0^T + A_rb U + A_rk V = Rt S_0^T + Y_loc.
    Rt = torch.baddbmm(rg, A_rb, Q)  # [X, L, N(key)]
    Y_loc = torch.cat((A_rb, A_rk), dim=-1) @ Pv  # [X, L, N(value)]

    # The only sequential part: the state entering each chunk.
    M = M.view(B * H, NC, N, N)
    C = C.view(B * H, NC, N, N)
    S = S.reshape(B * H, N, N)
    starts = []
    for n in range(NC):
        starts.append(S)
        S = torch.baddbmm(C[:, n], S, M[:, n])
    S0 = torch.stack(starts, dim=1).view(X, N, N)  # [X, N(value), N(key)]

    y = torch.baddbmm(Y_loc, Rt, S0.transpose(1, 2))  # [X, L, N(value)]
    y = y.view(B, H, NC * L, N)[:, :, :T].transpose(1, 2)  # [B, T, H, N]
    return y, S.view(B, H, N, N)


def get_implementation():
    """The chunked operator; pure PyTorch, so always available."""
    return wkv7_chunked
