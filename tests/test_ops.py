"""The WKV operator: the reference against the closed form, and every fast CPU
backend ("torch" = chunked PyTorch, "cpu" = C++ extension) against the
reference: outputs, final state and all gradients, including those into the
carried-in state and out of the final state."""

from __future__ import annotations

import pytest
import torch

from conftest import skip_or_fail
from rwkvkit import ops
from rwkvkit.ops import chunked, cpu
from rwkvkit.ops.reference import wkv_closed_form, wkv_reference

FAST = ("torch", "cpu")


def fast_impl(name: str):
    """The implementation under test; the C++ build failing skips (fails in CI)."""
    if name == "torch":
        return chunked.wkv_chunked
    fn = cpu.get_implementation()
    if fn is None:
        skip_or_fail("the C++ WKV kernel could not be built here (see the warning)")
    return fn


def make_inputs(B, T, C, seed=0, dtype=torch.float32, state=False, k_scale=3.0, decay=(-6.0, 3.0)):
    """Random operator inputs; time_decay spread over `decay` across channels."""
    g = torch.Generator().manual_seed(seed)
    d = torch.linspace(decay[0], decay[1], C, dtype=torch.float64)
    w = -torch.exp(d)
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    st = None
    if state:
        # A state as the recurrence leaves it: bb >= 1, aa/bb a mean of values.
        bb = 1 + torch.rand(B, C, generator=g, dtype=torch.float64) * 3
        aa = bb * torch.randn(B, C, generator=g, dtype=torch.float64)
        pp = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
        st = (aa, bb, pp)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(w), cast(u), cast(k), cast(v), (tuple(map(cast, st)) if st else None)


def run_with_grads(fn, w, u, k, v, state, seed=1):
    """Output, final state and gradients of a random linear loss on y and on
    every final-state tensor, w.r.t. w, u, k, v and (if given) the state."""
    leaves = [x.detach().clone().requires_grad_() for x in (w, u, k, v)]
    st = None
    if state is not None:
        st = tuple(x.detach().clone().requires_grad_() for x in state)
        leaves += list(st)
    y, (aa, bb, pp) = fn(*leaves[:4], st)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
        for x in (y, aa, bb, pp)
    )
    grads = torch.autograd.grad(loss, leaves)
    return [y, aa, bb, pp], list(grads)


NAMES_OUT = ("y", "aa", "bb", "pp")
NAMES_GRAD = ("w", "u", "k", "v", "aa_in", "bb_in", "pp_in")


