"""RWKV-5 (5.0, 5.1, 5.2) and RWKV-6's fused C++ RNN step computes the same maths as the PyTorch step.

The fused step (rwkvkit.runtime.infer_cpu, C++ ``step56`` in csrc/step56.h)
against the model's own PyTorch RNN step (``decode_backend = "torch"``), for
logits and every state field, over 120 greedily generated tokens (batch 1;
40 at batch 3), fp32 and int8 weights, bf16 and fp16 weights, every SIMD kernel
family the CPU has (AVX2 and scalar forced on an AVX-512 machine), odd shapes
(widths that are no multiple of 16, head sizes 8/16/32, dim_att != n_embd,
LoRA ranks that are no multiple of 8), both bonus encodings (``time_first``,
``time_faaaa``), and the cases where it must step aside.  Timing lives in
benchmarks/bench_inference.py (``--generation 5`` / ``6``), never here.

Tolerance.  The two paths do the same operations in fp32 and differ only in
the order of the sums (the fused kernels add each dot product in SIMD lanes
then across them, BLAS in its own blocking; GroupNorm statistics in double
against PyTorch's fp32), which gives each dot product of K <= dim_ffn terms
about sqrt(K) * 2^-24 of relative rounding, ~1e-6 here.  The per-head
GroupNorm amplifies it (head size 8 divides by the spread of 8 numbers), and
the WKV state carries it to later tokens without piling it up (each step
multiplies the old state by diag(w), w < 1).  So the main test measures both
paths against a float64 replay of the same tokens (int8: the dequantised
weights in float64) and requires the fused step's error to be at most 10x the
PyTorch step's own, per output and state field (floor 1e-6).  Measured: the
ratio is 0.4-2.3; the PyTorch step's own fp32 logits were up to 4.3e-4 from
float64 (5.0, head size 8, batch 3), and its WKV state up to 3.1e-6 of the
state's largest entry (the state holds sums of k v^T and reaches a few
hundred).  The other tests compare the two fp32 paths directly within 3x
those: ATOL 1.5e-3 on logits and the token-shift vectors, and the WKV state
within ATOL + KV_REL * max|S|.  A real mistake (a decay, a bonus, a swapped
LoRA block or head) shows at 1e-2 or more.

Half-precision weights: the fused step reads them as stored and widens them
exactly (tests/test_half_decode.py), and RWKV-6's LoRAs run as exact fp32
copies, so a bf16/fp16 model's fused step is the fp32 model on the rounded
weights up to fp32 summation order: it is compared with that fp32 model's
PyTorch step within the same tolerances.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import DEFAULT_ISA, skip_or_fail
from rwkvkit import runtime
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv5 import RWKV5, RWKV5Config
from rwkvkit.models.rwkv6 import RWKV6, RWKV6Config
from rwkvkit.runtime import infer_cpu

C5, C6 = RWKV5Config, RWKV6Config
CONFIGS = {
    # Widths 40/56/64/24/72 (40, 56, 24 and 72 are no multiple of 16), head sizes 8/16/32,
    # dim_att 32 < n_embd 56 and 64 < 72, LoRA ranks 6/10 and 12/20 (no multiple of 8).
    "5.0-first-3x40-h8": C5(n_layer=3, n_embd=40, vocab_size=61, head_size=8, dim_ffn=72, gate=False,
                            per_channel_decay=False, bonus="time_first"),
    "5.1-faaaa-2x56-h16-att32": C5(n_layer=2, n_embd=56, vocab_size=97, head_size=16, dim_att=32, dim_ffn=100,
                                   gate=True, per_channel_decay=False, bonus="time_faaaa"),
    "5.2-first-2x64-h32": C5(n_layer=2, n_embd=64, vocab_size=89, head_size=32, dim_ffn=136, bonus="time_first"),
    "5.2-faaaa-3x24-h8": C5(n_layer=3, n_embd=24, vocab_size=53, head_size=8, dim_ffn=40),
    "6-3x40-h8": C6(n_layer=3, n_embd=40, vocab_size=61, head_size=8, dim_ffn=72, d_mix=6, d_decay=10),
    "6-2x72-h32-att64": C6(n_layer=2, n_embd=72, vocab_size=131, head_size=32, dim_att=64, dim_ffn=136,
                           d_mix=12, d_decay=20),
}
ATOL, KV_REL = 1.5e-3, 1e-5
STATE_FIELDS = ("att_x", "att_kv", "ffn_x")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
KIND_CODES = {"fp32": 0, "int8": 1, "bf16": 2, "fp16": 3}  # the C++ kernel kinds


@pytest.fixture(scope="module")
def ext():
    mod = infer_cpu.load_extension()
    if mod is None:
        skip_or_fail("the fused CPU decoder cannot be built here (no C++ compiler?)")
    yield mod
    mod.set_isa(DEFAULT_ISA)


def _cls(cfg):
    return RWKV6 if cfg.generation == "6" else RWKV5


def _model(cfg, seed: int = 0, int8: bool = False, dtype: torch.dtype | None = None):
    m = _cls(cfg)(cfg)
    m.load_state_dict(random_state_dict(cfg, seed=seed))
    m.eval()
    if dtype is not None:
        m = m.to(dtype)
    if int8:
        runtime.quantize_int8(m)
    return runtime.accelerate(m)


def _rounded_fp32(cfg, seed: int, dtype: torch.dtype):
    """The fp32 model on the weights rounded to ``dtype``: what the half model's fused step computes."""
    m = _cls(cfg)(cfg)
    m.load_state_dict({k: v.to(dtype).float() for k, v in random_state_dict(cfg, seed=seed).items()})
    return runtime.accelerate(m.eval())


