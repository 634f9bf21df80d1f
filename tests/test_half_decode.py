"""Half-precision weights (bf16, fp16) in the fused CPU decoder: what they compute, and how far from fp32.

The fused step (rwkvkit.runtime.infer_cpu) reads a bf16 or fp16 matrix as
stored, 2 bytes per weight, and widens each weight to fp32 in registers (bf16:
a 16-bit shift; fp16: vcvtph2ps / F16C, or a software conversion in the scalar
kernel), exactly: every bf16 and fp16 value is a float.  Activations, sums, the
WKV state and the LayerNorms stay fp32; the per-channel vectors and LayerNorm
parameters of a half model are used through exact fp32 copies, its RWKV-6/7
LoRA matrices as transposed copies in the model's dtype (widened like the rest).

Accuracy, derived and checked here:

1. Kernel (test_kernel_bound): y = x @ W^T with W the stored half matrix,
   up to the fp32 rounding of a K-term dot product in the kernel's order:
   |error| <= (K + 2) * 2^-24 * (|x| @ |W|^T) elementwise (Higham 3.1), the same
   bound the fp32 and int8 kernels meet, for every SIMD family, odd sizes,
   batches up to 64, and fp16 subnormals.  The opt-in AVX512-BF16 mode
   (vdpbf16ps) also rounds x to bf16 (relative error <= 2^-9 per element), so
   its bound is (2^-9 + (K + 2) * 2^-24) * (|x| @ |W|^T).
2. Model (test_half_model_equals_fp32_model_on_the_same_weights): by 1, the
   fused step of a half model is the fp32 model on the half-rounded weights,
   up to fp32 summation order: it must agree with that fp32 model's PyTorch
   step within the tolerances the fp32 fused step meets (RWKV-4 1e-5 on logits,
   RWKV-7 2e-4; derivations in test_speed_paths.py / test_rwkv7_speed_paths.py).
   The AVX512-BF16 mode is measured at ~1e-2 there (it must be no further from
   the fp32 model than PyTorch's own bf16 step, which rounds activations at
   every op), which is why the exact widening is the default: decoding is bound by memory
   bandwidth, and the dot-product form was no faster within the noise here
   (one thread, 169M shape: 52 vs 49 tok/s, fp32 28).
3. Against the original weights (test_greedy_agreement_with_fp32): rounding
   the weights to bf16 is the only loss.  On the shipped Tiny Shakespeare model
   (stored fp16), fp16 decoding is the fp32 model and the 300 greedy tokens are
   identical; bf16 (weights rounded 2^-9) must keep the fp32 model's greedy
   choice on at least 97% of 300 teacher-forced positions.  Measured: 100%, max
   logit error 0.039 (logit std 4.4); PyTorch's own bf16 step, which rounds the
   activations too, 98.7% and 0.081.
4. Against the `rwkv` package (test_against_the_rwkv_package): its "cpu fp32"
   strategy on a bf16 file is the fp32 model on bf16 weights with ln0 folded
   in bf16 (rwkv4-spec 3.2, 3.5), so rwkvkit's bf16 decode with
   fold_ln0("bfloat16") matches it to fp32 summation order; its "cpu bf16" and
   "cpu fp16" strategies also round the activations (and fp16 rescales, spec
   3.4): the measured gaps are asserted as upper bounds, and rwkvkit's half
   decode is the closer of the two to the fp32 model.  Measured (7 x 64 random
   model, 16 tokens, logit std 1.2), max |logit error| against float64 on the
   same weights: rwkvkit bf16 1.1e-6, fp16 9.5e-7; rwkv "cpu fp32" on the
   bf16 file 1.2e-6; rwkv "cpu bf16" 4.2e-2; rwkv "cpu fp16" 5.0e-3.
"""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from conftest import DEFAULT_ISA, importorskip, skip_or_fail
from rwkvkit import runtime
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv4 import RWKV, RWKV4Config
from rwkvkit.models.rwkv7 import RWKV7, RWKV7Config
from rwkvkit.runtime import infer_cpu
from util import assert_matmul_close, make_model, pip_model

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
CFG4 = RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_att=24, dim_ffn=72)
CFG4B = RWKV4Config(n_layer=7, n_embd=64, vocab_size=97)
CFG7 = RWKV7Config(n_layer=4, n_embd=40, vocab_size=61, head_size=8, d_decay=12, d_aaa=8, d_mv=6, d_gate=10, dim_ffn=72)
TOL4, TOL7 = 1e-5, 2e-4


