"""The compiled CPU backend of the RWKV-5/6 WKV operator (``wkv6(..., backend="cpu")``)
against the reference loop (the spec): output, final state and the gradients
of r, k, v, logw, u and the carried-in state, for odd lengths (across the
backward's checkpoint segments), head sizes 8/16/64, split sequences, decays
near 0 and near 1, RWKV-5's broadcast decay, bf16 inputs and every SIMD
kernel family the CPU has (forced in turn).

Tolerance.  The kernel computes in fp32 what the reference loop computes:
per token, dot products over the N key channels and a state that is a running
sum decayed by w <= 1 (the backward: the same sums, its adjoint decayed the
same way), only in another order (SIMD lanes, FMAs, the bonus folded into the
accumulator, the state re-run from checkpoints).  Its rounding error is then of
the same size as the fp32 reference loop's own.  So each quantity is measured
against the float64 reference (the truth) and the kernel's error must be at
most 4x the fp32 loop's error on the same inputs, or 16 fp32 ulps of the
quantity's largest value (2^-20 relative; for the cases where the fp32 loop
is luckily near-exact).  Measured, the ratio is 0.4-2.2.  A real mistake (a
sign, a decay applied one token late, a swapped key/value index) shows as an
error of 1e-2 relative or more.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import DEFAULT_ISA, skip_or_fail
from rwkvkit.ops import wkv6 as wkv6_mod
from rwkvkit.ops.wkv6 import cpu, wkv6, wkv6_chunked, wkv6_reference

NAMES = ("y", "state", "dr", "dk", "dv", "dlogw", "du", "dstate")
ULP_FLOOR = 2.0**-20  # 16 fp32 ulps of the largest value


@pytest.fixture(scope="module")
def ext():
    mod = cpu.load_extension()
    if mod is None:
        skip_or_fail("the C++ WKV-6 kernel could not be built here (see the warning)")
    mod.set_isa(DEFAULT_ISA)
    yield mod
    mod.set_isa(DEFAULT_ISA)


def _inputs(B, T, H, N, decay="mixed", seed=0, state=True):
    """float64 inputs; logw = -exp(d) like RWKV-6's (or the stated extreme)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    if decay == "mixed":  # d over [-7, 3]: w from ~0.999 to ~2e-9
        logw = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 10 - 7)
    elif decay == "near0":  # w = e^-20: each token forgets the state
        logw = torch.full((B, T, H, N), -20.0, dtype=torch.float64)
    elif decay == "near1":  # w = 1 - 1e-5: the state barely decays and grows with T
        logw = torch.full((B, T, H, N), -1e-5, dtype=torch.float64)
    elif decay == "huge":  # log-decays down to -e^6
        logw = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 12 - 6)
    else:
        raise AssertionError(decay)
    u = rn(H, N)
    s = rn(B, H, N, N) if state else None
    return [r, k, v, logw, u, s]


def _run(fn, args, seed=7):
    """y, final state and the gradients of a random linear loss on both (float64 results)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64)
    ((y.double() * gy).sum() + (s.double() * gs).sum()).backward()
    out = [y, s] + [None if a is None else a.grad for a in leaves]
    return [None if x is None else x.detach().double() for x in out]


def _check(got, args, ref32=None, factor=4.0):
    """Each of got's quantities within max(factor x the fp32 loop's error, the ulp floor) of the fp64 truth."""
    truth = _run(wkv6_reference, args)
    if ref32 is None:
        ref32 = _run(wkv6_reference, [None if a is None else a.float() for a in args])
    for name, a, t, b in zip(NAMES, got, truth, ref32):
        if t is None:
            assert a is None, name
            continue
        assert a.shape == t.shape and torch.isfinite(a).all(), name
        scale = t.abs().max().item()
        err, err_ref = (a - t).abs().max().item(), (b - t).abs().max().item()
        assert err <= max(factor * err_ref, ULP_FLOOR * scale), f"{name}: error {err:.3g}, fp32 loop {err_ref:.3g}, max {scale:.3g}"


def _cpu32(args):
    return [None if a is None else a.float() for a in args]


@pytest.mark.parametrize("T", [1, 2, 17, 32, 33, 100, 700])
def test_matches_reference_odd_lengths(ext, T):
    """T across the backward's checkpoint segments (every 32 tokens): one
    partial segment, exactly one, one plus a single token, many."""
    args = _inputs(1, T, 2, 16, seed=T)
    _check(_run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args)), args)


@pytest.mark.parametrize("K", [1, 5, 23])
def test_other_checkpoint_intervals(ext, monkeypatch, K):
    """The backward's segments of K tokens: one token each, a ragged last one, exactly T."""
    monkeypatch.setattr(cpu, "CHECKPOINT_EVERY", K)
    args = _inputs(2, 23, 2, 16, seed=30 + K)
    _check(_run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args)), args)


