"""The fast inference paths compute the same maths as the plain modules.

The fused C++ RNN step (rwkvkit.infer_cpu) against the PyTorch RNN step of the
same model, for every SIMD kernel family the CPU has, odd shapes (row and
column counts that are not multiples of the vector width, dim_att != n_embd),
batches that do not divide the kernel's batch tile, both numerical switches,
and the cases where it must step aside (autograd, other dtypes, a missing
compiler).  Timing lives in benchmarks/bench_inference.py, never here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkvkit.runtime import infer_cpu
from rwkvkit.models.rwkv4 import RWKV, RWKV4Config
from conftest import DEFAULT_ISA, skip_or_fail
from util import assert_matmul_close, make_model

CONFIGS = [
    RWKV4Config(n_layer=7, n_embd=64, vocab_size=97),
    # 40 and 24 are not multiples of 16 (AVX-512) nor, for 20, of 8 (AVX2).
    RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_att=24, dim_ffn=72),
    RWKV4Config(n_layer=2, n_embd=20, vocab_size=33, dim_ffn=44),
]
IDS = ["L7C64", "L3C40A24F72", "L2C20F44"]
TOL = 1e-5


@pytest.fixture(scope="module")
def ext():
    mod = infer_cpu.load_extension()
    if mod is None:
        skip_or_fail("the fused CPU decoder cannot be built here (no C++ compiler?)")
    yield mod
    mod.set_isa(DEFAULT_ISA)


def _tokens(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def _run(model, tokens, backend, state=None):
    """Token by token through the RNN step with the given decode backend."""
    model.decode_backend = backend
    outs = []
    try:
        with torch.no_grad():
            for t in range(tokens.shape[1]):
                o, state = model(tokens[:, t : t + 1], state)
                outs.append(o)
    finally:
        model.decode_backend = "auto"
    return torch.cat(outs, 1), state


def _float32_drift(model, tokens, state=None, factor=4.0):
    """A logit tolerance for two float32 evaluations of ``model`` that differ
    only in summation order (SIMD width, blocking): ``factor`` times how far
    the plain float32 PyTorch step is from the same step in float64, plus a
    floor of a few float32 ulps of the largest logit.  It scales with the
    model and the rounding, not with one machine's vector width (a fixed 1e-5
    held on AVX-512 and could fail on AVX2 or in a larger model)."""
    import copy

    m64 = copy.deepcopy(model)
    m64.__dict__.pop("_decode_plan", None)
    m64.double()
    s64 = None if state is None else state.to(dtype=torch.float64) if hasattr(state, "to") else state
    ref, _ = _run(m64, tokens, "torch", s64)
    f32, _ = _run(model, tokens, "torch", state)
    drift = (f32.double() - ref).abs().max().item()
    return factor * drift + 8 * 2.0**-24 * ref.abs().max().item()


def _assert_same(a, sa, b, sb, tol=None, model=None, tokens=None):
    if tol is None:
        tol = _float32_drift(model, tokens) if model is not None else TOL
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"logits differ by {diff} (float32 tolerance {tol:.3g})"
    for name, x, y in zip(("att_x", "att_aa", "att_bb", "att_pp", "ffn_x"), sa.tensors(), sb.tensors()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"state field {name}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("B", [1, 6])
def test_fused_step_equals_torch_step(ext, cfg, B):
    model, _ = make_model(cfg, seed=11)
    tokens = _tokens(cfg, B, 9, seed=B)
    fused, sf = _run(model, tokens, "auto")
    plain, sp = _run(model, tokens, "torch")
    assert model._decode_plan is not None and model._decode_plan.ok, "the fused path did not run"
    _assert_same(fused, sf, plain, sp, model=model, tokens=tokens)
    # And the parallel form, from the same carried-in state.
    with torch.no_grad():
        par, spar = model(tokens)
    _assert_same(fused, sf, par, spar, model=model, tokens=tokens)


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_every_kernel_family(ext, isa):
    got = ext.set_isa(isa)
    if got != isa:
        ext.set_isa(DEFAULT_ISA)
        # Not a missing package: the CPU lacks the instructions (fine in CI too).
        pytest.skip(f"this CPU does not support kernel family {isa}")
    try:
        cfg = CONFIGS[1]
        model, _ = make_model(cfg, seed=2)
        tokens = _tokens(cfg, 5, 6)
        fused, sf = _run(model, tokens, "auto")
        plain, sp = _run(model, tokens, "torch")
        _assert_same(fused, sf, plain, sp, model=model, tokens=tokens)
        # The int8 kernel of the same family against the dequantised matrix.
        from rwkvkit.runtime.quant import quantize_weight

        g = torch.Generator().manual_seed(isa)
        for n, k, m in ((37, 40, 1), (5, 19, 7), (64, 48, 16)):
            q, s = quantize_weight(torch.randn(n, k, generator=g))
            x = torch.randn(m, k, generator=g)
            y = infer_cpu.linear(x, q, s)
            assert_matmul_close(y, x, q.double() * s.double()[:, None])
    finally:
        ext.set_isa(DEFAULT_ISA)


@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_row_streams_cover_every_row(ext, isa):
    """The matrix-vector schedule (each thread's stretch of rows read as 8
    interleaved streams, the rows left over one by one, batch tiles of 4)
    writes every output exactly once and right: row counts below, at and
    between multiples of the stream count, 1-3 threads, batches across the
    tile, every weight format, outputs pre-filled with NaN."""
    if ext.set_isa(isa) != isa:
        ext.set_isa(DEFAULT_ISA)
        pytest.skip(f"this CPU does not support kernel family {isa}")
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(7)
    kinds = {0: torch.float32, 1: torch.int8, 2: torch.bfloat16, 3: torch.float16}
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            for n, k in ((1, 5), (7, 33), (8, 16), (9, 64), (17 * 8 + 5, 40), (300, 19), (0, 8)):
                for kind, dtype in kinds.items():
                    w = torch.randn(n, k, generator=g)
                    if kind == 1:
                        w = (w * 40).round().clamp(-127, 127).to(torch.int8)
                        scale = torch.rand(n, generator=g) + 0.5
                    else:
                        w = w.to(dtype)
                        scale = torch.ones(n)
                    exact = w.double() * scale.double()[:, None]
                    for B in (1, 3, 5, 9):
                        x = torch.randn(B, k, generator=g)
                        y = torch.full((B, n), float("nan"))
                        ext.linear(w.data_ptr(), scale.data_ptr(), n, k, kind, x.data_ptr(), B, y.data_ptr())
                        assert not y.isnan().any(), f"rows left unwritten: n={n} k={k} kind={kind} B={B} threads={nt}"
                        if n:
                            assert_matmul_close(y, x, exact)
    finally:
        torch.set_num_threads(threads)
        ext.set_isa(DEFAULT_ISA)


@pytest.mark.parametrize("rescale", [0, 2])
@pytest.mark.parametrize("fold", [None, "bfloat16"])
def test_switches_rescale_and_ln0_fold(ext, rescale, fold):
    cfg = CONFIGS[0]
    model, _ = make_model(cfg, seed=4)
    model.config.rescale_every = rescale
    model.fold_ln0(fold)
    tokens = _tokens(cfg, 2, 5)
    fused, sf = _run(model, tokens, "auto")
    plain, sp = _run(model, tokens, "torch")
    _assert_same(fused, sf, plain, sp, model=model, tokens=tokens)


def test_logits_modes_and_input_state_untouched(ext):
    cfg = CONFIGS[0]
    model, _ = make_model(cfg)
    tok = _tokens(cfg, 3, 1)
    with torch.no_grad():
        _, state = model(_tokens(cfg, 3, 4, seed=9))
        before = state.clone()
        full, s1 = model(tok, state)
        last, s2 = model(tok, state, logits="last")
        none, s3 = model(tok, state, logits="none")
    assert full.shape == (3, 1, cfg.vocab_size) and torch.equal(full, last)
    assert none is None and s1.allclose(s2, rtol=0, atol=0) and s1.allclose(s3, rtol=0, atol=0)
    assert state.allclose(before, rtol=0, atol=0)


def test_plan_follows_weight_changes(ext):
    """The cached pointer table must notice new weights, in place or replaced."""
    cfg = CONFIGS[1]
    model, _ = make_model(cfg, seed=1)
    other, sd2 = make_model(cfg, seed=2)
    tokens = _tokens(cfg, 1, 4)
    _run(model, tokens, "auto")
    # In place (load_state_dict copies into the existing storage).
    model.load_state_dict(sd2)
    _assert_same(*_run(model, tokens, "auto"), *_run(other, tokens, "torch"), model=other, tokens=tokens)
    # A derived value's source edited in place: omega = -exp(time_decay).
    with torch.no_grad():
        model.blocks[1].att.time_decay.add_(0.5)
        other.blocks[1].att.time_decay.add_(0.5)
    _assert_same(*_run(model, tokens, "auto"), *_run(other, tokens, "torch"), model=other, tokens=tokens)
    # A Parameter replaced by a new one.
    new = torch.nn.Parameter(torch.randn_like(model.head.weight))
    model.head.weight = new
    other.head.weight = torch.nn.Parameter(new.detach().clone())
    _assert_same(*_run(model, tokens, "auto"), *_run(other, tokens, "torch"), model=other, tokens=tokens)


def test_steps_aside_for_autograd_and_other_dtypes(ext):
    cfg = CONFIGS[2]
    model, _ = make_model(cfg)
    tok = _tokens(cfg, 2, 1)
    # Gradients wanted: the PyTorch step runs and records a graph.
    out, _ = model(tok)
    assert out.requires_grad
    out.sum().backward()
    assert model.head.weight.grad is not None
    # Float64 weights: no fused kernel, still the right answer.
    m64 = RWKV(cfg)
    m64.load_state_dict(model.state_dict())
    m64.double().eval()
    with torch.no_grad():
        a, _ = m64(tok)
        b, _ = model(tok)
    assert (a - b).abs().max().item() <= _float32_drift(model, tok)  # the fused float32 step, as accurate as PyTorch's


def test_falls_back_without_the_extension(monkeypatch):
    cfg = CONFIGS[0]
    model, _ = make_model(cfg, seed=6)
    tokens = _tokens(cfg, 2, 4)
    with pytest.warns(RuntimeWarning, match="could not build the fused CPU decoder"):
        assert infer_cpu.load_extension(force_fail=True) is None
    monkeypatch.setattr(infer_cpu, "load_extension", lambda force_fail=False: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, sg = _run(model, tokens, "auto")
    plain, sp = _run(model, tokens, "torch")
    _assert_same(got, sg, plain, sp, tol=1e-6)
    assert model._decode_plan is None  # the fused path never ran


def test_large_batches_use_the_blas_path(ext, monkeypatch):
    cfg = CONFIGS[2]
    model, _ = make_model(cfg, seed=3)
    tokens = _tokens(cfg, 3, 3)
    monkeypatch.setattr(infer_cpu, "MAX_BATCH", 2)
    got, sg = _run(model, tokens, "auto")
    assert model._decode_plan is None  # the fused step stepped aside
    monkeypatch.setattr(infer_cpu, "MAX_BATCH", 64)
    fused, sf = _run(model, tokens, "auto")
    assert model._decode_plan is not None
    _assert_same(got, sg, fused, sf, model=model, tokens=tokens)


def test_huge_pages_keep_the_weights(monkeypatch):
    """use_huge_pages rebuilds the pages of big weight tensors in place: same
    address, same values; it is off unless asked for and skips small tensors."""
    import sys
    from pathlib import Path

    w = torch.randn(3000, 1024)  # 12 MB: several 2 MiB pages inside
    small = torch.randn(100, 100)
    before, ptr = w.clone(), w.data_ptr()
    assert infer_cpu.use_huge_pages([w], enabled=False) == 0  # opt-in
    assert infer_cpu.use_huge_pages([small]) == 0
    done = infer_cpu.use_huge_pages([w])
    assert w.data_ptr() == ptr and torch.equal(w, before)
    if done == 0:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        why = "not Linux" if not sys.platform.startswith("linux") else (
            "transparent huge pages are off" if not thp.exists() or "[never]" in thp.read_text()
            else "the kernel refused MADV_COLLAPSE (older than Linux 6.1, or no free huge pages)")
        pytest.skip(why)
    assert done % (2 * 1024 * 1024) == 0 and 0 < done <= w.numel() * 4
