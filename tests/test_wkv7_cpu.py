"""The compiled CPU backend of the RWKV-7 WKV operator (ops/wkv7/cpu.py,
csrc/wkv7_cpu.cpp) against the spec, wkv7_reference run in float64: outputs,
final state and the gradients of all six inputs and of the carried-in state,
for every SIMD kernel family the CPU has (each forced in turn), odd lengths,
several head sizes (including ones that are not a multiple of any vector
width, so the padded lanes and the odd last row are exercised), extreme
decays, a sequence split across calls, bf16 inputs, and the inputs it hands
to the chunked form.  Timing lives in benchmarks/bench_wkv7_cpu.py.

Tolerances: float32 results are held to test_ops_wkv7's random-walk bound,
1e-6 * sqrt(T) * max|want| (about 16x the expected drift of T roundings of
6e-8 relative; see assert_float32_close there).  The kernel is a sequential
float32 loop like the reference, so it sits well inside that bound; the one
term that is not computed directly, dlogw, comes from running sums (in
double) of per-token float32 terms, whose rounding also walks like sqrt(T).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from conftest import DEFAULT_ISA, skip_or_fail
from rwkvkit.errors import InputShapeError
from rwkvkit.ops import wkv7 as W
from rwkvkit.ops.wkv7 import cpu as C
from rwkvkit.ops.wkv7 import wkv7_reference
from test_ops_wkv7 import NAMES, assert_all_close, assert_float32_close, make_inputs, run_with_grads

ISAS = [0, 1, 2]
ISA_IDS = list(C.ISA_NAMES)


@pytest.fixture(scope="module")
def ext():
    mod = C.load_extension()
    if mod is None:
        skip_or_fail("the C++ WKV-7 kernel cannot be built here (no C++ compiler?)")
    mod.set_isa(DEFAULT_ISA)
    yield mod
    mod.set_isa(DEFAULT_ISA)


@pytest.fixture
def isa(ext, request):
    """Force the kernel family of the test's parameter (skip if the CPU lacks it)."""
    want = request.param
    got = ext.set_isa(want)
    if got != want:
        ext.set_isa(DEFAULT_ISA)
        pytest.skip(f"this CPU does not support kernel family {ISA_IDS[want]}")
    yield want
    ext.set_isa(DEFAULT_ISA)


@functools.lru_cache(maxsize=None)
def _case(B, T, H, N, seed, decay="model", state=True):
    """Inputs and the float64 spec's outputs and gradients (computed once per
    case, shared by the kernel families)."""
    args = make_inputs(B, T, H, N, seed=seed, decay=decay, state=state)
    out, grads = run_with_grads(wkv7_reference, args)
    return args, [x.detach() for x in out], [g.detach() for g in grads]


def _check_against_spec(B, T, H, N, seed, decay="model", state=True, factor=1.0):
    args, out_r, grad_r = _case(B, T, H, N, seed, decay, state)
    out_c, grad_c = run_with_grads(C.wkv7_cpu, [x.float() if x is not None else None for x in args])
    names = NAMES if state else NAMES[:6]
    assert_float32_close(out_c, out_r, ("y", "state"), T, factor)
    assert_float32_close(grad_c, grad_r, names, T, factor)


# (B, T, H, N): the lengths 1, 2, 17, 100 (700 below), head sizes 8, 16, 64,
# and 13 (odd: the backward's last row alone; padded to 16 lanes on every
# family), 40 and 100 (padded to 64 and 128 lanes: other template widths).
CASES = [
    (2, 1, 2, 8),
    (1, 2, 3, 16),
    (2, 17, 2, 64),
    (1, 100, 2, 13),
    (1, 100, 1, 64),
    (1, 33, 1, 40),
    (1, 9, 1, 100),
]


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS, indirect=True)
def test_every_kernel_family_matches_the_spec(isa):
    for i, (B, T, H, N) in enumerate(CASES):
        _check_against_spec(B, T, H, N, seed=10 + i)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS, indirect=True)
