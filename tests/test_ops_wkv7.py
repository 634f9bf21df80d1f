"""The RWKV-7 WKV operator: the reference loop against an independent matrix
form and gradcheck; the chunked WY/UT form and the decode step against the
reference: outputs, final state and the gradients of every input, the
carried-in state included, in float64 (tight) and float32 (within rounding)."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.errors import InputShapeError
from rwkvkit.ops import wkv7 as W
from rwkvkit.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step

LOG_W_MIN = -math.exp(-0.5)  # the model's clamp: w >= e^-0.6065 ~ 0.545
NAMES = ("r", "logw", "k", "v", "a", "b", "state")


def make_inputs(B, T, H, N, seed=0, dtype=torch.float64, state=True, decay="model"):
    """Inputs built as the model builds them: a = -kappa_hat, b = kappa_hat * alpha
    with kappa_hat unit per head, alpha in (0, 1), logw = -e^-0.5 sigmoid(.).

    decay: "model" (random within the clamp), "fast" (w ~ 0.545, the clamp),
    "slow" (w ~ 1 - 1e-6), "beyond" (logw down to -30, past any model value:
    the chunked form must stay correct for any logw <= 0).
    """
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shape = (B, T, H, N)
    kappa = torch.nn.functional.normalize(rn(*shape), dim=-1)
    alpha = torch.rand(shape, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
    if decay == "model":
        logw = LOG_W_MIN * torch.sigmoid(rn(*shape) * 2)
    elif decay == "fast":
        logw = LOG_W_MIN * (1 - 1e-4 * torch.rand(shape, generator=g, dtype=torch.float64))
    elif decay == "slow":
        logw = -1e-6 * (1 + torch.rand(shape, generator=g, dtype=torch.float64))
    elif decay == "beyond":
        logw = -30 * torch.rand(shape, generator=g, dtype=torch.float64) ** 2
    else:
        raise ValueError(decay)
    args = [rn(*shape), logw, rn(*shape), rn(*shape), -kappa, kappa * alpha]
    st = rn(B, H, N, N) if state else None
    return [x.to(dtype) for x in args] + [st.to(dtype) if st is not None else None]


def run_with_grads(fn, args, seed=1):
    """(y, final state) and the gradients of a random linear loss on both
    w.r.t. all six inputs and the carried-in state (if given)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in args]
    y, st = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum() for x in (y, st))
    wrt = [x for x in leaves if x is not None]
    return [y, st], list(torch.autograd.grad(loss, wrt))


def max_err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item()


def assert_all_close(got, want, names, rel):
    """Each tensor within rel * (its largest entry, at least 1)."""
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        tol = rel * max(1.0, b.abs().max().item())
        err = max_err(a, b)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def assert_float32_close(got, want64, names, T, factor=1.0):
    """float32 results against the float64 spec.  Rounding errors of a
    length-T recurrence (or of a chunked sum over T terms) accumulate like a
    random walk, ~sqrt(T) roundings of the order of the largest entry, each
    ~6e-8 relative; 1e-6 * sqrt(T) * max|want| is therefore ~16x the expected
    drift.  Measured for model-like decays: under 3e-2 of this bound (the
    chunked form's summation order costs 1.5-4x the loop's own float32 error;
    NOTES.md).  `factor` widens it where a test explains why."""
    for name, a, b in zip(names, got, want64):
        assert a.dtype == torch.float32, f"{name}: dtype {a.dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        tol = factor * 1e-6 * math.sqrt(max(T, 1)) * max(1.0, b.abs().max().item())
        err = max_err(a, b)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def chunked(chunk_size, factorised=None):
    return lambda *a: wkv7_chunked(*a, chunk_size=chunk_size, factorised=factorised)


# ---------------------------------------------------------------- the spec ---