def _greedy(model, first: torch.Tensor, steps: int):
    """Greedy generation through the (fused) RNN step: tokens [B, steps], logits [B, steps, V], final state."""
    toks, outs, state = [first], [], None
    with torch.no_grad():
        for _ in range(steps):
            o, state = model(toks[-1], state)
            outs.append(o)
            toks.append(o.argmax(-1))
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
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0.0, msg=lambda m: f"logits: {m}")
    assert sa.generation == sb.generation
    for name in STATE_FIELDS:
        x, y = getattr(sa, name), getattr(sb, name)
        assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
        tol = ATOL + (KV_REL * y.abs().max().item() if name == "att_kv" else 0.0)
        torch.testing.assert_close(x, y, atol=tol, rtol=0.0, msg=lambda m, n=name: f"state field {n}: {m}")


def _first(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, 1), generator=g)


def _check_greedy(model, cfg, B, steps, seed=0, ref=None):
    """Greedy tokens through the fused step, then the PyTorch step of ``ref``
    (default: the model itself) on the same tokens; returns the fused run."""
    tokens, fused, sf = _greedy(model, _first(cfg, B, seed), steps)
    assert model._decode_plan is not None and model._decode_plan.ok, "the fused path did not run"
    plain, sp = _replay(ref if ref is not None else model, tokens, "torch")
    _assert_same(fused, sf, plain, sp)
    return tokens, fused, sf, plain, sp


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
    tokens, fused, sf, plain, sp = _check_greedy(model, cfg, B, steps=120 if B == 1 else 40, seed=B)
    assert sf.generation == cfg.generation
    # Both fp32 paths against float64: the fused one no less accurate than PyTorch's.
    exact, se = _replay(_float64_reference(model), tokens, "torch")
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    for what, f, p, e in [("logits", fused, plain, exact)] + [
        (n, getattr(sf, n), getattr(sp, n), getattr(se, n)) for n in STATE_FIELDS
    ]:
        ef, ep = err(f, e), err(p, e)
        assert ef <= 10 * max(ep, 1e-6), f"{what}: fused step {ef:.2e} from float64, PyTorch step {ep:.2e}"