def test_long_sequence_and_no_initial_state(isa):
    _check_against_spec(1, 700, 1, 16, seed=3)
    _check_against_spec(2, 40, 2, 8, seed=4, state=False)


@pytest.mark.parametrize("decay", ["fast", "slow", "beyond"])
def test_extreme_decays(ext, decay):
    """w at the model's clamp (0.545), w ~ 1 - 1e-6 (logw near 0: nothing
    forgotten) and logw down to -30 (w ~ 1e-13, past any model value).  The
    kernel is sequential, so unlike the chunked form (10x wider there) it
    needs no extra allowance: dlogw's running sums cancel to ~0 where w is
    tiny, within the same bound."""
    _check_against_spec(2, 70, 2, 16, seed=7, decay=decay)


def test_decays_below_the_exp_range(ext):
    """logw below -87.3, where exp(logw) is no longer a normal float: the
    kernel's exp gives exactly 0 (torch a denormal or 0); everything stays
    finite and matches the spec."""
    args = make_inputs(1, 20, 1, 8, seed=8)
    logw = args[1].clone()
    logw[:, ::3] = -200.0
    logw[:, 1::5] = -88.0
    args[1] = logw
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_c, grad_c = run_with_grads(C.wkv7_cpu, [x.float() for x in args])
    assert_float32_close(out_c, out_r, ("y", "state"), 20)
    assert_float32_close(grad_c, grad_r, NAMES, 20)


def test_split_sequence_carries_the_state(ext):
    """T = 100 cut at 37 with the state carried: the forward equals one call
    bit for bit (same arithmetic token by token, the state stored exactly in
    between), and the gradients through the carried state match the spec."""
    args, out_r, grad_r = _case(1, 100, 2, 16, 21)
    xs = [x.float() for x in args]
    with torch.no_grad():
        y, S = C.wkv7_cpu(*xs)
        y1, S1 = C.wkv7_cpu(*(x[:, :37] for x in xs[:6]), xs[6])
        y2, S2 = C.wkv7_cpu(*(x[:, 37:] for x in xs[:6]), S1)
    assert torch.equal(torch.cat((y1, y2), dim=1), y) and torch.equal(S2, S)

    def split(*a):
        ya, Sa = C.wkv7_cpu(*(x[:, :37] for x in a[:6]), a[6])
        yb, Sb = C.wkv7_cpu(*(x[:, 37:] for x in a[:6]), Sa)
        return torch.cat((ya, yb), dim=1), Sb

    out_c, grad_c = run_with_grads(split, xs)
    assert_float32_close(out_c, out_r, ("y", "state"), 100)
    assert_float32_close(grad_c, grad_r, NAMES, 100)


def test_one_token_calls_equal_one_sequence_call(ext):
    xs = [x.float() for x in make_inputs(2, 12, 3, 16, seed=22)]
    with torch.no_grad():
        y, S = C.wkv7_cpu(*xs)
        St, ys = xs[6], []
        for t in range(12):
            yt, St = C.wkv7_cpu(*(x[:, t : t + 1] for x in xs[:6]), St)
            ys.append(yt)
    assert torch.equal(torch.cat(ys, dim=1), y) and torch.equal(St, S)


def test_bf16_inputs(ext):
    """bf16 inputs are widened exactly and computed in float32: y and the state
    equal the float32 kernel on the same (rounded) numbers bit for bit, and
    every bf16 gradient is that run's float32 gradient rounded once; the
    state's gradient stays float32."""
    xs = make_inputs(2, 30, 2, 16, seed=23, dtype=torch.float32)
    bf = [x.to(torch.bfloat16) for x in xs[:6]] + [xs[6]]
    fp = [x.float() for x in bf]
    out_b, grad_b = run_with_grads(C.wkv7_cpu, bf)
    out_f, grad_f = run_with_grads(C.wkv7_cpu, fp)
    assert all(x.dtype == torch.float32 for x in out_b)
    assert torch.equal(out_b[0], out_f[0]) and torch.equal(out_b[1], out_f[1])
    for name, gb, gf in zip(NAMES, grad_b, grad_f):
        want = gf if name == "state" else gf.to(torch.bfloat16)
        assert gb.dtype == want.dtype, name
        assert torch.equal(gb, want), f"{name}: bf16 gradient is not the float32 one rounded"