def assert_close_all(got, want, names, rtol, atol):
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        # atol relative to the tensor's largest entry: gradients of w and u
        # are sums over B*T terms and can be large.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def assert_within_float32_drift(got, ref32, want, names, factor):
    """float32 results no further from the float64 spec `want` than `factor`
    times the spec's own float32 run `ref32` is (plus a rounding floor)."""
    for name, a, r, b in zip(names, got, ref32, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        spec_err = (r.double() - b).abs().max().item()
        err = (a.double() - b).abs().max().item()
        floor = 1e-5 * max(1.0, b.abs().max().item())
        assert err <= factor * spec_err + floor, f"{name}: error {err:.3g}, the spec's own float32 error {spec_err:.3g}"


# ---------------------------------------------------------------- the spec ---


@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_reference_matches_closed_form(T):
    w, u, k, v, _ = make_inputs(2, T, 5, seed=T, dtype=torch.float64, k_scale=10.0, decay=(-8.0, 4.0))
    y, _ = wkv_reference(w, u, k, v)
    torch.testing.assert_close(y, wkv_closed_form(w, u, k, v), rtol=1e-12, atol=1e-12)


def _as_fn(impl, with_state):
    def f(w, u, k, v, *state):
        y, st = impl(w, u, k, v, tuple(state) if with_state else None)
        return (y,) + tuple(st)

    return f


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gradcheck_float64(backend, with_state):
    impl = {"reference": wkv_reference, "torch": lambda *a: chunked.wkv_chunked(*a, chunk_size=2)}.get(backend)
    if impl is None:
        impl = fast_impl(backend)
    # T = 5 with chunks of 2 makes the chunked form pad its last chunk.
    w, u, k, v, st = make_inputs(2, 5, 3, seed=3, dtype=torch.float64, state=True, decay=(-2.0, 1.0))
    inputs = [w, u, k, v] + (list(st) if with_state else [])
    inputs = [x.clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(_as_fn(impl, with_state), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# -------------------------------------------------- fast backends vs spec ---


@pytest.mark.parametrize("with_state", [False, True], ids=["empty", "carried"])
@pytest.mark.parametrize("T", [1, 2, 7, 33, 129])
@pytest.mark.parametrize("backend", FAST)
def test_fast_matches_reference(backend, T, with_state):
    fn = fast_impl(backend)
    # C = 13: not a multiple of any vector width or channel block.
    args = make_inputs(3, T, 13, seed=T, state=with_state)
    out_r, grad_r = run_with_grads(wkv_reference, *args)
    out_f, grad_f = run_with_grads(fn, *args)
    assert out_f[0].dtype == torch.float32
    assert_close_all(out_f, out_r, NAMES_OUT, rtol=1e-5, atol=1e-5)
    assert_close_all(grad_f, grad_r, NAMES_GRAD, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_fast_float64_matches_reference_tightly(backend):
    fn = fast_impl(backend)
    args = make_inputs(2, 40, 9, seed=5, dtype=torch.float64, state=True)
    out_r, grad_r = run_with_grads(wkv_reference, *args)
    out_f, grad_f = run_with_grads(fn, *args)
    assert out_f[0].dtype == torch.float64
    assert_close_all(out_f, out_r, NAMES_OUT, rtol=1e-12, atol=1e-12)
    assert_close_all(grad_f, grad_r, NAMES_GRAD, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_extreme_decays_and_keys(backend):
    """time_decay from -20 (w ~ -2e-9) to +10 (w ~ -22026); |k| far beyond
    float32's exp range.  Nothing may overflow, and the result is the spec's."""
    fn = fast_impl(backend)
    B, T, C = 2, 70, 24
    w, u, k, v, st = make_inputs(B, T, C, seed=11, dtype=torch.float64, state=True, k_scale=40.0, decay=(-20.0, 10.0))
    # e^200 and e^-300 are not float32 numbers.  Distinct values: equal keys
    # would tie in float32 where w is below pp's rounding step.
    k[0, ::7] = 200.0 + torch.arange(10, dtype=torch.float64)[:, None] * 0.37
    k[1, 3::5] = -300.0
    k[1, 10] = 95.0
    st = (st[0], st[1], st[2] * 30)
    for state in (st, None):
        names = NAMES_GRAD if state else NAMES_GRAD[:4]
        out_r, grad_r = run_with_grads(wkv_reference, w, u, k, v, state)
        # In float64 the fast path must be the spec, extremes included.
        out_f, grad_f = run_with_grads(fn, w, u, k, v, state)
        assert_close_all(out_f, out_r, NAMES_OUT, rtol=1e-9, atol=1e-9)
        assert_close_all(grad_f, grad_r, names, rtol=1e-8, atol=1e-9)
        # In float32: finite, and no further from the float64 spec than the
        # spec's own float32 run is, give or take an order of magnitude (the
        # gradients of w and k are ill-conditioned here: w is below the
        # rounding step of pp ~ 200).
        f32 = lambda x: x.float()  # noqa: E731
        args32 = [f32(x) for x in (w, u, k, v)] + [tuple(map(f32, state)) if state else None]
        out_32, grad_32 = run_with_grads(wkv_reference, *args32)
        out_f, grad_f = run_with_grads(fn, *args32)
        assert_within_float32_drift(out_f + grad_f, out_32 + grad_32, out_r + grad_r, NAMES_OUT + names, 10)


def test_long_sequence_no_overflow():
    """T = 16384 on a narrow slice (one row, channels spanning every decay
    regime): no overflow, and the spec's values and gradients."""
    cpu_fn, torch_fn = fast_impl("cpu"), fast_impl("torch")
    w, u, k, v, st = make_inputs(1, 16384, 6, seed=7, dtype=torch.float64, state=True, k_scale=8.0, decay=(-20.0, 10.0))
    with torch.no_grad():
        y_r, st_r = wkv_reference(w, u, k, v, st)
    # float64: the C++ scan is the spec; its gradients are the chunked form's
    # (autograd of an independent formulation, here in float32).
    out64, grad64 = run_with_grads(cpu_fn, w, u, k, v, st)
    assert_close_all(out64, [y_r, *st_r], NAMES_OUT, rtol=1e-10, atol=1e-10)
    f32 = lambda x: x.float()  # noqa: E731
    args32 = [f32(x) for x in (w, u, k, v)] + [tuple(map(f32, st))]
    with torch.no_grad():
        y_32, st_32 = wkv_reference(*args32)
    for fn in (cpu_fn, torch_fn):
        out, grads = run_with_grads(fn, *args32)
        # Over 16k steps of slow decay float32 drifts (~1e-3 here); the fast
        # paths may not drift more than the spec itself does.
        assert_within_float32_drift(out, [y_32, *st_32], [y_r, *st_r], NAMES_OUT, 1.5)
        for x in grads:
            assert torch.isfinite(x).all()
        if fn is torch_fn:
            assert_close_all(grads, grad64, NAMES_GRAD, rtol=1e-3, atol=1e-4)
        else:  # the float32 recurrence drifts over 16k steps like the spec's own
            assert_close_all(grads, grad64, NAMES_GRAD, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("backend", FAST)
def test_split_equals_whole(backend):
    """Two calls with the state carried across equal one call, and gradients
    flow back through the carried state (truncated BPTT without a detach)."""
    fn = fast_impl(backend)
    w, u, k, v, _ = make_inputs(2, 45, 19, seed=9)
    T1 = 17

    def whole(w, u, k, v, state):
        return fn(w, u, k, v, state)

    def split(w, u, k, v, state):
        y1, s1 = fn(w, u, k[:, :T1], v[:, :T1], state)
        y2, s2 = fn(w, u, k[:, T1:], v[:, T1:], s1)
        return torch.cat([y1, y2], 1), s2

    out_w, grad_w = run_with_grads(whole, w, u, k, v, None)
    out_s, grad_s = run_with_grads(split, w, u, k, v, None)
    assert_close_all(out_s, out_w, NAMES_OUT, rtol=1e-5, atol=1e-6)
    assert_close_all(grad_s, grad_w, NAMES_GRAD[:4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(backend, dtype):
    """bf16/fp16 k and v: computed in float32 as the reference computes their
    float32 values: y and the final state, and the gradients of w, u and the
    input state, to float32 accuracy; the gradients of k and v come back in
    k's dtype, so they may differ by the last bit of that dtype."""
    fn = fast_impl(backend)
    w, u, k, v, st = make_inputs(2, 9, 5, seed=2, state=True)
    k, v = k.to(dtype), v.to(dtype)
    out, grads = run_with_grads(fn, w, u, k, v, st)
    assert all(x.dtype == torch.float32 for x in out)
    assert grads[2].dtype == dtype and grads[3].dtype == dtype

    def ref(w_, u_, k_, v_, st_):
        return wkv_reference(w_, u_, k_.float(), v_.float(), st_)

    out_r, grads_r = run_with_grads(ref, w, u, k, v, st)
    assert_close_all(out, out_r, NAMES_OUT, rtol=1e-5, atol=1e-6)
    names = NAMES_GRAD
    keep = [0, 1, 4, 5, 6]
    assert_close_all([grads[i] for i in keep], [grads_r[i] for i in keep], [names[i] for i in keep], rtol=1e-4, atol=1e-5)
    # One unit in the last place of the low-precision dtype (2**-7 for bf16's
    # 8-bit significand, 2**-10 for fp16), on top of float32's difference.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert_close_all(grads[2:4], grads_r[2:4], names[2:4], rtol=ulp + 1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_gradients_when_the_final_state_is_unused(backend):
    fn = fast_impl(backend)
    w, u, k, v, _ = make_inputs(2, 20, 7, seed=12)

    def grads(f):
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        y, _ = f(*leaves, None)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [x.grad for x in leaves]

    assert_close_all(grads(fn), grads(wkv_reference), NAMES_GRAD[:4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_empty_sequence_keeps_state(backend):
    fn = fast_impl(backend)
    w, u, k, v, st = make_inputs(2, 0, 5, state=True)
    y, st2 = fn(w, u, k, v, st)
    assert y.shape == (2, 0, 5)
    for a, b in zip(st2, st):
        torch.testing.assert_close(a, b)


def test_chunk_size_does_not_change_the_result():
    args = make_inputs(2, 50, 7, seed=4, dtype=torch.float64, state=True)
    base, gbase = run_with_grads(lambda *a: chunked.wkv_chunked(*a, chunk_size=1), *args)
    for L in (3, 16, 64):
        out, grads = run_with_grads(lambda *a: chunked.wkv_chunked(*a, chunk_size=L), *args)
        assert_close_all(out, base, NAMES_OUT, rtol=1e-12, atol=1e-12)
        assert_close_all(grads, gbase, NAMES_GRAD, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- dispatch ---


def test_dispatcher_runs_each_fast_backend():
    w, u, k, v, st = make_inputs(2, 11, 6, seed=6, state=True)
    y_r, s_r = wkv_reference(w, u, k, v, st)
    for backend in ("auto",) + FAST:
        if backend == "cpu":
            fast_impl("cpu")  # skip (or fail in CI) when the kernel is not built
        y, s = ops.wkv(w, u, k, v, st, backend=backend)
        torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s[2], s_r[2], rtol=1e-5, atol=1e-5)


def test_cpu_build_failure_warns_once_and_falls_back(monkeypatch):
    with pytest.warns(RuntimeWarning, match="could not build the C\\+\\+ WKV kernel") as record:
        assert cpu.get_implementation(force_fail=True) is None
        assert cpu.get_implementation(force_fail=True) is None
    assert len([r for r in record if "C++ WKV kernel" in str(r.message)]) == 1

    # The dispatcher, asked for "cpu" on a machine where the build failed,
    # runs the "torch" backend instead.
    real = cpu.get_implementation
    monkeypatch.setattr(cpu, "get_implementation", lambda: real(force_fail=True))
    monkeypatch.setattr(ops._BACKENDS, "cache", {})
    assert ops.resolve_backend("cpu", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    w, u, k, v, _ = make_inputs(1, 6, 4, seed=8)
    y, _ = ops.wkv(w, u, k, v, None, backend="cpu")
    torch.testing.assert_close(y, wkv_reference(w, u, k, v)[0], rtol=1e-5, atol=1e-6)


def test_cpu_build_time_is_reported(record_property):
    fast_impl("cpu")
    seconds = cpu.build_seconds()
    assert seconds is not None and seconds > 0
    record_property("wkv_cpu_build_seconds", seconds)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_bad_shapes_name_what_was_expected(backend):
    from rwkvkit.errors import InputShapeError, RwkvkitError

    B, T, C = 2, 5, 8
    w, u = -torch.rand(C), torch.rand(C)
    k, v = torch.randn(B, T, C), torch.randn(B, T, C)
    good = (torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), -1e30))
    cases = [
        ((w, u, k[0], v, None), "k must be [B, T, C], got shape (5, 8)"),
        ((w, u, k, v[:, :3], None), "v has shape (2, 3, 8), expected (2, 5, 8)"),
        ((w[:4], u, k, v, None), "w and u must be [8], got (4,) and (8,)"),
        ((w, u, k, v, good[:2]), "state must be a tuple (aa, bb, pp)"),
        ((w, u, k, v, (good[0], good[1][:1], good[2])), "state bb has shape (1, 8), expected (2, 8)"),
    ]
    for args, msg in cases:
        with pytest.raises(InputShapeError) as info:
            ops.wkv(*args, backend=backend)
        assert msg in str(info.value)
        assert isinstance(info.value, RwkvkitError) and isinstance(info.value, ValueError)
