"""The RWKV-5/6 WKV operator: chunked form and decode step against the reference
loop (outputs, final state, every gradient), gradcheck in fp64, odd and long
lengths, decays near 0 and near 1, and the input checks."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.errors import InputShapeError
from rwkvkit.ops.wkv6 import wkv6, wkv6_chunked, wkv6_reference, wkv6_step


def _inputs(B, T, H, N, decay="mixed", dtype=torch.float64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    if decay == "mixed":  # RWKV-6-like: -exp(d) with d over [-7, 3], w from ~0.999 to ~2e-9
        logw = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 10 - 7)
    elif decay == "near0":  # w = e^-20 everywhere: the factorised form would overflow at once
        logw = torch.full((B, T, H, N), -20.0, dtype=torch.float64)
    elif decay == "near1":  # w = 1 - 1e-4: the state barely decays
        logw = torch.full((B, T, H, N), -1e-4, dtype=torch.float64)
    elif decay == "huge":  # per-token log-decays down to -e^6 (d_t = 6)
        logw = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 12 - 6)
    else:
        raise AssertionError(decay)
    u = rn(H, N)
    s = rn(B, H, N, N) if state else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return tuple(cast(x) for x in (r, k, v, logw, u, s))


@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("decay", ["mixed", "near0", "near1", "huge"])
def test_chunked_matches_reference_fp64(T, decay):
    args = _inputs(2, T, 3, 8, decay, seed=T)
    y0, s0 = wkv6_reference(*args)
    for chunk, sub in ((64, 16), (16, 4), (8, 8), (5, 2)):
        y1, s1 = wkv6_chunked(*args, chunk_size=chunk, sub_chunk=sub)
        torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s1, s0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", ["mixed", "near0", "near1", "huge"])
def test_chunked_fp32_close_to_fp64_truth(decay):
    """fp32 chunked form vs the fp64 reference: errors of fp32 round-off only
    (no overflow, no NaN) even where the factorised form would overflow, and
    no worse than the fp32 recurrence: decays are direct range sums, never
    differences of long prefix sums (which cost 2e-5 of max |y| here)."""
    args = _inputs(1, 200, 2, 16, decay, seed=1)
    y_true, s_true = wkv6_reference(*args)
    y32, s32 = wkv6_chunked(*(x.float() for x in args))
    y_ref32, _ = wkv6_reference(*(x.float() for x in args))
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all() and torch.isfinite(s32).all()
    scale = y_true.abs().max().item()
    err = (y32.double() - y_true).abs().max().item()
    err_ref = (y_ref32.double() - y_true).abs().max().item()
    assert err <= max(4 * err_ref, 1e-6 * scale), (err, err_ref, scale)
    torch.testing.assert_close(s32.double(), s_true, rtol=1e-5, atol=1e-5 * s_true.abs().max().item())


def _grads(fn, args):
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(7)
    (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum().backward(retain_graph=True)
    (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum().backward()
    return [None if a is None else a.grad for a in leaves]


@pytest.mark.parametrize("T,decay", [(37, "mixed"), (16, "near0"), (41, "near1"), (23, "huge"), (1, "mixed")])
def test_chunked_gradients_match_reference(T, decay):
    """Gradients of r, k, v, logw, u and the incoming state, through y and the final state."""
    args = _inputs(2, T, 2, 8, decay, seed=3)
    ref = _grads(wkv6_reference, args)
    got = _grads(lambda *a: wkv6_chunked(*a, chunk_size=16, sub_chunk=4), args)
    for name, a, b in zip(("r", "k", "v", "logw", "u", "state"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("sub", [8, 16])
def test_chunked_gradients_default_and_long_sub_chunks(sub):
    """The diagonal sub-blocks' written-out backward (dlw through a difference
    array over every pair's range) at the default sub-chunk of 8 and at 16,
    with several sub-chunks per chunk and a ragged last chunk."""
    args = _inputs(1, 45, 2, 8, "mixed", seed=13)
    ref = _grads(wkv6_reference, args)
    got = _grads(lambda *a: wkv6_chunked(*a, chunk_size=2 * sub, sub_chunk=sub), args)
    for name, a, b in zip(("r", "k", "v", "logw", "u", "state"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck_reference_and_chunked():
    args = tuple(x.requires_grad_(True) for x in _inputs(1, 6, 2, 3, "mixed", seed=5))
    assert torch.autograd.gradcheck(wkv6_reference, args, eps=1e-6, atol=1e-6)
    f = lambda *a: wkv6_chunked(*a, chunk_size=4, sub_chunk=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_step_matches_reference_and_its_gradients():
    args = _inputs(3, 1, 2, 8, "mixed", seed=9)
    y0, s0 = wkv6_reference(*args)
    r, k, v, logw, u, s = args
    y1, s1 = wkv6_step(r[:, 0], k[:, 0], v[:, 0], logw[:, 0], u, s)
    torch.testing.assert_close(y1, y0[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-12)
    ref = _grads(wkv6_reference, args)
    got = _grads(lambda r, k, v, lw, u, s: (lambda y, st: (y.unsqueeze(1), st))(*wkv6_step(r[:, 0], k[:, 0], v[:, 0], lw[:, 0], u, s)), args)
    for name, a, b in zip(("r", "k", "v", "logw", "u", "state"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_long_sequence_split_anywhere_equals_one_call():
    """1000 tokens, fp32: one chunked call == two calls with the state carried == the fp64 truth."""
    args = _inputs(1, 1000, 2, 16, "mixed", seed=11)
    y_true, s_true = wkv6_reference(*args)
    r, k, v, logw, u, s = (x.float() for x in args)
    y, st = wkv6(r, k, v, logw, u, s)
    ya, sa = wkv6(r[:, :333], k[:, :333], v[:, :333], logw[:, :333], u, s)
    yb, sb = wkv6(r[:, 333:], k[:, 333:], v[:, 333:], logw[:, 333:], u, sa)
    scale = y_true.abs().max().item()
    for out in (y, torch.cat([ya, yb], 1)):
        assert (out.double() - y_true).abs().max().item() < 1e-5 * scale
    for st_ in (st, sb):
        assert (st_.double() - s_true).abs().max().item() < 1e-5 * s_true.abs().max().item()


def test_constant_decay_broadcast_and_no_state():
    """RWKV-5 passes one decay per head and channel expanded over T (stride 0); state None = zeros."""
    r, k, v, logw, u, _ = _inputs(2, 21, 3, 4, "mixed", dtype=torch.float32, seed=2)
    lw = logw[:, :1].expand_as(logw)
    y0, s0 = wkv6_reference(r, k, v, lw.contiguous(), u, torch.zeros(2, 3, 4, 4))
    y1, s1 = wkv6(r, k, v, lw, u)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)


def test_dtypes_and_input_state_untouched():
    r, k, v, logw, u, s = _inputs(1, 9, 2, 4, "mixed", dtype=torch.float32, seed=4)
    before = s.clone()
    y, st = wkv6(r.bfloat16(), k.bfloat16(), v.bfloat16(), logw, u, s)
    assert y.dtype == torch.float32 and st.dtype == torch.float32
    assert torch.equal(s, before) and st.data_ptr() != s.data_ptr()
    y, st = wkv6(r[:, :0], k[:, :0], v[:, :0], logw[:, :0], u, s)
    assert y.shape == (1, 0, 2, 4) and torch.equal(st, s) and st.data_ptr() != s.data_ptr()


def test_bad_inputs_raise_clear_errors():
    r, k, v, logw, u, s = _inputs(1, 3, 2, 4, "mixed", dtype=torch.float32)
    with pytest.raises(InputShapeError, match="k has shape"):
        wkv6(r, k[:, :2], v, logw, u)
    with pytest.raises(InputShapeError, match="u has shape"):
        wkv6(r, k, v, logw, u[:1])
    with pytest.raises(InputShapeError, match="state has shape"):
        wkv6(r, k, v, logw, u, s[..., :3])
    with pytest.raises(InputShapeError, match="wkv6_step: r must be"):
        wkv6_step(r, k, v, logw, u, s)
    with pytest.raises(ValueError, match="unknown WKV6 backend"):
        wkv6(r, k, v, logw, u, backend="nope")
    y, _ = wkv6(r, k, v, logw, u, s, backend="reference")
    assert y.shape == r.shape