@pytest.fixture(scope="module")
def ext():
    mod = infer_cpu.load_extension()
    if mod is None:
        skip_or_fail("the fused CPU decoder cannot be built here (no C++ compiler?)")
    yield mod
    mod.set_isa(DEFAULT_ISA)
    mod.set_bf16_dot(0)


@pytest.fixture
def isa_mode(ext, request, monkeypatch):
    """Force a kernel family (and, for 'avx512-dot', the AVX512-BF16 mode); skip where the CPU lacks it."""
    name = request.param
    family = ISAS[name.split("-")[0]]
    if ext.set_isa(family) != family:
        ext.set_isa(DEFAULT_ISA)
        pytest.skip(f"this CPU does not support kernel family {name}")
    if name.endswith("-dot") and not ext.set_bf16_dot(1):
        ext.set_isa(DEFAULT_ISA)
        pytest.skip("this CPU has no AVX512-BF16")
    monkeypatch.setattr(infer_cpu, "HALF_SCALAR", True)  # the scalar kernels run too (see HALF_SCALAR)
    yield name
    ext.set_bf16_dot(0)
    ext.set_isa(DEFAULT_ISA)


def _tokens(vocab, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# ------------------------------------------------------------------ kernel
@pytest.mark.parametrize("isa_mode", ["scalar", "avx2", "avx512", "avx512-dot"], indirect=True)
@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_kernel_bound(isa_mode, dtype):
    g = torch.Generator().manual_seed(7)
    dot = isa_mode.endswith("-dot") and dtype == torch.bfloat16
    for n, k, m in ((37, 40, 1), (5, 19, 7), (64, 48, 16), (9, 33, 64), (8, 768, 3), (3, 1, 2)):
        w = torch.randn(n, k, generator=g)
        if dtype == torch.float16:
            w[:, ::5] *= 1e-5  # fp16 subnormals (below 6.1e-5): the conversions must keep them
        wh = w.to(dtype)
        x = torch.randn(m, k, generator=g)
        y = infer_cpu.matvec(x, wh)
        if not dot:
            assert_matmul_close(y, x, wh.double())
        else:
            ref = x.double() @ wh.double().t()
            bound = (2.0**-9 + (k + 2) * 2.0**-24) * (x.double().abs() @ wh.double().abs().t())
            assert ((y.double() - ref).abs() <= bound + 1e-30).all()
    if dtype == torch.float16:
        # Every fp16 bit pattern but NaNs converts like torch (subnormals, infinities, signed zero).
        bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
        bits = bits[~torch.isnan(bits)]
        eye = torch.ones(1, 1)
        got = torch.cat([infer_cpu.matvec(eye, bits[i : i + 1].view(1, 1)) for i in range(0, bits.numel(), 997)])
        want = bits[::997].float().view(-1, 1)
        assert torch.equal(got.view(-1), want.view(-1))


def test_kernel_rejects_mismatch(ext):
    with pytest.raises(ValueError):
        infer_cpu.matvec(torch.randn(2, 4), torch.randn(3, 5).bfloat16())
    with pytest.raises(ValueError):
        infer_cpu.matvec(torch.randn(2, 4), torch.randn(3, 4).double())


# ------------------------------------------------------------------- model
def _rwkv4_pair(cfg, dtype, seed, rescale=0):
    half, sd = make_model(cfg, seed=seed, dtype=dtype)
    ref, _ = make_model(cfg, seed=seed)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in sd.items()})
    half.config.rescale_every = ref.config.rescale_every = rescale
    return half, ref


def _rwkv7_pair(cfg, dtype, seed):
    sd = random_state_dict(cfg, seed=seed)
    half, ref = RWKV7(cfg), RWKV7(cfg)
    half.load_state_dict(sd)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in sd.items()})
    return runtime.accelerate(half.to(dtype).eval()), runtime.accelerate(ref.eval())


def _greedy(model, first, steps, backend="auto"):
    model.decode_backend = backend
    toks, outs, state = [first], [], None
    try:
        with torch.no_grad():
            for _ in range(steps):
                o, state = model(toks[-1], state)
                outs.append(o)
                toks.append(o.argmax(-1))
    finally:
        model.decode_backend = "auto"
    return torch.cat(toks[:-1], 1), torch.cat(outs, 1), state