@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16", "fp16"])
@pytest.mark.parametrize("isa", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_every_kernel_family(ext, isa, kind, monkeypatch):
    got = ext.set_isa(isa)
    if got != isa:
        ext.set_isa(DEFAULT_ISA)
        pytest.skip(f"this CPU does not support kernel family {isa}")
    monkeypatch.setattr(infer_cpu, "HALF_SCALAR", True)  # the scalar kernels run half weights too
    try:
        # Ungated 5.0 with per-head decay, gated 5.1 with dim_att < n_embd, RWKV-6 with odd LoRA ranks.
        for seed, name in enumerate(("5.0-first-3x40-h8", "5.1-faaaa-2x56-h16-att32", "6-3x40-h8")):
            cfg = CONFIGS[name]
            if kind in HALF:
                model = _model(cfg, seed=isa + seed, dtype=HALF[kind])
                ref = _rounded_fp32(cfg, isa + seed, HALF[kind])
            else:
                model, ref = _model(cfg, seed=isa + seed, int8=kind == "int8"), None
            _check_greedy(model, cfg, 3, steps=24, seed=isa, ref=ref)
            assert model._decode_plan.kinds == {KIND_CODES[kind]}
    finally:
        ext.set_isa(DEFAULT_ISA)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("name", ["5.2-first-2x64-h32", "6-2x72-h32-att64"])
def test_half_weights_are_the_fp32_model_on_rounded_weights(ext, name, dtype, monkeypatch):
    monkeypatch.setattr(infer_cpu, "HALF_SCALAR", True)  # also under RWKVKIT_TEST_ISA=scalar
    cfg = CONFIGS[name]
    model = _model(cfg, seed=11, dtype=dtype)
    assert model.decode_kernel.startswith(f"fused C++ step: {'bf16' if dtype == torch.bfloat16 else 'fp16'} weights")
    _check_greedy(model, cfg, 1, steps=100, seed=2, ref=_rounded_fp32(cfg, 11, dtype))


def test_continues_a_prompt_state_and_matches_the_parallel_form(ext):
    """From the parallel form's state mid-text, the fused steps continue it like the parallel form."""
    for name in ("5.2-faaaa-3x24-h8", "6-2x72-h32-att64"):
        cfg = CONFIGS[name]
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
    cfg = CONFIGS["6-3x40-h8"]
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
    assert s1.generation == "6"


def test_plan_follows_weight_changes(ext):
    """The cached table, its transposed LoRA copies and RWKV-5's precomputed
    decay and bonus notice new weights, in place or replaced."""
    for name, edits in (
        ("6-2x72-h32-att64", (("time_maa_w1", 1, lambda t: t.mul_(-2.0)), ("time_maa_w2", 0, lambda t: t[3].add_(0.2)),
                              ("time_decay_w1", 1, lambda t: t.mul_(1.5)), ("time_decay_w2", 0, lambda t: t.add_(0.1)))),
        ("5.2-first-2x64-h32", (("time_decay", 1, lambda t: t.sub_(1.0)), ("time_first", 0, lambda t: t.add_(0.5)))),
        ("5.0-first-3x40-h8", (("time_decay", 2, lambda t: t.add_(1.0)), ("time_first", 1, lambda t: t.mul_(0.5)))),
    ):
        cfg = CONFIGS[name]
        model, other = _model(cfg, seed=1), _model(cfg, seed=2)
        first = _first(cfg, 1)
        _greedy(model, first, 4)
        plan = model._decode_plan
        # In place (load_state_dict copies into the existing storage; the derived copies must be redone).
        model.load_state_dict(other.state_dict())
        tokens, fused, sf = _greedy(model, first, 8)
        assert model._decode_plan is not plan
        _assert_same(fused, sf, *_replay(other, tokens, "torch"))
        # One derived source at a time edited in place: the plan must follow each.
        for attr, layer, edit in edits:
            with torch.no_grad():
                for m in (model, other):
                    edit(getattr(m.blocks[layer].att, attr))
            plan = model._decode_plan
            tokens, fused, sf = _greedy(model, first, 8)
            assert model._decode_plan is not plan, attr
            _assert_same(fused, sf, *_replay(other, tokens, "torch"))
    # A Parameter replaced by a new one.
    cfg = CONFIGS["6-3x40-h8"]
    model, other = _model(cfg, seed=1), _model(cfg, seed=1)
    first = _first(cfg, 1)
    _greedy(model, first, 2)
    new = torch.nn.Parameter(torch.randn_like(model.blocks[1].att.time_decay_w2))
    model.blocks[1].att.time_decay_w2 = new
    other.blocks[1].att.time_decay_w2 = torch.nn.Parameter(new.detach().clone())
    tokens, fused, sf = _greedy(model, first, 8)
    _assert_same(fused, sf, *_replay(other, tokens, "torch"))


def test_steps_aside_where_it_cannot_serve(ext, monkeypatch):
    cfg = CONFIGS["6-3x40-h8"]
    model = _model(cfg, seed=4)
    tok = _first(cfg, 2)
    # Gradients wanted: the PyTorch step runs and records a graph.
    out, _ = model(tok)
    assert out.requires_grad
    out.sum().backward()
    assert model.blocks[1].att.time_maa_w1.grad is not None
    assert model._decode_plan is None
    with torch.no_grad():
        ref, sref = model(tok)
    assert model._decode_plan.ok
    # Float64 weights: no fused kernel (the plan declines), the right answer.
    m = _model(cfg, seed=4).double()
    with torch.no_grad():
        got, _ = m(tok)
    assert m._decode_plan is not None and not m._decode_plan.ok
    assert (got - ref).abs().max().item() < 1e-4
    # A projection with a bias (no RWKV layer has one): declined, and the bias is used.
    m = _model(cfg, seed=4)
    lin = torch.nn.Linear(cfg.n_embd, cfg.dim_att, bias=True)
    with torch.no_grad():
        lin.weight.copy_(m.blocks[0].att.key.weight)
        lin.bias.fill_(0.25)
    m.blocks[0].att.key = lin
    with torch.no_grad():
        got, _ = m(tok)
        m.decode_backend = "torch"
        want, _ = m(tok)
    assert not m._decode_plan.ok
    assert torch.equal(got, want) and (got - ref).abs().max().item() > 1e-3
    # Above MAX_BATCH the BLAS (PyTorch) step runs.
    monkeypatch.setattr(infer_cpu, "MAX_BATCH", 1)
    m = _model(cfg, seed=4)
    with torch.no_grad():
        m(tok)
    assert m._decode_plan is None


def test_falls_back_without_the_extension(monkeypatch):
    cfg = CONFIGS["5.1-faaaa-2x56-h16-att32"]
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


def test_describe_and_layout(ext, monkeypatch):
    monkeypatch.setattr(infer_cpu, "HALF_SCALAR", True)  # also under RWKVKIT_TEST_ISA=scalar
    assert ext.layer_slots56() == infer_cpu.V56_SLOTS == 16 + 12 * 5
    for name, cfg in CONFIGS.items():
        assert _model(cfg).decode_kernel.startswith("fused C++ step: fp32 weights"), name
        assert _model(cfg, int8=True).decode_kernel.startswith("fused C++ step: int8 weights"), name
    for gen in ("5", "6"):
        assert infer_cpu.describe_checkpoint(gen, torch.bfloat16).startswith("fused C++ step: bf16 weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_lora_copies_keep_the_models_dtype(ext, dtype, monkeypatch):
    """RWKV-6 and RWKV-7 LoRAs are read in the model's dtype (2 bytes a weight
    in a half model), fp32 in an fp32 or int8 model; whether that computes the
    right thing is the half tests' job (above, and tests/test_half_decode.py)."""
    from rwkvkit.models.rwkv7 import RWKV7, RWKV7Config

    monkeypatch.setattr(infer_cpu, "HALF_SCALAR", True)
    cfg7 = RWKV7Config(n_layer=2, n_embd=40, vocab_size=61, head_size=8, d_decay=12, d_aaa=8, d_mv=6, d_gate=10)
    m7 = RWKV7(cfg7)
    m7.load_state_dict(random_state_dict(cfg7, seed=0))
    m7 = runtime.accelerate(m7.eval().to(dtype))
    cases = [(m7, infer_cpu.V7_VECTORS, infer_cpu.V7_LINEARS, ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")),
             (_model(CONFIGS["6-3x40-h8"], dtype=dtype), infer_cpu.V56_VECTORS, infer_cpu.V56_LINEARS,
              ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"))]
    for model, vectors, linears, loras in cases:
        plan = infer_cpu.plan_for(model)
        assert plan is not None
        for name in loras:
            j = len(vectors) + 5 * linears.index(name)
            ptrs, kinds = plan.table[:, j].tolist(), plan.table[:, j + 4].tolist()
            # RWKV-7's layer 0 has no value-residual LoRA (null entry).
            assert all(k == KIND_CODES[{torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]]
                       for p, k in zip(ptrs, kinds) if p), (name, kinds)
            copies = [t for t in plan.keep if t.data_ptr() in ptrs]
            assert copies and all(t.dtype == dtype and t.is_contiguous() for t in copies), name
    # int8 quantises only the projections: the LoRAs stay fp32 there.
    if dtype == torch.float32:
        m = _model(CONFIGS["6-3x40-h8"], int8=True)
        plan = infer_cpu.plan_for(m)
        j = len(infer_cpu.V56_VECTORS) + 5 * infer_cpu.V56_LINEARS.index("time_maa_w1")
        assert set(plan.table[:, j + 4].tolist()) == {0} and plan.kinds == {1}
