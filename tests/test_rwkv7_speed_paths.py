"""RWKV-7's fused C++ RNN step computes the same maths as the PyTorch step.

The fused step (rwkvkit.runtime.infer_cpu, C++ ``step7``) against the model's
own PyTorch RNN step (``decode_backend = "torch"``), for logits and every state
field, over a few hundred greedily generated tokens, batch 1 and 3, fp32 and
int8 weights, every SIMD kernel family the CPU has (AVX2 and scalar forced on
an AVX-512 machine), odd shapes (widths and LoRA ranks that are not multiples
of the vector width, head sizes 8/16/32, layer 0 with and without its unused
v LoRA), and the cases where it must step aside.  Timing lives in
benchmarks/bench_inference.py (``--generation 7``), never here.

Tolerance.  The two paths do the same operations in fp32 and differ only in
the order of the sums: the fused kernels add each dot product in SIMD lanes
then across them, BLAS in its own blocking, and the per-head norms and
GroupNorm statistics (fused: double) in yet another order.  One dot product of
K <= dim_ffn terms then carries about sqrt(K) * 2^-24 of relative rounding in
either order, ~1e-6 here; it passes through the layers and, through the carried
state, to later tokens (it does not pile up over a sequence: each WKV step
multiplies the old state by diag(w) - kappa (alpha kappa)^T with w < 1 and
0 < alpha < 1, a contraction).  Normalisations amplify it: with head size 8
the GroupNorm divides by the spread of 8 numbers, and the PyTorch step's own
fp32 logits are then up to 7e-5 away from the same model in fp64.  So the main
test measures each path against a float64 replay of the same tokens (int8:
the dequantised weights in float64) and requires the fused step's error to be
at most 10x the PyTorch step's own, per output and state field (floor 1e-6);
measured, the ratio is 0.3-5.  The other tests compare the two fp32 paths
directly within 2e-4 (3x the largest fp32 error of the PyTorch step seen
above); a real mistake (a sign, a decay, a swapped head) shows at 1e-2 or more.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from rwkvkit import runtime
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv7 import RWKV7, RWKV7Config
from rwkvkit.runtime import infer_cpu

CONFIGS = {
    # Widths 64/40/96 (40 is no multiple of 16, nor 8 for the LoRA ranks 12/20/4);
    # head sizes 16/8/32; layer 0 with and without its (unused) v LoRA.
    "3x64-h16": RWKV7Config(n_layer=3, n_embd=64, vocab_size=97, head_size=16, d_decay=16, d_aaa=12, d_mv=8, d_gate=24),
    "4x40-h8-no-l0v": RWKV7Config(
        n_layer=4, n_embd=40, vocab_size=61, head_size=8, d_decay=12, d_aaa=8, d_mv=6, d_gate=10, dim_ffn=72,
        layer0_v_lora=False,
    ),
    "2x96-h32": RWKV7Config(n_layer=2, n_embd=96, vocab_size=131, head_size=32, d_decay=8, d_aaa=20, d_mv=4, d_gate=12),
}
ATOL, RTOL = 2e-4, 0.0
STATE_FIELDS = ("att_x", "att_kv", "ffn_x")


@pytest.fixture(scope="module")
def ext():
    mod = infer_cpu.load_extension()
    if mod is None:
        pytest.skip("the fused CPU decoder cannot be built here (no C++ compiler?)")
    yield mod
    mod.set_isa(-1)


def _model(cfg: RWKV7Config, seed: int = 0, int8: bool = False) -> RWKV7:
    m = RWKV7(cfg)
    m.load_state_dict(random_state_dict(cfg, seed=seed))
    m.eval()
    if int8:
        runtime.quantize_int8(m)
    return runtime.accelerate(m)


def _greedy(model, first: torch.Tensor, steps: int, backend: str = "auto", state=None):
    """Greedy generation through the RNN step: tokens [B, steps], logits [B, steps, V], final state."""
    model.decode_backend = backend
    toks, outs = [first], []
    try:
        with torch.no_grad():
            for _ in range(steps):
                o, state = model(toks[-1], state)
                outs.append(o)
                toks.append(o.argmax(-1))
    finally:
        model.decode_backend = "auto"
    return torch.cat(toks[:-1], 1), torch.cat(outs, 1), state


def _replay(model, tokens: torch.Tensor, backend: str, state=None):
    """The same tokens, one at a time, with the given decode backend."""
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


def _assert_same(a, sa, b, sb):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"logits: {m}")
    for name in STATE_FIELDS:
        x, y = getattr(sa, name), getattr(sb, name)
        assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
        torch.testing.assert_close(x, y, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"state field {n}: {m}")


def _first(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, 1), generator=g)


def _check_greedy(model, cfg, B, steps, seed=0):
    tokens, fused, sf = _greedy(model, _first(cfg, B, seed), steps)
    assert model._decode_plan is not None and model._decode_plan.ok, "the fused path did not run"
    plain, sp = _replay(model, tokens, "torch")
    _assert_same(fused, sf, plain, sp)
    return tokens


def _float64_reference(model):
    """A float64 copy running the PyTorch step (int8 layers as their dequantised matrices)."""
    from rwkvkit.runtime.quant import Int8Linear

    ref = copy.deepcopy(model)
    for mod in list(ref.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, Int8Linear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                lin.weight.data = child.dequantize()
                setattr(mod, name, lin)
    ref._decode_plan = None
    return ref.double()


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_equals_torch_step(ext, name, B, int8):
    cfg = CONFIGS[name]
    model = _model(cfg, seed=3, int8=int8)
    tokens = _check_greedy(model, cfg, B, steps=200 if B == 1 else 50, seed=B)
    # Both fp32 paths against float64: the fused one no less accurate than PyTorch's.
    fused, sf = _replay(model, tokens, "auto")
    plain, sp = _replay(model, tokens, "torch")
    exact, se = _replay(_float64_reference(model), tokens, "torch")
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    for what, f, p, e in [("logits", fused, plain, exact)] + [
        (n, getattr(sf, n), getattr(sp, n), getattr(se, n)) for n in STATE_FIELDS
    ]:
        ef, ep = err(f, e), err(p, e)
        assert ef <= 10 * max(ep, 1e-6), f"{what}: fused step {ef:.2e} from float64, PyTorch step {ep:.2e}"


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_every_kernel_family(ext, isa, int8):
    got = ext.set_isa(isa)
    if got != isa:
        ext.set_isa(-1)
        pytest.skip(f"this CPU does not support kernel family {isa}")
    try:
        cfg = CONFIGS["4x40-h8-no-l0v"]
        model = _model(cfg, seed=isa, int8=int8)
        _check_greedy(model, cfg, 3, steps=48, seed=isa)
        cfg = CONFIGS["2x96-h32"]
        model = _model(cfg, seed=isa + 5, int8=int8)
        _check_greedy(model, cfg, 1, steps=64, seed=isa)
    finally:
        ext.set_isa(-1)


def test_continues_a_prompt_state_and_matches_the_parallel_form(ext):
    """From the parallel form's state mid-text, the fused steps continue it like the parallel form."""
    cfg = CONFIGS["3x64-h16"]
    model = _model(cfg, seed=7)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)
    with torch.no_grad():
        full, s_full = model(tokens)
        _, s_head = model(tokens[:, :25])
    fused, sf = _replay(model, tokens[:, 25:], "auto", s_head)
    assert model._decode_plan.ok
    _assert_same(fused, sf, full[:, 25:], s_full)


