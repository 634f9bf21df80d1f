"""Chunked RWKV-5/6 WKV ("torch" backend): the GLA form of rwkv5-7 spec 6.1,
with sub-chunks so that no exponential ever has a positive exponent.

Time is cut into chunks of ``chunk_size`` tokens, each cut into sub-chunks of
``sub_chunk`` tokens.  Per head, with lambda_t = logw_t (<= 0, per key
channel), b_t = sum_{m <= t} lambda_m inside the chunk (inclusive),
c_t = b_{t-1} (exclusive, c_1 = 0) and S_0 the state entering the chunk:

    y_t   = sum_{s < t} A[t, s] v_s + (r_t . u . k_t) v_t + (r_t * e^{c_t})^T S_0
    A[t, s] = sum_i r_t[i] k_s[i] exp(c_t[i] - b_s[i])                   (s < t)
    S_end = diag(e^{b_L}) S_0 + sum_s (k_s * e^{b_L - b_s}) v_s^T

Every exponent above is <= 0.  The tempting factorisation
A = (r e^c)(k e^{-b})^T overflows float32 as soon as a chunk's total decay
passes ~88 nats (RWKV-6 per-token decays reach -20 and below), so A is built
in two parts that never form e^{-b} alone:

- within a sub-chunk: pairwise, one diagonal d = t - s at a time, the
  exponent of each pair grown from the previous diagonal's by one log-decay
  ([.., Ls - d, N] intermediates, never a [.., Ls, Ls, N] tensor), in a
  custom autograd function with a written-out backward (:class:`_DiagonalBlocks`);
- query sub-chunk p against an earlier key sub-chunk q: factorised at the
  start of p: (r_t e^{c_t - c_p0}) . (k_s e^{c_p0 - b_s}), where c_p0 is the
  decay accumulated before p; the key factor is the product of e^{sl_s}
  (after s to the end of q) and e^{sum of the sub-chunks between}, every
  factor <= 1, and a factor that underflows only does so where the exact
  product is smaller still.  One batched matmul pair per query sub-chunk.

Performance (benchmarks/bench_wkv6_cpu.py): the first version built the
sub-block exponents as [X, nS, Ls, Ls, N] tensors and was no faster than the
loop at T = 512; per-diagonal exponents, products of factors instead of exps
of sums, a loop over query sub-chunks instead of masked [p, q] tensors and
``unbind`` in the state carry (a select's backward fills a C-sized zero
tensor per chunk) made it several times faster forward and ~10x with the
backward; the written-out backward of the diagonal blocks took another
10-15% off forward+backward.  Chunks of 32 with sub-chunks of 8 measured fastest of 16..128 x
4..16 on CPU.

Every exponent is evaluated as a direct sum of the log-decays of its range
(in-sub-chunk prefix and suffix sums, sub-chunk totals, and a running sum
along each diagonal for the pairs inside a sub-chunk), never as the difference of two prefix sums
from the chunk start: that difference loses eps * |prefix| absolutely, a
relative error of 1e-4 in a decay once a chunk holds ~1000 nats of decay.  So
the fp32 result is as accurate as the fp32 recurrence (tests: ~1e-7 of
max |y| for decays from 1 - 1e-4 to e^-400).

What is left sequential is S <- diag(e^{b_L}) S + C_n, once per chunk.
Autograd differentiates the rest (no exponent is ever positive, and the
unused (q >= p) entries of the between-sub-chunk decays are exp(0), so no
inf * 0 reaches a gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import check_inputs, compute_dtype

DEFAULT_CHUNK = 32  # with sub-chunks of 8: fastest of 16/32/64/128 x 4/8/16 on CPU (module docstring)
DEFAULT_SUB_CHUNK = 8


def _diagonal_exponents(lw: torch.Tensor):
    """Yield (d, e_d) for d = 1 .. Ls - 1: e_d[j] = exp(sum_{j < m < j + d} lw_m)
    over j < Ls - d ([.., Ls - d, N]; None for d = 1, where the range is empty),
    each exponent grown from the previous one by one log-decay (a direct sum)."""
    Ls = lw.shape[2]
    E = None
    for d in range(1, Ls):
        if d == 1:
            yield d, None
            continue
        E = lw[:, :, 1 : Ls - 1] if d == 2 else E[:, :, : Ls - d] + lw[:, :, d - 1 : Ls - 1]
        yield d, torch.exp(E)


class _DiagonalBlocks(torch.autograd.Function):
    """The diagonal sub-blocks A_d [X, nS, Ls, Ls] of the intra-chunk scores:
    A_d[t, t] = r_t . u . k_t (the bonus) and, for s < t,
    A_d[t, s] = sum_i r_t[i] k_s[i] exp(sum_{s < m < t} lw_m[i]),
    built one diagonal d = t - s at a time, so nothing larger than the inputs
    is formed.  The backward is written out (autograd through the per-diagonal
    slices would allocate and fill an input-sized zero tensor for each slice):

        dr_t += g e k_s,  dk_s += g e r_t,  du += sum g_tt r_t k_t,
        dlw_m += sum over the pairs (t, s) with s < m < t of g r_t k_s e,

    the last through a difference array (+ at s + 1, - at t) and one cumsum.
    """

    @staticmethod
    def forward(ctx, r, k, lw, u):
        ctx.save_for_backward(r, k, lw, u)
        Ls = r.shape[2]
        A = r.new_zeros(r.shape[:2] + (Ls, Ls))
        A.diagonal(dim1=2, dim2=3).copy_((r * u * k).sum(-1))
        for d, e in _diagonal_exponents(lw):
            p = r[:, :, d:] * k[:, :, : Ls - d]
            if e is not None:
                p.mul_(e)
            A.diagonal(offset=-d, dim1=2, dim2=3).copy_(p.sum(-1))
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA):
        r, k, lw, u = ctx.saved_tensors
        Ls = r.shape[2]
        g0 = gA.diagonal(dim1=2, dim2=3).unsqueeze(-1)  # [X, nS, Ls, 1]
        gu = g0 * r
        dk = gu * u
        du = (gu * k).sum((1, 2), keepdim=True)
        dr = g0 * u * k
        dif = torch.zeros_like(lw)  # dlw as a difference array over the sub-chunk positions
        for d, e in _diagonal_exponents(lw):
            g = gA.diagonal(offset=-d, dim1=2, dim2=3).unsqueeze(-1)  # [X, nS, Ls - d, 1]
            rt, ks = r[:, :, d:], k[:, :, : Ls - d]
            w = g if e is None else g * e
            dr[:, :, d:].addcmul_(w, ks)
            dk[:, :, : Ls - d].addcmul_(w, rt)
            if d > 1:
                q = w * rt * ks  # the pair's share of d(exponent)
                dif[:, :, 1 : Ls - d + 1].add_(q)
                dif[:, :, d:].sub_(q)
        dlw = torch.cumsum(dif, dim=2) if Ls > 2 else dif
        return dr, dk, dlw, du


def wkv6_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    sub_chunk: int = DEFAULT_SUB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RWKV-5/6 WKV operator (same contract as :func:`.reference.wkv6_reference`).

    Args:
        r, k, v, logw: [B, T, H, N]; logw <= 0 (any magnitude).
        u: [H, N] bonus.
        state: [B, H, N, N] (key x value) or None for zeros; never modified.
        chunk_size: tokens per chunk (rounded down to a multiple of sub_chunk).
        sub_chunk: tokens per pairwise sub-block (one loop step per diagonal).

    Returns:
        y [B, T, H, N] and the final state [B, H, N, N], in the compute dtype.
    """
    B, T, H, N = check_inputs(r, k, v, logw, u, state)
    if chunk_size < 1 or sub_chunk < 1:
        raise ValueError(f"wkv6_chunked: chunk_size and sub_chunk must be >= 1, got {chunk_size}, {sub_chunk}")
    dt = compute_dtype(r)
    S = r.new_zeros((B, H, N, N), dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros((B, 0, H, N), dtype=dt), S.clone()  # never alias the caller's state

    Ls = min(sub_chunk, T)
    nS = max(1, min(chunk_size, -(-T // Ls) * Ls) // Ls)  # sub-chunks per chunk
    L = nS * Ls
    NC = -(-T // L)
    pad = NC * L - T
    X = B * H * NC

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, N] -> [X, L, N]; padding tokens are zeros everywhere (logw
        # included: w = 1, k = v = 0), identity steps that change nothing real.
        x = x.to(dt).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(X, L, N)

    r, k, v, logw = (blocks(x) for x in (r, k, v, logw))

    # Every exponent below is a sum of log-decays over a range of tokens,
    # formed as a direct sum of non-positive terms (never as the difference of
    # two long prefix sums, which would lose eps * |prefix| in absolute terms:
    # 1e-4 of relative error in a decay for prefixes of ~1000 nats).
    lw = logw.view(X, nS, Ls, N)
    rs, ks = r.view(X, nS, Ls, N), k.view(X, nS, Ls, N)
    bl = torch.cumsum(lw, dim=2)  # in-sub-chunk inclusive prefix
    tot = bl[:, :, -1]  # [X, nS, N]: each sub-chunk's total
    cl = F.pad(bl[:, :, :-1], (0, 0, 1, 0))  # in-sub-chunk exclusive prefix (same partial sums)
    sl = F.pad(torch.flip(torch.cumsum(torch.flip(lw[:, :, 1:], (2,)), dim=2), (2,)), (0, 0, 0, 1))  # exclusive suffix
    # Every decay factor below is a product of factors <= 1, each the exp of
    # a direct range sum: exp(cl_t) (sub-chunk start to before t), exp(sl_s)
    # (after s to the sub-chunk end), and per-sub-chunk totals.
    qf = rs * torch.exp(cl)  # [X, nS, Ls, N]
    kf = ks * torch.exp(sl)
    if nS > 1:
        tot_before = F.pad(torch.cumsum(tot[:, :-1], dim=1), (0, 0, 1, 0))  # sub-chunks before p
        tot_after = F.pad(torch.flip(torch.cumsum(torch.flip(tot[:, 1:], (1,)), dim=1), (1,)), (0, 0, 0, 1))  # after q
        rq = (qf * torch.exp(tot_before)[:, :, None]).view(X, L, N)  # r_t * decay from the chunk start to before t
        kh = (kf * torch.exp(tot_after)[:, :, None]).view(X, L, N)  # k_s * decay from after s to the chunk end
        chunk_total = tot_before[:, -1] + tot[:, -1]  # [X, N]
    else:
        rq, kh, chunk_total = qf.view(X, L, N), kf.view(X, L, N), tot[:, 0]

    # Diagonal sub-blocks, one diagonal d = t - s at a time: the exponent of
    # the pair (j + d, j) is E_d[j] = sum_{j < m < j + d} logw_m, grown from
    # E_{d-1} by one term (a direct sum, left to right), so the sub-block costs
    # (Ls - 1) / 2 [.., N]-sized passes instead of a [.., Ls, Ls, N] tensor.
    # Diagonal 0 is the bonus r_t . u . k_t.
    ux = u.to(dt)[None, :, None, None, :].expand(B, H, NC, 1, N).reshape(X, 1, 1, N)
    A_d = _DiagonalBlocks.apply(rs, ks, lw, ux)  # [X, nS, Ls(t), Ls(s)], 0 above the diagonal
    y_loc = (A_d.view(X * nS, Ls, Ls) @ v.view(X * nS, Ls, N)).view(X, L, N)

    if nS > 1:
        # Query sub-chunk p against the key sub-chunks q < p, factorised at
        # the start of p: (r_t e^{cl_t}) . (k_s e^{sl_s} e^{sum of the
        # sub-chunks strictly between}), every factor <= 1.  One loop step per
        # query sub-chunk, so nothing is computed for the pairs q >= p (a
        # single product over all (p, q) with the q >= p pairs zeroed measured
        # ~10% slower forward).
        sub = torch.arange(nS, device=r.device)
        between_mask = (sub[None, :] > sub[:, None])[None, :, :, None]  # [1, q, j, 1]: j > q
        Pt = torch.cumsum(torch.where(between_mask, tot[:, None], 0.0), dim=2)  # [X, q, j, N]
        eb = torch.exp(F.pad(Pt[:, :, :-1], (0, 0, 1, 0)).transpose(1, 2))  # [X, p, q, N]: sum over q < j < p (used q < p)
        vs = v.view(X, nS, Ls, N)
        y_inter = [torch.zeros_like(qf[:, 0])]
        for p_ in range(1, nS):
            kp = (kf[:, :p_] * eb[:, p_, :p_, None]).reshape(X, p_ * Ls, N)
            y_inter.append((qf[:, p_] @ kp.transpose(1, 2)) @ vs[:, :p_].reshape(X, p_ * Ls, N))
        y_loc = y_loc + torch.stack(y_inter, dim=1).view(X, L, N)

    # The only sequential part: the state entering each chunk.
    C = kh.transpose(1, 2) @ v  # [X, N(key), N(value)]
    # unbind, not C[:, n]: each select's backward would fill a C-sized zero
    # tensor (NC of them); unbind's is one stack.
    decays = torch.exp(chunk_total).view(B * H, NC, N, 1).unbind(1)
    Cs = C.view(B * H, NC, N, N).unbind(1)
    S = S.reshape(B * H, N, N)
    starts = []
    for n in range(NC):
        starts.append(S)
        S = torch.addcmul(Cs[n], S, decays[n])
    S0 = torch.stack(starts, dim=1).view(X, N, N)

    y = torch.baddbmm(y_loc, rq, S0)  # [X, L, N(value)]
    y = y.view(B, H, NC * L, N)[:, :, :T].transpose(1, 2)
    return y, S.view(B, H, N, N)