def _replay(model, tokens, backend):
    model.decode_backend = backend
    outs, state = [], None
    try:
        with torch.no_grad():
            for t in range(tokens.shape[1]):
                o, state = model(tokens[:, t : t + 1], state)
                outs.append(o)
    finally:
        model.decode_backend = "auto"
    return torch.cat(outs, 1), state


def _state_fields(state):
    return state.tensors() if hasattr(state, "att_aa") else (state.att_x, state.att_kv, state.ffn_x)


def _check_pair(half, ref, tokens_first, steps, tol, dot=False):
    tokens, got, sg = _greedy(half, tokens_first, steps)
    assert half._decode_plan is not None and half._decode_plan.ok, "the fused half-precision step did not run"
    want, sw = _replay(ref, tokens, "torch")
    diff = (got - want).abs().max().item()
    if dot:
        # The AVX512-BF16 mode rounds every product's activations to bf16
        # (relative 2^-9), which the network then amplifies like any rounding
        # of its activations; no a-priori bound is tight, so it is held to the
        # standard that rounds them at every op: PyTorch's own bf16 step on the
        # same tokens.  It must be at least as close to the fp32 model (it
        # rounds only the products' inputs).
        torch_half, _ = _replay(half, tokens, "torch")
        tol = max(tol, (torch_half - want).abs().max().item())
    assert diff <= tol, f"logits differ by {diff:.3g} (tolerance {tol:g})"
    for a, b in zip(_state_fields(sg), _state_fields(sw)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol)
    return diff


@pytest.mark.parametrize("isa_mode", ["scalar", "avx2", "avx512", "avx512-dot"], indirect=True)
@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("gen", ["4", "7"])
def test_half_model_equals_fp32_model_on_the_same_weights(isa_mode, dtype, gen):
    dot = isa_mode.endswith("-dot") and dtype == torch.bfloat16
    if gen == "4":
        half, ref = _rwkv4_pair(CFG4, dtype, seed=3)
        for B in (1, 6):
            _check_pair(half, ref, _tokens(CFG4.vocab_size, B, 1, seed=B), 40, TOL4, dot)
    else:
        half, ref = _rwkv7_pair(CFG7, dtype, seed=3)
        for B in (1, 3):
            _check_pair(half, ref, _tokens(CFG7.vocab_size, B, 1, seed=B), 40, TOL7, dot)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_rescale_batch_64_and_the_parallel_form(ext, dtype):
    """fp16's usual rescale_every = 6 (here 2, to cross boundaries), the largest batch the
    decoder serves, and the fused steps continuing a state the parallel form made."""
    half, ref = _rwkv4_pair(CFG4B, dtype, seed=5, rescale=2)
    _check_pair(half, ref, _tokens(CFG4B.vocab_size, infer_cpu.MAX_BATCH, 1, seed=2), 6, TOL4)
    tokens = _tokens(CFG4B.vocab_size, 2, 12, seed=4)
    with torch.no_grad():
        _, s_half = ref(tokens[:, :8])
        full, _ = ref(tokens)
        outs, state = [], s_half
        for t in range(8, 12):
            o, state = half(tokens[:, t : t + 1], state)
            outs.append(o)
    assert half._decode_plan.ok
    assert (torch.cat(outs, 1) - full[:, 8:]).abs().max().item() < 10 * TOL4


def test_plan_follows_in_place_changes_of_half_vectors(ext):
    """The fp32 copies of half vectors are derived values: an in-place change rebuilds the plan."""
    half, ref = _rwkv4_pair(CFG4, torch.bfloat16, seed=8)
    tokens = _tokens(CFG4.vocab_size, 1, 4)
    _replay(half, tokens, "auto")
    with torch.no_grad():
        for m in (half, ref):
            m.blocks[1].ln2.weight.mul_(2.0)  # powers of two: exact in every format
            m.blocks[2].att.time_mix_k.mul_(0.5)
    got, _ = _replay(half, tokens, "auto")
    want, _ = _replay(ref, tokens, "torch")
    assert (got - want).abs().max().item() < TOL4
    half7, ref7 = _rwkv7_pair(CFG7, torch.float16, seed=8)
    _replay(half7, tokens, "auto")
    with torch.no_grad():
        for m in (half7, ref7):
            m.blocks[1].att.k_k.mul_(0.5)
            m.blocks[2].att.w1.mul_(2.0)
            m.ln_out.bias.mul_(-1.0)
    got, _ = _replay(half7, tokens, "auto")
    want, _ = _replay(ref7, tokens, "torch")
    assert (got - want).abs().max().item() < TOL7