def test_no_checkpoints_without_gradients(ext, monkeypatch):
    """Inference (no_grad, or nothing requires a gradient) writes no state checkpoints."""
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(ext, name)

        def forward(self, *a):
            seen.append(a[-1])
            return ext.forward(*a)

    monkeypatch.setitem(cpu._builds, False, Spy())
    args = _cpu32(_inputs(1, 40, 2, 16, seed=40))
    leaves = [a.clone().requires_grad_(True) for a in args]
    with torch.no_grad():
        wkv6(*leaves, backend="cpu")
    wkv6(*args, backend="cpu")
    wkv6(*leaves, backend="cpu")
    assert seen == [0, 0, cpu.CHECKPOINT_EVERY]


@pytest.mark.parametrize("N", [8, 16, 64])
def test_matches_reference_head_sizes(ext, N):
    args = _inputs(2, 45, 2, N, seed=N)
    _check(_run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args)), args)


@pytest.mark.parametrize("decay", ["near0", "near1", "huge"])
def test_extreme_decays(ext, decay):
    args = _inputs(1, 80, 2, 16, decay, seed=3)
    got = _run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args))
    _check(got, args)


def test_no_state_and_state_untouched(ext):
    """state None = zeros (no gradient slot); a given state is never written."""
    args = _inputs(2, 40, 3, 16, seed=5, state=False)
    _check(_run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args)), args)
    r, k, v, logw, u, s = _cpu32(_inputs(1, 9, 2, 16, seed=6))
    before = s.clone()
    y, st = wkv6(r, k, v, logw, u, s, backend="cpu")
    assert torch.equal(s, before) and st.data_ptr() != s.data_ptr()


def test_split_sequence_carries_state_and_gradients(ext):
    """Two calls with the state carried (gradients flowing back through it) ==
    one call == the reference; the cut falls inside a checkpoint segment."""
    args = _inputs(2, 150, 2, 16, seed=8)

    def split(r, k, v, logw, u, s, cut=61):
        ya, sa = wkv6(r[:, :cut], k[:, :cut], v[:, :cut], logw[:, :cut], u, s, backend="cpu")
        yb, sb = wkv6(r[:, cut:], k[:, cut:], v[:, cut:], logw[:, cut:], u, sa, backend="cpu")
        return torch.cat([ya, yb], 1), sb

    got = _run(split, _cpu32(args))
    _check(got, args)
    one = _run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args))
    for name, a, b in zip(NAMES, got, one):
        # Same fp32 operations up to the cut's order of the du sum and the restart of the checkpoints.
        torch.testing.assert_close(a, b, rtol=0, atol=ULP_FLOOR * b.abs().max().item() * 4, msg=name)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-channel", "per-head"])
def test_rwkv5_broadcast_decay(ext, per_head):
    """RWKV-5 passes -exp(time_decay) [1, 1, H, N or 1] expanded to [B, T, H, N]
    (stride 0): read through its strides, and its gradient is the sum over
    every token and batch row (checked on the base parameter)."""
    B, T, H, N = 2, 70, 2, 16
    r, k, v, _, u, s = _inputs(B, T, H, N, seed=9)
    g = torch.Generator().manual_seed(10)
    d = torch.rand(1, 1, H, 1 if per_head else N, generator=g, dtype=torch.float64) * 6 - 5

    def model(r, k, v, d, u, s):
        logw = (-torch.exp(d)).expand(B, T, H, N)
        return wkv6(r, k, v, logw, u, s, backend="cpu" if r.dtype == torch.float32 else "reference")

    def reference(r, k, v, d, u, s):
        return wkv6_reference(r, k, v, (-torch.exp(d)).expand(B, T, H, N).contiguous(), u, s)

    args = [r, k, v, d, u, s]
    got = _run(model, _cpu32(args))
    truth = _run(reference, args)
    ref32 = _run(reference, _cpu32(args))
    for name, a, t, b in zip(("y", "state", "dr", "dk", "dv", "dd", "du", "dstate"), got, truth, ref32):
        scale = t.abs().max().item()
        # dd sums T * B * N per-token gradients: allow for that many more roundings than one.
        floor = ULP_FLOOR * scale * (B * T if name == "dd" else 1)
        assert (a - t).abs().max().item() <= max(4 * (b - t).abs().max().item(), floor), name
    w = cpu._decay((-torch.exp(d.float())).expand(B, T, H, N))
    assert w.stride()[:2] == (0, 0), "the broadcast decay was materialised over B and T"