def matrix_form(r, logw, k, v, a, b, state):
    """An independent statement: S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,
    y_t = S_t r_t, as explicit N x N matrices, float64, batch/head loops."""
    B, T, H, N = r.shape
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    S_out = torch.zeros(B, H, N, N, dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            S = state[bi, h].clone()
            for t in range(T):
                x = lambda z: z[bi, t, h]  # noqa: E731
                transition = torch.diag(torch.exp(x(logw))) + torch.outer(x(a), x(b))
                S = torch.einsum("ij,jk->ik", S, transition) + torch.outer(x(v), x(k))
                y[bi, t, h] = torch.einsum("ij,j->i", S, x(r))
            S_out[bi, h] = S
    return y, S_out


@pytest.mark.parametrize("T", [1, 7])
def test_reference_matches_matrix_form(T):
    args = make_inputs(2, T, 2, 5, seed=T)
    y, st = wkv7_reference(*args)
    y_m, st_m = matrix_form(*args)
    torch.testing.assert_close(y, y_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,H", [(3, 1), (5, 2)])
def test_gradcheck_reference(T, H):
    args = [x.requires_grad_() for x in make_inputs(1, T, H, 4, seed=2)]
    assert torch.autograd.gradcheck(lambda *a: wkv7_reference(*a), args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_chunked_ragged():
    """T = 5 in chunks of 2: a ragged last chunk, both score evaluations."""
    args = [x.requires_grad_() for x in make_inputs(1, 5, 2, 4, seed=4)]
    for factorised in (True, False):
        assert torch.autograd.gradcheck(chunked(2, factorised), args, eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------- chunked form vs spec ---


@pytest.mark.parametrize("factorised", [None, False], ids=["auto", "pairwise"])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 33, 100])
def test_chunked_float64_matches_reference(T, factorised):
    """Chunks of 16: T = 15/16/17/33 sit on either side of chunk boundaries."""
    args = make_inputs(2, T, 2, 8, seed=T)
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_c, grad_c = run_with_grads(chunked(16, factorised), args)
    assert out_c[0].dtype == torch.float64
    assert_all_close(out_c, out_r, ("y", "state"), 1e-10)
    assert_all_close(grad_c, grad_r, NAMES, 1e-10)


@pytest.mark.parametrize(
    "B,T,H,N,chunk",
    [(2, 17, 3, 4, 16), (1, 100, 2, 8, 32), (1, 33, 2, 64, 16), (2, 64, 2, 64, 32), (1, 100, 1, 64, 64)],
)
def test_chunked_float32_matches_reference(B, T, H, N, chunk):
    args = make_inputs(B, T, H, N, seed=N + T)
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_c, grad_c = run_with_grads(chunked(chunk), [x.float() for x in args])
    assert_float32_close(out_c, out_r, ("y", "state"), T)
    assert_float32_close(grad_c, grad_r, NAMES, T)


@pytest.mark.parametrize("decay", ["fast", "slow", "beyond"])
def test_extreme_decays(decay):
    """w at the clamp (0.545), w ~ 1 - 1e-6 (nothing forgotten), and logw
    down to -30 (beyond the factorised bound: the auto path must notice and
    stay exact)."""
    T = 70
    args = make_inputs(2, T, 2, 16, seed=7, decay=decay)
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_c, grad_c = run_with_grads(chunked(32), args)
    assert_all_close(out_c, out_r, ("y", "state"), 1e-10)
    assert_all_close(grad_c, grad_r, NAMES, 1e-10)
    out_c, grad_c = run_with_grads(chunked(32), [x.float() for x in args])
    # Beyond the model's decays the in-chunk cumulative log-decay reaches
    # |g| ~ 300, whose float32 rounding (~2e-5 absolute) becomes the relative
    # error of every decay factor: measured 50-100x the loop's own float32
    # error, 1.5e-5 of the largest gradient (NOTES.md).  Hence 10x here.
    factor = 10.0 if decay == "beyond" else 1.0
    assert_float32_close(out_c, out_r, ("y", "state"), T, factor)
    assert_float32_close(grad_c, grad_r, NAMES, T, factor)


def test_factorised_bound_chooses_pairwise():
    """Past the bound the factorised form really would fail in float32 (so
    the automatic choice matters), and the automatic choice does not."""
    args = [x.float() for x in make_inputs(1, 64, 1, 8, seed=3, decay="beyond")]
    with torch.no_grad():
        y_forced, _ = wkv7_chunked(*args, chunk_size=64, factorised=True)
        y_auto, _ = wkv7_chunked(*args, chunk_size=64)
    assert not torch.isfinite(y_forced).all()
    assert torch.isfinite(y_auto).all()


def test_long_sequence_and_split():
    """T = 2000 in float32 against the float64 spec; T = 1000 split at 397 with
    the state carried over equals one pass."""
    args = make_inputs(1, 2000, 1, 16, seed=11)
    with torch.no_grad():
        y_r, st_r = wkv7_reference(*args)
        y_c, st_c = wkv7(*[x.float() for x in args])
    assert_float32_close([y_c, st_c], [y_r, st_r], ("y", "state"), 2000)

    args = [x.float() for x in make_inputs(2, 1000, 2, 16, seed=12)]
    with torch.no_grad():
        y_one, st_one = wkv7(*args)
        head = [x[:, :397] for x in args[:6]]
        tail = [x[:, 397:] for x in args[:6]]
        y1, st1 = wkv7(*head, args[6])
        y2, st2 = wkv7(*tail, st1)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y_one, rtol=1e-4, atol=1e-4 * y_one.abs().max().item())
    torch.testing.assert_close(st2, st_one, rtol=1e-4, atol=1e-4 * st_one.abs().max().item())


# ------------------------------------------------------------ decode step ---


def test_step_matches_reference_and_chunked():
    B, T, H, N = 2, 40, 3, 8
    args = make_inputs(B, T, H, N, seed=5)
    y_r, st_r = wkv7_reference(*[x[:, :1] for x in args[:6]], args[6])
    y_s, st_s = wkv7_step(*[x[:, 0] for x in args[:6]], args[6])
    torch.testing.assert_close(y_s, y_r[:, 0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(st_s, st_r, rtol=1e-13, atol=1e-13)

    y_c, st_c = wkv7_chunked(*args, chunk_size=16)
    S, ys = args[6], []
    for t in range(T):
        y, S = wkv7_step(*[x[:, t] for x in args[:6]], S)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, st_c, rtol=1e-10, atol=1e-10)


def test_step_gradients_match_reference():
    args = make_inputs(2, 1, 2, 4, seed=6)
    step = lambda *a: (lambda y, s: (y[:, None], s))(*wkv7_step(*[x[:, 0] for x in a[:6]], a[6]))  # noqa: E731
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_s, grad_s = run_with_grads(step, args)
    assert_all_close(out_s + grad_s, out_r + grad_r, ("y", "state") + NAMES, 1e-12)


# ----------------------------------------------------------- dtypes, API ---


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_inputs_computed_in_float32(backend):
    T = 40
    bf = [x.to(torch.bfloat16) for x in make_inputs(1, T, 2, 16, seed=8, dtype=torch.float32)]
    fp = [x.float() for x in bf]  # the same rounded numbers in float32
    out_b, grad_b = run_with_grads(lambda *a: wkv7(*a, backend=backend), bf)
    out_f, grad_f = run_with_grads(lambda *a: wkv7(*a, backend=backend), fp)
    assert out_b[0].dtype == torch.float32 and out_b[1].dtype == torch.float32
    for name, a, b in zip(("y", "state") + NAMES, out_b + grad_b, out_f + grad_f):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2 * max(1.0, b.abs().max().item()), msg=name)
    torch.testing.assert_close(out_b[0], out_f[0], rtol=0, atol=0)  # the computation itself is float32


def test_state_not_modified_and_zero_state_default():
    args = make_inputs(1, 20, 2, 8, seed=9)
    st = args[6]
    kept = st.clone()
    for backend in ("reference", "torch"):
        _, new = wkv7(*args, backend=backend)
        assert torch.equal(st, kept)
        assert new is not st
        y0, _ = wkv7(*args[:6], None, backend=backend)
        y1, _ = wkv7(*args[:6], torch.zeros_like(st), backend=backend)
        torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    y, new = wkv7(*[x[:, :0] for x in args[:6]], st)  # T = 0: no tokens, same state
    assert y.shape == (1, 0, 2, 8) and torch.equal(new, st) and new is not st


def test_backends():
    from rwkvkit.ops.wkv7 import cpu  # "auto" on the CPU: the C++ kernel where it builds (tests/test_wkv7_cpu.py)

    assert W.resolve_backend("auto") == ("cpu" if cpu.load_extension() is not None else "torch")
    assert W.resolve_backend("reference") == "reference"
    with pytest.raises(ValueError, match="unknown WKV7 backend"):
        W.resolve_backend("nope")


@pytest.mark.parametrize("fn", [wkv7_reference, wkv7_chunked], ids=["reference", "chunked"])
def test_bad_shapes_name_the_argument(fn):
    args = make_inputs(2, 5, 2, 4, seed=10)
    for i, name in enumerate(NAMES[1:6], start=1):
        bad = list(args)
        bad[i] = bad[i][:, :, :, :3]
        with pytest.raises(InputShapeError, match=rf"\b{name} has shape"):
            fn(*bad)
    with pytest.raises(InputShapeError, match="state has shape"):
        fn(*args[:6], args[6][:, :, :3])
    with pytest.raises(InputShapeError, match=r"r must be \[B, T, H, N\]"):
        fn(args[0][0], *args[1:])
    step = [x[:, 0] for x in args[:6]]
    with pytest.raises(InputShapeError, match=r"wkv7_step: k has shape"):
        wkv7_step(*step[:2], step[2][:, :1], *step[3:], args[6])
    with pytest.raises(InputShapeError, match="wkv7_step: state has shape"):
        wkv7_step(*step, args[6][0])