def test_mixed_and_half_inputs_are_upcast(ext):
    xs = make_inputs(1, 10, 2, 8, seed=24, dtype=torch.float32)
    mixed = [xs[0].to(torch.bfloat16), xs[1].half(), *xs[2:]]
    out_m, grad_m = run_with_grads(C.wkv7_cpu, mixed)
    out_f, grad_f = run_with_grads(C.wkv7_cpu, [x.float() for x in mixed])
    assert torch.equal(out_m[0], out_f[0])
    assert grad_m[0].dtype == torch.bfloat16 and grad_m[1].dtype == torch.float16
    for gm, gf in zip(grad_m, grad_f):
        assert torch.equal(gm, gf.to(gm.dtype))


def test_inputs_the_kernel_hands_to_the_chunked_form(ext):
    """float64 (gradient checks), T = 0 and heads wider than the kernel's 128
    run the chunked form with the same contract."""
    args = make_inputs(1, 9, 1, 8, seed=25)
    out_r, grad_r = run_with_grads(wkv7_reference, args)
    out_c, grad_c = run_with_grads(C.wkv7_cpu, args)
    assert out_c[0].dtype == torch.float64
    assert_all_close(out_c, out_r, ("y", "state"), 1e-10)
    assert_all_close(grad_c, grad_r, NAMES, 1e-10)

    xs = [x.float() for x in args]
    st = xs[6]
    y, new = C.wkv7_cpu(*(x[:, :0] for x in xs[:6]), st)
    assert y.shape == (1, 0, 1, 8) and torch.equal(new, st) and new is not st

    args = make_inputs(1, 3, 1, 130, seed=26)
    with torch.no_grad():
        y_r, s_r = wkv7_reference(*args)
        y_c, s_c = C.wkv7_cpu(*(x.float() for x in args))
    assert_float32_close([y_c, s_c], [y_r, s_r], ("y", "state"), 3)


def test_state_not_modified(ext):
    xs = [x.float() for x in make_inputs(1, 8, 2, 8, seed=27)]
    kept = xs[6].clone()
    _, new = C.wkv7_cpu(*xs)
    assert torch.equal(xs[6], kept) and new is not xs[6]


def test_bad_inputs_are_named(ext):
    xs = [x.float() for x in make_inputs(2, 5, 2, 4, seed=28)]
    bad = list(xs)
    bad[3] = bad[3][:, :, :, :3]
    with pytest.raises(InputShapeError, match=r"\bv has shape"):
        C.wkv7_cpu(*bad)
    with pytest.raises(InputShapeError, match="state has shape"):
        C.wkv7_cpu(*xs[:6], xs[6][:, :1])
    bad = list(xs)
    bad[2] = torch.empty(xs[2].shape, device="meta")
    with pytest.raises(ValueError, match="needs CPU tensors, got k on meta"):
        C.wkv7_cpu(*bad)


def test_auto_prefers_the_kernel_on_the_cpu(ext):
    assert W.resolve_backend("auto", "cpu") == "cpu"
    assert W.resolve_backend("cpu", "cpu") == "cpu"
    xs = [x.float() for x in make_inputs(1, 6, 1, 8, seed=29)]
    with torch.no_grad():
        assert torch.equal(W.wkv7(*xs)[0], C.wkv7_cpu(*xs)[0])


def test_failed_build_warns_and_returns_none():
    C._builds.pop(True, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.get_implementation(force_fail=True) is None
        assert C.get_implementation(force_fail=True) is None  # cached: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "could not build the C++ WKV-7 kernel" in msgs[0] and "'torch'" in msgs[0]


def test_set_isa_beyond_the_cpu_gives_the_best(ext):
    best = ext.set_isa(-1)
    try:
        assert ext.set_isa(99) == best
        assert ext.get_isa() == best
    finally:
        ext.set_isa(DEFAULT_ISA)