def test_bf16_inputs(ext):
    """bf16 r, k, v, logw: computed in fp32 (the reference upcasts the same
    bf16 values), y and the state fp32, gradients bf16 like the inputs."""
    args = [x.to(torch.bfloat16) for x in _inputs(1, 50, 2, 16, seed=11, state=False)[:5]] + [None]
    got = _run(lambda *a: wkv6(*a, backend="cpu"), args)
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    y, st = wkv6(*leaves, backend="cpu")
    assert y.dtype == torch.float32 and st.dtype == torch.float32
    (y.sum() + st.sum()).backward()
    assert all(a.grad.dtype == torch.bfloat16 for a in leaves[:5])
    # Against the fp64 truth on the same (bf16-valued) inputs: fp32 errors, then
    # the gradients' own rounding to bf16 (half an ulp, 2^-9 relative).
    exact = [None if a is None else a.double() for a in args]
    truth = _run(wkv6_reference, exact)
    for name, a, t in zip(NAMES, got, truth):
        if t is None:
            continue
        tol = (2.0**-8 if name.startswith("d") else 0) * t.abs() + ULP_FLOOR * 4 * t.abs().max().item()
        assert ((a - t).abs() <= tol).all(), name


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_every_kernel_family(ext, isa):
    got = ext.set_isa(isa)
    if got != isa:
        ext.set_isa(DEFAULT_ISA)
        # Not a missing package: the CPU lacks the instructions (fine in CI too).
        pytest.skip(f"this CPU does not support kernel family {isa}")
    try:
        name = cpu.ISA_NAMES[isa]
        # N = 64 and 16 run this family (widths 16 / 8 / 1 divide both); N = 8
        # steps down to AVX2 from AVX-512; N = 24 runs AVX2 with 3 vectors per pass.
        assert cpu.plan(64)[0] == name and cpu.plan(16)[0] == name
        assert cpu.plan(8)[0] == ("avx2" if isa == 2 else name)
        for (B, T, H, N), seed in (((1, 40, 1, 64), 20), ((2, 37, 2, 16), 21), ((1, 9, 1, 8), 22), ((1, 35, 1, 24), 23)):
            args = _inputs(B, T, H, N, seed=seed + isa)
            _check(_run(lambda *a: wkv6(*a, backend="cpu"), _cpu32(args)), args)
    finally:
        ext.set_isa(DEFAULT_ISA)


def test_threads_give_identical_results(ext):
    """One task per (batch row, head): the thread count changes nothing, bit for bit."""
    args = _cpu32(_inputs(3, 50, 3, 16, seed=12))
    one = _run(lambda *a: wkv6(*a, backend="cpu"), args)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = _run(lambda *a: wkv6(*a, backend="cpu"), args)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, two):
        assert torch.equal(a, b), name


def test_float64_zero_length_and_bad_inputs(ext):
    """float64 runs the chunked form (in float64); T = 0 returns a copy of the
    state; shape errors name the argument; CPU-only."""
    args = _inputs(1, 20, 2, 8, seed=13)
    y, s = wkv6(*args, backend="cpu")
    y0, s0 = wkv6_chunked(*args)
    assert y.dtype == torch.float64 and torch.equal(y, y0) and torch.equal(s, s0)
    r, k, v, logw, u, st = _cpu32(args)
    y, s = wkv6(r[:, :0], k[:, :0], v[:, :0], logw[:, :0], u, st, backend="cpu")
    assert y.shape == (1, 0, 2, 8) and torch.equal(s, st) and s.data_ptr() != st.data_ptr()
    from rwkvkit.errors import InputShapeError

    with pytest.raises(InputShapeError, match="logw has shape"):
        wkv6(r, k, v, logw[:, :3], u, st, backend="cpu")
    with pytest.raises(RuntimeError, match="w must have r's shape"):
        ext.forward(r, k, v, logw[:, :3].exp(), u, st, 0)


def test_auto_prefers_cpu_and_build_failure_falls_back(ext, monkeypatch):
    assert wkv6_mod.resolve_backend("auto", "cpu") == "cpu"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cpu.get_implementation(force_fail=True) is None
        assert cpu.get_implementation(force_fail=True) is None
    assert len([w for w in record if "C++ WKV-6 kernel" in str(w.message)]) <= 1
    real = cpu.get_implementation
    monkeypatch.setattr(cpu, "get_implementation", lambda: real(force_fail=True))
    monkeypatch.setattr(wkv6_mod._BACKENDS, "cache", {})
    assert wkv6_mod.resolve_backend("cpu", "cpu") == "torch"
    assert wkv6_mod.resolve_backend("auto", "cpu") == "torch"