def test_no_simd_falls_back_to_the_pytorch_step(ext):
    """Without AVX2/AVX-512 the half model runs PyTorch's own step (faster than scalar C++), and says so."""
    if ext.set_isa(0) != 0:
        pytest.skip("cannot force the scalar family")
    try:
        half, _ = _rwkv4_pair(CFG4, torch.bfloat16, seed=1)
        assert half.decode_kernel.startswith("PyTorch step (bfloat16)") and "AVX2" in half.decode_kernel
        tokens = _tokens(CFG4.vocab_size, 2, 5)
        got, _ = _replay(half, tokens, "auto")
        want, _ = _replay(half, tokens, "torch")
        assert torch.equal(got, want)
        fp32, _ = make_model(CFG4)
        assert fp32.decode_kernel.startswith("fused C++ step: fp32 weights, scalar C++")
    finally:
        ext.set_isa(DEFAULT_ISA)


# ------------------------------------------------- against the original weights
def test_greedy_agreement_with_fp32(ext):
    from rwkvkit.generate import SHIPPED_MODEL

    fp32 = rwkvkit.load(SHIPPED_MODEL, dtype="float32")
    fp16 = rwkvkit.load(SHIPPED_MODEL)  # the file's dtype: fp16
    bf16 = rwkvkit.load(SHIPPED_MODEL, dtype="bfloat16")
    assert fp16.dtype == torch.float16 and bf16.dtype == torch.bfloat16
    first = torch.tensor([[ord("\n")]])
    steps = 300
    ref_tokens, ref_logits, _ = _greedy(fp32, first, steps)
    # fp16 decoding is the fp32 model on the stored weights: the same tokens.
    tokens16, logits16, _ = _greedy(fp16, first, steps)
    assert fp16._decode_plan.ok and torch.equal(tokens16, ref_tokens)
    assert (logits16 - ref_logits).abs().max().item() < 1e-4
    # bf16 rounds the weights: teacher-forced on the fp32 tokens, the greedy choice agrees almost always.
    got, _ = _replay(bf16, ref_tokens, "auto")
    assert bf16._decode_plan.ok
    agree = (got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    err = (got - ref_logits).abs().max().item()
    torch_bf16, _ = _replay(bf16, ref_tokens, "torch")
    agree_torch = (torch_bf16.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    err_torch = (torch_bf16 - ref_logits).abs().max().item()
    print(f"\nbf16 fused: top-1 agreement {agree:.3f}, max |logit diff| {err:.3g}; "
          f"PyTorch bf16 step: {agree_torch:.3f}, {err_torch:.3g} (logit std {ref_logits.std().item():.3g})")
    assert agree >= 0.97
    assert err <= err_torch  # fp32 activations: never worse than the bf16-activation step


# ------------------------------------------------------ against the rwkv package
@pytest.mark.parametrize("name", list(HALF))
def test_against_the_rwkv_package(ext, tmp_path, name):
    importorskip("rwkv")
    dtype = HALF[name]
    cfg = CFG4B
    sd = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed=12).items()}
    rescale = 6 if dtype == torch.float16 else 0  # the package rescales under fp16 strategies (spec 3.4)
    tokens = _tokens(cfg.vocab_size, 1, 16, seed=3)[0].tolist()

    def pip_logits(strategy):
        pm = pip_model(sd, tmp_path, strategy=strategy, name=f"{name}.pth")
        out, state = [], None
        for t in tokens:
            o, state = pm.forward([t], state)
            out.append(o.float())
        return torch.stack(out)

    half, _ = make_model(cfg, seed=0, dtype=dtype)
    half.load_state_dict(sd)
    half.config.rescale_every = rescale
    half.fold_ln0(dtype)  # the package folds ln0 in the file's dtype (spec 3.2 step 3)
    ref = RWKV(cfg)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    ref = runtime.accelerate(ref.double().eval())
    ref.config.rescale_every = rescale
    ref.fold_ln0(dtype)
    ids = torch.tensor([tokens])
    ours, _ = _replay(half, ids, "auto")
    assert half._decode_plan.ok
    exact, _ = _replay(ref, ids, "torch")
    ours, exact = ours[0], exact[0].float()
    pip32 = pip_logits("cpu fp32")
    pip_half = pip_logits(f"cpu {name}")
    d_ours = (ours - exact).abs().max().item()
    d_pip32 = (pip32 - exact).abs().max().item()
    d_pip_half = (pip_half - exact).abs().max().item()
    d_ours_pip_half = (ours - pip_half).abs().max().item()
    print(f"\n{name}: rwkvkit fused vs fp64 on the same weights {d_ours:.2e}; rwkv 'cpu fp32' {d_pip32:.2e}; "
          f"rwkv 'cpu {name}' {d_pip_half:.2e}; rwkvkit vs rwkv 'cpu {name}' {d_ours_pip_half:.2e} "
          f"(logit std {exact.std().item():.3g})")
    if dtype == torch.bfloat16:
        # 'cpu fp32' on the bf16 file is the same maths (fp16 files: its R = 0 differs from ours).
        assert (ours - pip32).abs().max().item() < 1e-4
    assert d_ours < 1e-4
    assert d_ours <= d_pip_half
    # Measured: bf16 4.2e-2, fp16 5.0e-3 (logit std 1.2): the package's rounding of its activations.
    assert d_ours_pip_half < (0.1 if dtype == torch.bfloat16 else 0.02)