def test_logits_modes_and_input_state_untouched(ext):
    cfg = CONFIGS["3x64-h16"]
    model = _model(cfg)
    tok = _first(cfg, 3)
    with torch.no_grad():
        _, state = model(torch.randint(0, cfg.vocab_size, (3, 4)))
        before = state.clone()
        full, s1 = model(tok, state)
        last, s2 = model(tok, state, logits="last")
        none, s3 = model(tok, state, logits="none")
    assert model._decode_plan.ok
    assert full.shape == (3, 1, cfg.vocab_size) and full.dtype == torch.float32 and torch.equal(full, last)
    assert none is None
    for name in STATE_FIELDS:
        assert torch.equal(getattr(s1, name), getattr(s2, name)) and torch.equal(getattr(s1, name), getattr(s3, name))
        assert torch.equal(getattr(state, name), getattr(before, name))
    assert s1.generation == "7"


def test_plan_follows_weight_changes(ext):
    """The cached table (and its transposed LoRA copies) notices new weights, in place or replaced."""
    cfg = CONFIGS["2x96-h32"]
    model, other = _model(cfg, seed=1), _model(cfg, seed=2)
    first = _first(cfg, 1)
    _greedy(model, first, 4)
    plan = model._decode_plan
    # In place (load_state_dict copies into the existing storage; the LoRA copies must be redone).
    model.load_state_dict(other.state_dict())
    tokens, fused, sf = _greedy(model, first, 8)
    assert model._decode_plan is not plan
    _assert_same(fused, sf, *_replay(other, tokens, "torch"))
    # A LoRA matrix (held transposed in the plan) edited in place.
    with torch.no_grad():
        for m in (model, other):
            m.blocks[1].att.w1.mul_(-2.0)
            m.blocks[0].att.g2.add_(0.1)
    tokens, fused, sf = _greedy(model, first, 8)
    _assert_same(fused, sf, *_replay(other, tokens, "torch"))
    # A Parameter replaced by a new one.
    new = torch.nn.Parameter(torch.randn_like(model.blocks[1].att.a1))
    model.blocks[1].att.a1 = new
    other.blocks[1].att.a1 = torch.nn.Parameter(new.detach().clone())
    tokens, fused, sf = _greedy(model, first, 8)
    _assert_same(fused, sf, *_replay(other, tokens, "torch"))