# ------------------------------------------------------ loading does the fast thing
def test_load_keeps_bf16_and_decodes_fused(ext, tmp_path):
    cfg = CFG4
    sd = random_state_dict(cfg, seed=21, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "official.pth")
    model = rwkvkit.load(tmp_path / "official.pth")
    assert model.dtype == torch.bfloat16
    if ext.get_isa() > 0:
        assert model.decode_kernel.startswith("fused C++ step: bf16 weights"), model.decode_kernel
        with torch.no_grad():
            model(torch.tensor([[1]]))
        assert model._decode_plan is not None and model._decode_plan.ok
    exact = rwkvkit.load(tmp_path / "official.pth", dtype="float32")
    assert exact.decode_kernel.startswith("fused C++ step: fp32 weights"), exact.decode_kernel
    # Greedy decoding equals the fp32 model on the same (bf16) weights.
    tokens = _tokens(cfg.vocab_size, 1, 1)
    ta, _, _ = _greedy(model, tokens, 60)
    tb, _, _ = _greedy(exact, tokens, 60)
    assert torch.equal(ta, tb)
    # RWKV-7 likewise.
    sd7 = {k: v.bfloat16() for k, v in random_state_dict(CFG7, seed=2).items()}
    torch.save(sd7, tmp_path / "v7.pth")
    m7 = rwkvkit.load(tmp_path / "v7.pth")
    if ext.get_isa() > 0:
        assert m7.decode_kernel.startswith("fused C++ step: bf16 weights"), m7.decode_kernel


def test_info_says_how_it_decodes(ext, tmp_path, capsys):
    from rwkvkit.cli import main

    torch.save(random_state_dict(CFG4, seed=1, dtype=torch.bfloat16), tmp_path / "m.pth")
    assert main(["info", str(tmp_path / "m.pth")]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("decode")]
    assert line, out
    if ext.get_isa() > 0:
        assert "fused C++ step: bf16 weights" in line[0]


def test_cli_load_message_names_the_kernel(ext, tmp_path, capsys, monkeypatch):
    """For a big model (here: any, by lowering the threshold) the CLI says how it decodes, on stderr."""
    from rwkvkit.cli import main
    from rwkvkit.commands import generate as gen_cmd

    sd = random_state_dict(RWKV4Config(n_layer=2, n_embd=32, vocab_size=256), seed=1, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "m.pth")
    monkeypatch.setattr(gen_cmd, "BIG_MODEL_BYTES", 0)
    rc = main(["generate", "--model", str(tmp_path / "m.pth"), "--tokenizer", "bytes", "--max-tokens", "3",
               "--temperature", "0", "--prompt", "hello"])
    err = capsys.readouterr().err
    if rc != 0:
        pytest.skip(f"generate needs other flags here: {err[-300:]}")
    line = [l for l in err.splitlines() if l.startswith("decoding with the ")]
    assert line, err
    if ext.get_isa() > 0:
        assert "fused C++ step: bf16 weights" in line[0]


# ------------------------------------------------------------ half-precision prompts
@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_prompts_without_native_half_matmul_run_in_fp32(ext, dtype, monkeypatch):
    """Where the CPU has no native half matmul, accelerate() makes the half
    model run prompts with fp32 activations (``prompt_dtype``): every product
    widens its weight exactly, so the prompt computes what the fp32 model on
    the same (rounded) weights computes, up to fp32 summation order; training
    and the one-token step keep the half path."""
    monkeypatch.setattr(runtime, "native_half_matmul", lambda dt: False)
    cfg = CFG4B
    sd = random_state_dict(cfg, seed=31)
    plain = RWKV(cfg)
    plain.load_state_dict(sd)
    plain.to(dtype).eval()
    up = runtime.accelerate(copy_of(plain))
    assert "fp32 activations" in up.prompt_matmul and up.prompt_dtype == torch.float32
    assert list(up.state_dict()) == list(plain.state_dict()) and up.dtype == dtype
    lin = up.blocks[0].att.key
    # The mixed product: fp32 activations, widened weight, fp32 result within
    # the fp32 dot-product bound (K + 2) * 2^-24 * sum |x w| of the exact one.
    x = torch.randn(40, cfg.n_embd)
    with torch.no_grad():
        y = lin(x)
    exact = x.double() @ lin.weight.double().t()
    bound = (cfg.n_embd + 2) * 2.0**-24 * (x.double().abs() @ lin.weight.double().abs().t())
    assert y.dtype == torch.float32 and ((y.double() - exact).abs() <= bound + 1e-30).all()
    # Matching dtypes: nn.Linear exactly (training, the half one-token step).
    xh = x.to(dtype)
    assert torch.equal(lin(xh), torch.nn.functional.linear(xh, lin.weight))
    # The prompt equals the fp32 model on the rounded weights up to fp32
    # rounding (through 7 layers and the head: far below any half rounding,
    # which moves these logits by ~1e-2); the plain half model does not.
    ref = RWKV(cfg)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in sd.items()})
    tokens = _tokens(cfg.vocab_size, 1, 48, seed=1)
    with torch.no_grad():
        want, _ = ref.eval()(tokens)
        got, _ = up(tokens)
        base, _ = plain(tokens)
    assert (got - want).abs().max().item() <= 1e-4
    assert (base - want).abs().max().item() > 1e-3
    # Native hardware: the half path.
    monkeypatch.setattr(runtime, "native_half_matmul", lambda dt: True)
    nat = runtime.accelerate(copy_of(plain))
    assert nat.prompt_dtype is None and "native" in nat.prompt_matmul


@pytest.mark.parametrize("gen", ["5", "6", "7"])
def test_fp32_prompt_activations_every_generation(gen):
    """RWKV-5/6/7 with bf16 weights and fp32 prompt activations equal the fp32
    model on the rounded weights (their LoRA matrices and norms follow the
    activations' dtype)."""
    from rwkvkit import models

    cfgs = {
        "5": dict(generation="5", n_layer=2, n_embd=48, vocab_size=61, head_size=16),
        "6": dict(generation="6", n_layer=2, n_embd=48, vocab_size=61, head_size=16, d_mix=4, d_decay=8),
        "7": dict(generation="7", n_layer=2, n_embd=48, vocab_size=61, head_size=16, d_decay=8, d_aaa=8, d_mv=4, d_gate=8),
    }
    cfg = models.config_from_dict(cfgs[gen])
    m = models.build(cfg)
    m.load_state_dict(random_state_dict(cfg, seed=5))
    half = copy_of(m).to(torch.bfloat16).eval()
    ref = copy_of(half).float()
    half.prompt_dtype = torch.float32
    tokens = _tokens(cfg.vocab_size, 2, 33, seed=2)
    with torch.no_grad():
        want, sw = ref(tokens)
        got, sg = half(tokens)
    assert (got - want).abs().max().item() <= 1e-4
    for a, b in zip(sg.tensors(), sw.tensors()):
        assert (a - b).abs().max().item() <= 1e-4


def copy_of(model):
    import copy

    return copy.deepcopy(model)