def test_steps_aside_for_autograd_other_dtypes_and_large_batches(ext, monkeypatch):
    cfg = CONFIGS["4x40-h8-no-l0v"]
    model = _model(cfg, seed=4)
    tok = _first(cfg, 2)
    # Gradients wanted: the PyTorch step runs and records a graph.
    out, _ = model(tok)
    assert out.requires_grad
    out.sum().backward()
    assert model.blocks[1].att.w1.grad is not None
    assert model._decode_plan is None
    # Float64 weights: no fused kernel (the plan declines), the right answer.
    # bfloat16 ones run fused (tests/test_half_decode.py), within bf16 rounding of fp32.
    with torch.no_grad():
        ref, _ = model(tok)
    for dtype, tol, fused in ((torch.float64, 1e-5, False), (torch.bfloat16, 0.5, True)):
        m = _model(cfg, seed=4).to(dtype)
        with torch.no_grad():
            got, _ = m(tok)
        assert m._decode_plan is not None and m._decode_plan.ok == fused
        assert (got.float() - ref).abs().max().item() < tol
    # Above MAX_BATCH the BLAS (PyTorch) step runs.
    monkeypatch.setattr(infer_cpu, "MAX_BATCH", 1)
    m = _model(cfg, seed=4)
    with torch.no_grad():
        m(tok)
    assert m._decode_plan is None


def test_falls_back_without_the_extension(monkeypatch):
    cfg = CONFIGS["3x64-h16"]
    model = _model(cfg, seed=6)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(infer_cpu, "load_extension", lambda force_fail=False: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, sg = _replay(model, tokens, "auto")
    plain, sp = _replay(model, tokens, "torch")
    assert model._decode_plan is None  # the fused path never ran
    assert torch.equal(got, plain)
    for name in STATE_FIELDS:
        assert torch.equal(getattr(sg, name), getattr(sp, name))


def test_rwkv4_layout_unchanged(ext):
    """The RWKV-4 table and the RWKV-7 table are separate layouts, checked at load."""
    assert ext.layer_slots() == infer_cpu.LAYER_SLOTS
    assert ext.layer_slots7() == infer_cpu.V7_SLOTS == 19 + 14 * 5
