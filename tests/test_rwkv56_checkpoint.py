"""RWKV-5 and RWKV-6 checkpoints: rwkv.cpp files (the tiny 5v1 / 5v2 / 6v0
models and their expected logits), the RWKV org's Hugging Face layouts
(Rwkv5ForCausalLM / Rwkv6ForCausalLM), info/convert, state-tuned files and
bad input.

References: rwkv5-7 spec 1, 2.2-2.3, 2.6, 3.1, 5, 7 and 11; shared/data/README.md section 1.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rwkvkit
from rwkvkit import checkpoint, rwkvcpp
from rwkvkit.cli import main
from rwkvkit.errors import CheckpointError, RwkvkitError, ShapeError
from rwkvkit.models import rwkv5_init, rwkv6_init
from rwkvkit.models.rwkv5 import RWKV5Config
from rwkvkit.models.rwkv6 import RWKV6Config
from conftest import shared_file

PROMPT = [34, 105, 110]  # '"in', rwkv.cpp's test prompt (shared/data README 1.4)
DIR = "rwkvcpp/other_versions/"
# (file stem, expected-logits stem, types present, generation as rwkvkit names it, arg-max)
FIXTURES = {
    "5v1": ("tiny-rwkv-5v1-730K", "5v1-730K", ("FP32", "FP16", "Q5_0", "Q5_1"), "5"),
    "5v2": ("tiny-rwkv-5v2-730K", "5v2-730K", ("FP32", "FP16", "Q5_0", "Q5_1"), "5.2"),
    "6v0": ("tiny-rwkv-6v0-3m", "6v0-3m", ("Q5_0", "Q5_1"), "6"),  # FP32/FP16 not in the snapshot
}
CASES = [(m, q) for m, (_, _, types, _) in FIXTURES.items() for q in types]
# rwkv.cpp's reference sums (tests/test_tiny_rwkv.c, shared/data README 1.4, spec 7.3).
REF_SUM = {
    ("5v1", "FP32"): 0.001, ("5v1", "FP16"): -0.289921, ("5v1", "Q5_0"): -163.44, ("5v1", "Q5_1"): -18.02,
    ("5v2", "FP32"): 0.001, ("5v2", "FP16"): 0.455912, ("5v2", "Q5_0"): 25.27, ("5v2", "Q5_1"): 48.07,
    ("6v0", "Q5_0"): -21.151785, ("6v0", "Q5_1"): 3.576909,
}
# Small random models: odd vocab, 3 heads of 16, distinct LoRA ranks (a
# swapped rank or a missed transpose changes a shape).
CFG5 = {
    "5": RWKV5Config(n_layer=2, n_embd=48, vocab_size=37, head_size=16, gate=False, per_channel_decay=False, bonus="time_first"),
    "5.1": RWKV5Config(n_layer=2, n_embd=48, vocab_size=37, head_size=16, gate=True, per_channel_decay=False),
    "5.2": RWKV5Config(n_layer=3, n_embd=48, vocab_size=37, head_size=16),
}
CFG6 = RWKV6Config(n_layer=3, n_embd=64, vocab_size=37, head_size=16, d_mix=8, d_decay=24)


def _path(model: str, qtype: str):
    return shared_file(f"{DIR}{FIXTURES[model][0]}-{qtype}.bin")


def _expected(model: str) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(shared_file(f"{DIR}expected-logits-{FIXTURES[model][1]}.bin"), dtype="<f4"))


def _last_logits(model, tokens=PROMPT):
    """Last-token logits of one sequence call and of a token-by-token run, from the empty state."""
    with torch.no_grad():
        seq, _ = model(torch.tensor([tokens]))
        state = None
        for t in tokens:
            one, state = model(torch.tensor([[t]]), state)
    return seq[0, -1], one[0, -1]


def _same(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _sd(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _random(gen: str, seed: int, dtype=torch.float32) -> dict:
    if gen == "6":
        return rwkv6_init.random_state_dict(CFG6, seed=seed, dtype=dtype)
    return rwkv5_init.random_state_dict(CFG5[gen], seed=seed, dtype=dtype)


# ----------------------------------------------------------- rwkv.cpp files
# Bounds on the logits after '"in' against rwkv.cpp's FP32 output (spec 7.3):
# - FP32: max |d| <= 1e-4 (measured 3.9e-6 for 5v1, 3.0e-6 for 5v2; the spec's
#   float64 reference: 1.6e-6 / 3.1e-6).  rwkv.cpp's v5 GroupNorm eps is 1e-5
#   (spec 3.1, 11.2): with the package's 64e-5 the same files miss by 1.1-1.3.
# - FP16: rwkv.cpp's rule |sum d| <= 1.05 |ref| (ref -0.289921 / +0.455912;
#   measured -0.2897 / +0.1029), and max |d| <= 2^-11 max|logit| sqrt(L): one
#   fp16 rounding of the largest logit per layer, the L per-layer errors
#   adding like independent ones (each sub-layer's input is renormalised by a
#   LayerNorm / GroupNorm, so they do not compound).  5v1: 0.0122, measured
#   4.5e-3; 5v2: 0.0115, measured 2.5e-3.  (RWKV-7's one-rounding bound,
#   3.5e-3 here, is too tight for 12 layers of v5: 5v1 measures 4.5e-3.)
# - Q5_0/Q5_1: rwkv.cpp's own constants include ggml's 8-bit quantisation of
#   the activations inside quantised matmuls, which a float evaluation of the
#   dequantised weights does not do (spec 7.3).  Checked: rwkv.cpp's rule
#   widened by 10%, |sum d| <= 1.15 |ref| (measured ratio 0.85-0.97 for v5;
#   6v0 Q5_0 1.095, Q5_1 0.16), max |d| <= 15% of the expected logits'
#   range (measured 5v1 Q5_0 1.74 of 13.1, the rest <= 0.51), and the arg-max.
#   5v1 Q5_0 is a near tie after quantisation (our top two, 115 and 112,
#   differ by 5e-4): there the expected arg-max must be one of two within 1e-2.
Q5_SUM_SLACK, Q5_RANGE = 1.15, 0.15


@pytest.mark.parametrize("model_name,qtype", CASES)
def test_fixture_matches_rwkvcpp_logits(model_name, qtype):
    stem, _, _, gen = FIXTURES[model_name]
    model = rwkvkit.load(_path(model_name, qtype))
    assert model.config.generation == gen and model.dtype == torch.float32
    # rwkv.cpp's GroupNorm eps: 1e-5 for v5, 64e-5 for v6 (spec 3.1, 7.1).
    assert model.config.group_norm_eps == (64e-5 if gen == "6" else 1e-5)
    expected = _expected(model_name).double()
    top = expected.argmax().item()
    n_layer = model.config.n_layer
    for mode, logits in zip(("sequence", "one token at a time"), _last_logits(model)):
        d = logits.double() - expected
        dmax, dsum = d.abs().max().item(), d.sum().item()
        print(f"{stem} {qtype} {mode}: max |d| {dmax:.3g}, sum {dsum:+.4g} (rwkv.cpp ref {REF_SUM[model_name, qtype]:+g})")
        ref = abs(REF_SUM[model_name, qtype])
        if qtype == "FP32":
            assert dmax <= 1e-4
            assert logits.argmax().item() == top
        elif qtype == "FP16":
            assert abs(dsum) <= 1.05 * ref
            assert dmax <= 2.0**-11 * expected.abs().max().item() * math.sqrt(n_layer)
            assert logits.argmax().item() == top
        else:
            assert abs(dsum) <= Q5_SUM_SLACK * ref
            assert dmax <= Q5_RANGE * (expected.max() - expected.min()).item()
            if (model_name, qtype) == ("5v1", "Q5_0"):
                two = logits.topk(2)
                assert top in two.indices.tolist() and (two.values[0] - logits[top]).item() <= 1e-2
            else:
                assert logits.argmax().item() == top


def test_rwkvcpp_layouts_are_undone():
    """The file's forms (spec 7.1) map to official names, shapes and values by hand."""
    # 5v1 = the package's 5.0: per-head decay as exp(-exp(d)) (H, 1, 1), time_first as exp (H, 1, 1).
    path = _path("5v1", "FP32")
    _, _, raw = rwkvcpp.read_raw(path)
    sd = checkpoint.read(path).tensors
    assert raw["blocks.2.att.time_decay"].shape == (8, 1, 1) and sd["blocks.2.att.time_decay"].shape == (8,)
    w = raw["blocks.2.att.time_decay"].reshape(8).double()
    assert torch.allclose(torch.exp(-torch.exp(sd["blocks.2.att.time_decay"].double())), w, rtol=1e-6, atol=0)
    assert torch.allclose(torch.exp(sd["blocks.2.att.time_first"].double()), raw["blocks.2.att.time_first"].reshape(8).double(), rtol=1e-6)
    assert sd["blocks.2.att.time_mix_k"].shape == (1, 1, 64) and "blocks.2.att.gate.weight" not in sd
    cfg = checkpoint.infer_config(checkpoint.read(path))
    assert (cfg.generation, cfg.n_head, cfg.head_size, cfg.bonus, cfg.dim_ffn) == ("5", 8, 8, "time_first", 256)
    # 5v2: per-channel decay (H, N, 1) as exp(-exp(d)), time_faaaa raw (H, N, 1).
    path = _path("5v2", "FP32")
    _, _, raw = rwkvcpp.read_raw(path)
    sd = checkpoint.read(path).tensors
    assert sd["blocks.4.att.time_decay"].shape == (8, 8) and sd["blocks.4.att.time_faaaa"].shape == (8, 8)
    assert torch.equal(sd["blocks.4.att.time_faaaa"], raw["blocks.4.att.time_faaaa"].reshape(8, 8))
    assert torch.allclose(torch.exp(-torch.exp(sd["blocks.4.att.time_decay"].double())),
                          raw["blocks.4.att.time_decay"].reshape(8, 8).double(), rtol=1e-6, atol=0)
    # 6v0: raw decay (H, N, 1), transposed LoRAs, time_maa_w2 (5, C, D).
    path = _path("6v0", "Q5_1")
    _, records, raw = rwkvcpp.read_raw(path)
    sd = checkpoint.read(path).tensors
    assert torch.equal(sd["blocks.3.att.time_decay"], raw["blocks.3.att.time_decay"].reshape(1, 1, 128))
    assert torch.equal(sd["blocks.3.att.time_faaaa"], raw["blocks.3.att.time_faaaa"].reshape(16, 8))
    assert torch.equal(sd["blocks.3.att.time_maa_w1"], raw["blocks.3.att.time_maa_w1"].T)  # (C, 5 D) = (128, 160)
    assert sd["blocks.3.att.time_maa_w1"].shape == (128, 160)
    assert torch.equal(sd["blocks.3.att.time_maa_w2"], raw["blocks.3.att.time_maa_w2"].transpose(1, 2))
    assert sd["blocks.3.att.time_maa_w2"].shape == (5, 32, 128)
    assert torch.equal(sd["blocks.3.att.time_decay_w1"], raw["blocks.3.att.time_decay_w1"].T)
    assert torch.equal(sd["blocks.3.att.time_decay_w2"], raw["blocks.3.att.time_decay_w2"].T)
    assert sd["blocks.3.att.time_decay_w1"].shape == (128, 64) and sd["blocks.3.att.time_decay_w2"].shape == (64, 128)
    assert sd["blocks.3.att.time_maa_g"].shape == (1, 1, 128) and sd["blocks.3.ffn.time_maa_r"].shape == (1, 1, 128)
    cfg = checkpoint.infer_config(checkpoint.read(path))
    assert (cfg.n_head, cfg.head_size, cfg.d_mix, cfg.d_decay, cfg.dim_ffn) == (16, 8, 32, 64, 448)
    # Types as rwkv.cpp's quantizer chose them: v6's 2-D LoRAs quantised, the 3-D time_maa_w2 not.
    types = {r.name: r.type_name for r in records}
    assert types["blocks.3.att.time_maa_w1"] == types["blocks.3.att.time_decay_w2"] == "Q5_1"
    assert types["blocks.3.att.time_maa_w2"] == types["blocks.3.att.time_decay"] == types["emb.weight"] == "FP32"


def _compare_files(out, ref):
    header, records = rwkvcpp.read_index(out)
    ref_header, ref_records = rwkvcpp.read_index(ref)
    assert header == ref_header and header.version == 101
    assert sorted(r.name for r in records) == sorted(r.name for r in ref_records)
    mine, theirs = np.memmap(out, dtype=np.uint8, mode="r"), np.memmap(ref, dtype=np.uint8, mode="r")
    by_name = {r.name: r for r in ref_records}
    for r in records:
        q = by_name[r.name]
        assert (r.shape, r.type_name) == (q.shape, q.type_name), r.name
        assert np.array_equal(mine[r.offset : r.offset + r.nbytes], theirs[q.offset : q.offset + q.nbytes]), r.name


@pytest.mark.parametrize("model_name,qtype", [(m, q) for m, q in CASES if m != "6v0" and q != "FP32"])
def test_writer_reproduces_rwkvcpp_files(model_name, qtype, tmp_path):
    """FP32 fixture -> convert --type X gives, tensor for tensor, the bytes of
    rwkv.cpp's own X file (its converter's FP16 rule: time_* FP32; its
    quantizer: 2-D matrices only, emb/head FP32; the decays transformed back
    to the same float32 bits)."""
    out = checkpoint.convert(_path(model_name, "FP32"), tmp_path / "out.bin", "rwkvcpp", rwkvcpp_type=qtype)
    _compare_files(out, _path(model_name, qtype))


@pytest.mark.parametrize("model_name,qtype", CASES)
def test_rwkvcpp_round_trips_are_exact(model_name, qtype, tmp_path):
    """.bin -> convert --to rwkvcpp (same type) -> the same file contents;
    .bin -> pth -> .bin the same too (v5 decays are inverted exactly)."""
    src = _path(model_name, qtype)
    ref = _sd(rwkvkit.load(src))
    out = checkpoint.convert(src, tmp_path / "a.bin", "rwkvcpp", rwkvcpp_type=qtype)
    _compare_files(out, src)
    checkpoint.convert(src, tmp_path / "m.pth", "pth")
    back = torch.load(tmp_path / "m.pth", weights_only=True)
    _same(ref, back)
    out = checkpoint.convert(tmp_path / "m.pth", tmp_path / "b.bin", "rwkvcpp", rwkvcpp_type=qtype)
    _compare_files(out, src)


def test_v5_decay_inverse_round_trip():
    """rwkv.cpp stores v5 decays as w = exp(-exp(d)) in float32.  Reading and
    writing again gives the same bits for every d <= 0.5 (w >= 0.19); beyond,
    float32 d cannot reach every float32 w, and the rewritten w is within one
    step of d: e^d |d| 2^-23 of itself."""
    d = torch.linspace(-8, 3, 4001, dtype=torch.float64)
    w = torch.exp(-torch.exp(d)).float()
    raw = {"blocks.0.att.time_decay": w.reshape(-1, 1, 1), "blocks.0.att.time_first": (w + 1).reshape(-1, 1, 1)}
    sd = rwkvcpp.to_official(raw, "5")
    assert sd["blocks.0.att.time_decay"].shape == (4001,)
    back = rwkvcpp.from_official(sd, "5")
    assert back["blocks.0.att.time_decay"].shape == (4001, 1, 1)
    w2 = back["blocks.0.att.time_decay"].reshape(-1)
    slow = d <= 0.5
    assert torch.equal(w2[slow], w[slow])
    rel = ((w2.double() - w.double()).abs() / w.double())[~slow]
    step = (torch.exp(d) * d.abs() * 2.0**-23)[~slow]
    print(f"d > 0.5: {(w2[~slow] == w[~slow]).float().mean().item():.2f} exact, max rel {rel.max().item():.3g}")
    assert (rel <= step).all()
    assert torch.equal(back["blocks.0.att.time_first"].reshape(-1), w + 1)


@pytest.mark.parametrize("gen", ["5", "5.2", "6"])
def test_write_state_dict_rules_for_a_random_model(gen, tmp_path):
    """Generation from the keys; rwkv.cpp's shapes and types; reload exact."""
    sd = _random(gen, seed=2)
    path = tmp_path / "m.bin"
    rwkvcpp.write_state_dict(path, sd, 3 if gen != "5" else 2, "FP16")
    _, records = rwkvcpp.read_index(path)
    rec = {r.name: r for r in records}
    H, N = (4, 16) if gen == "6" else (3, 16)
    assert rec["blocks.1.att.time_decay"].shape == ((H, 1, 1) if gen == "5" else (H, N, 1))
    assert rec["blocks.1.att.time_mix_k" if gen != "6" else "blocks.1.att.time_maa_k"].shape == ((64,) if gen == "6" else (48,))
    for name, r in rec.items():
        want = "FP16" if len(r.shape) >= 2 and ".time_" not in name else "FP32"
        assert r.type_name == want, name
    if gen == "6":
        assert rec["blocks.1.att.time_maa_w1"].shape == (40, 64) and rec["blocks.1.att.time_maa_w2"].shape == (5, 64, 8)
        assert rec["blocks.1.att.time_decay_w1"].shape == (24, 64) and rec["blocks.1.att.time_decay_w2"].shape == (64, 24)
        for q in ("Q5_0", "Q8_0"):
            assert rwkvcpp.tensor_type("blocks.1.att.time_maa_w1", (40, 64), q, "6") == q
            assert rwkvcpp.tensor_type("blocks.1.att.time_maa_w2", (5, 64, 8), q, "6") == "FP32"
    # FP32: the model reads back the same tensors up to the v5 decay transform
    # (float32 exp(-exp(d)) loses bits for slow decays), exact for v6.
    rwkvcpp.write_state_dict(path, sd, 3 if gen != "5" else 2, "FP32", generation=gen)
    back = _sd(rwkvkit.load(path))
    assert set(back) == set(sd)
    for k, v in sd.items():
        if gen != "6" and k.endswith((".time_decay", ".time_first")):
            assert torch.allclose(back[k], v, rtol=1e-5, atol=1e-5), k
        else:
            assert torch.equal(back[k], v), k


def test_rwkv51_is_not_written_as_rwkvcpp(tmp_path):
    """rwkv.cpp has no package-5.1 (gate + per-head decay, spec 1): refused, nothing written."""
    torch.save(_random("5.1", seed=3), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="rwkv.cpp runs RWKV-5 .no gate. and RWKV-5.2, not RWKV-5.1"):
        checkpoint.convert(tmp_path / "m.pth", tmp_path / "m.bin", "rwkvcpp")
    assert not (tmp_path / "m.bin").exists()
    # The other formats take it.
    checkpoint.convert(tmp_path / "m.pth", tmp_path / "kit", "rwkvkit")
    assert rwkvkit.load(tmp_path / "kit").config.generation == "5.1"


def test_rwkvcpp_v5_eps_survives_rwkvkit_folders(tmp_path):
    """A model read from an rwkv.cpp v5 file computes with eps 1e-5; the
    rwkvkit folder keeps it (the package's .pth has no numerics: 64e-5)."""
    src = _path("5v2", "FP32")
    checkpoint.convert(src, tmp_path / "kit", "rwkvkit")
    assert rwkvkit.load(tmp_path / "kit").config.group_norm_eps == 1e-5
    checkpoint.convert(src, tmp_path / "m.pth", "pth")
    assert rwkvkit.load(tmp_path / "m.pth").config.group_norm_eps == 64e-5
    a, b = rwkvkit.load(src), rwkvkit.load(tmp_path / "kit")
    for x, y in zip(_last_logits(a), _last_logits(b)):
        assert torch.equal(x, y)


# ------------------------------------------------------------ Hugging Face
def _hf_tensors(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_hf5_mapping_by_hand(tmp_path):
    """The RWKV org's Rwkv5ForCausalLM names (modeling_rwkv5.py; spec 2.6),
    written out here independently of the code's table."""
    sd = _random("5.2", seed=4)
    torch.save(sd, tmp_path / "m.pth")
    checkpoint.convert(tmp_path / "m.pth", tmp_path / "hf", "hf")
    hf = _hf_tensors(tmp_path / "hf")
    expect = {
        "rwkv.embeddings.weight": sd["emb.weight"],
        "rwkv.blocks.0.pre_ln.weight": sd["blocks.0.ln0.weight"],
        "rwkv.blocks.0.pre_ln.bias": sd["blocks.0.ln0.bias"],
        "rwkv.blocks.2.ln1.bias": sd["blocks.2.ln1.bias"],
        "rwkv.blocks.1.ln2.weight": sd["blocks.1.ln2.weight"],
        "rwkv.blocks.1.attention.time_decay": sd["blocks.1.att.time_decay"],  # (H, N)
        "rwkv.blocks.1.attention.time_faaaa": sd["blocks.1.att.time_faaaa"],
        "rwkv.blocks.1.attention.time_mix_key": sd["blocks.1.att.time_mix_k"],
        "rwkv.blocks.1.attention.time_mix_value": sd["blocks.1.att.time_mix_v"],
        "rwkv.blocks.1.attention.time_mix_receptance": sd["blocks.1.att.time_mix_r"],
        "rwkv.blocks.1.attention.time_mix_gate": sd["blocks.1.att.time_mix_g"],
        "rwkv.blocks.2.attention.gate.weight": sd["blocks.2.att.gate.weight"],
        "rwkv.blocks.2.attention.output.weight": sd["blocks.2.att.output.weight"],
        "rwkv.blocks.2.attention.ln_x.weight": sd["blocks.2.att.ln_x.weight"],
        "rwkv.blocks.0.feed_forward.time_mix_key": sd["blocks.0.ffn.time_mix_k"],
        "rwkv.blocks.0.feed_forward.time_mix_receptance": sd["blocks.0.ffn.time_mix_r"],
        "rwkv.blocks.0.feed_forward.receptance.weight": sd["blocks.0.ffn.receptance.weight"],
        "rwkv.ln_out.weight": sd["ln_out.weight"],
        "head.weight": sd["head.weight"],
    }
    for k, v in expect.items():
        assert hf[k].shape == v.shape and torch.equal(hf[k], v), k
    assert hf["rwkv.blocks.1.attention.time_decay"].shape == (3, 16)
    assert len(hf) == len(sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv5" and cfg["architectures"] == ["Rwkv5ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_size"], cfg["attention_hidden_size"]) == (48, 3, 16, 48)
    assert (cfg["vocab_size"], cfg["intermediate_size"], cfg["layer_norm_epsilon"]) == (37, 160, 1e-5)
    # 1e-5 * 8**2 = 64e-5; Rwkv5ForCausalLM reads num_attention_heads as the head size.
    assert cfg["head_size_divisor"] == 8 and cfg["num_attention_heads"] == 16


def test_hf6_mapping_by_hand(tmp_path):
    """The RWKV org's Rwkv6ForCausalLM names (modeling_rwkv6.py; spec 2.6):
    official parameter names and shapes under rwkv.blocks.{i}.attention / feed_forward."""
    sd = _random("6", seed=5)
    torch.save(sd, tmp_path / "m.pth")
    checkpoint.convert(tmp_path / "m.pth", tmp_path / "hf", "hf")
    hf = _hf_tensors(tmp_path / "hf")
    expect = {
        "rwkv.embeddings.weight": sd["emb.weight"],
        "rwkv.blocks.0.pre_ln.weight": sd["blocks.0.ln0.weight"],
        "rwkv.blocks.2.ln1.weight": sd["blocks.2.ln1.weight"],
        "rwkv.blocks.1.attention.time_maa_x": sd["blocks.1.att.time_maa_x"],
        "rwkv.blocks.1.attention.time_maa_g": sd["blocks.1.att.time_maa_g"],
        "rwkv.blocks.1.attention.time_maa_w1": sd["blocks.1.att.time_maa_w1"],  # (C, 5 D), not transposed
        "rwkv.blocks.1.attention.time_maa_w2": sd["blocks.1.att.time_maa_w2"],  # (5, D, C)
        "rwkv.blocks.2.attention.time_decay": sd["blocks.2.att.time_decay"],  # (1, 1, C_att)
        "rwkv.blocks.2.attention.time_decay_w1": sd["blocks.2.att.time_decay_w1"],
        "rwkv.blocks.2.attention.time_decay_w2": sd["blocks.2.att.time_decay_w2"],
        "rwkv.blocks.2.attention.time_faaaa": sd["blocks.2.att.time_faaaa"],
        "rwkv.blocks.0.attention.gate.weight": sd["blocks.0.att.gate.weight"],
        "rwkv.blocks.0.attention.key.weight": sd["blocks.0.att.key.weight"],
        "rwkv.blocks.0.attention.ln_x.bias": sd["blocks.0.att.ln_x.bias"],
        "rwkv.blocks.1.feed_forward.time_maa_k": sd["blocks.1.ffn.time_maa_k"],
        "rwkv.blocks.1.feed_forward.time_maa_r": sd["blocks.1.ffn.time_maa_r"],
        "rwkv.blocks.1.feed_forward.value.weight": sd["blocks.1.ffn.value.weight"],
        "rwkv.ln_out.bias": sd["ln_out.bias"],
        "head.weight": sd["head.weight"],
    }
    for k, v in expect.items():
        assert hf[k].shape == v.shape and torch.equal(hf[k], v), k
    assert hf["rwkv.blocks.1.attention.time_maa_w1"].shape == (64, 40) and hf["rwkv.blocks.2.attention.time_decay"].shape == (1, 1, 64)
    assert len(hf) == len(sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv6" and cfg["architectures"] == ["Rwkv6ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_size"], cfg["attention_hidden_size"]) == (64, 3, 16, 64)
    assert (cfg["vocab_size"], cfg["intermediate_size"], cfg["layer_norm_epsilon"], cfg["head_size_divisor"]) == (37, 224, 1e-5, 8)
    assert (cfg["time_mix_extra_dim"], cfg["time_decay_extra_dim"]) == (8, 24)


@pytest.mark.parametrize("gen", ["5.2", "6"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_round_trip_is_exact(gen, dtype, tmp_path):
    sd = _random(gen, seed=6, dtype=dtype)
    torch.save(sd, tmp_path / "a.pth")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "hf", "hf")
    assert checkpoint.detect_format(tmp_path / "hf") == "hf"
    model = rwkvkit.load(tmp_path / "hf")
    assert model.config.generation == gen and model.config.group_norm_eps == 64e-5
    checkpoint.convert(tmp_path / "hf", tmp_path / "kit", "rwkvkit")
    checkpoint.convert(tmp_path / "kit", tmp_path / "hf2", "hf")
    checkpoint.convert(tmp_path / "hf2", tmp_path / "b.pth", "pth")
    _same(sd, torch.load(tmp_path / "b.pth", weights_only=True))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()
    # The same model computes the same logits from the .pth and from the folder.
    ref = rwkvkit.load(tmp_path / "a.pth")
    tokens = [5, 17, 30, 3, 3, 12]
    for a, b in zip(_last_logits(model, tokens), _last_logits(ref, tokens)):
        assert torch.equal(a, b)


def test_hf_numerics_and_bad_folders(tmp_path):
    """head_size_divisor gives the GroupNorm eps (rwkv.cpp's v5 1e-5 survives
    as divisor 1); foreign names and 5.0/5.1 models are refused."""
    checkpoint.convert(_path("5v2", "FP32"), tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["head_size_divisor"] == 1 and rwkvkit.load(tmp_path / "hf").config.group_norm_eps == 1e-5
    hf = _hf_tensors(tmp_path / "hf")
    from safetensors.torch import save_file

    def folder(name, tensors, **changes):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({k: v for k, v in {**cfg, **changes}.items() if v is not None}))
        return d

    assert rwkvkit.load(folder("nodiv", hf, head_size_divisor=None)).config.group_norm_eps == 64e-5
    with pytest.raises(CheckpointError, match="unexpected tensors.*rwkv.blocks.0.attention.time_first.*Rwkv5ForCausalLM"):
        rwkvkit.load(folder("extra", dict(hf, **{"rwkv.blocks.0.attention.time_first": torch.zeros(8, 8)})))
    with pytest.raises(CheckpointError, match="head_size_divisor"):
        rwkvkit.load(folder("baddiv", hf, head_size_divisor="eight"))
    for gen in ("5", "5.1"):
        torch.save(_random(gen, seed=7), tmp_path / f"{gen}.pth")
        with pytest.raises(CheckpointError, match=f"Rwkv5ForCausalLM holds RWKV-5.2 only.*not RWKV-{gen}"):
            checkpoint.convert(tmp_path / f"{gen}.pth", tmp_path / f"hf{gen}", "hf")
        assert not (tmp_path / f"hf{gen}").exists()


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "model_name,qtype,heads,ranks,quantised",
    [
        ("5v1", "FP32", "8 x 8 (head_size 8)", None, None),
        ("5v2", "Q5_0", "8 x 8 (head_size 8)", None, 12 * (6 * 64 * 64 + 2 * 256 * 64)),
        ("6v0", "Q5_1", "16 x 8 (head_size 8)", "mix 32, decay 64", 12 * (6 * 128 * 128 + 2 * 448 * 128 + 160 * 128 + 2 * 64 * 128)),
    ],
)
def test_info_rwkv56(model_name, qtype, heads, ranks, quantised, capsys):
    path = _path(model_name, qtype)
    rc, out, err = _run(["info", str(path), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    gen = FIXTURES[model_name][3]
    assert info["generation"] == rwkvkit.models.NICKNAMES[gen] and info["quantization"] == qtype
    C = 128 if gen == "6" else 64
    H, N = (16, 8) if gen == "6" else (8, 8)
    assert (info["layers"], info["n_embd"], info["vocab"], info["head_size"]) == (12, C, 256, N)
    assert info["state_bytes_per_sequence"] == 12 * (2 * C + H * N * N) * 4
    if quantised:
        assert info["tensor_types"][qtype] == quantised
    rc, out, _ = _run(["info", str(path)], capsys)
    assert rc == 0
    rows = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in out.splitlines() if "  " in line}
    assert rows["generation"] == rwkvkit.models.NICKNAMES[gen] and rows["heads"] == heads
    assert rows.get("LoRA ranks") == ranks


@pytest.mark.parametrize("to", ["rwkvkit", "hf", "pth", "safetensors", "rwkvcpp"])
@pytest.mark.parametrize("model_name,qtype", [("5v2", "FP16"), ("6v0", "Q5_0")])
def test_convert_cli_every_target(model_name, qtype, to, tmp_path, capsys):
    src = _path(model_name, qtype)
    dst = tmp_path / ("out" if to in ("rwkvkit", "hf") else "out.file")
    rc, out, err = _run(["convert", str(src), str(dst), "--to", to], capsys)
    assert rc == 0, err
    assert f"({to})" in out and checkpoint.detect_format(dst) == to
    # Values loaded as float32 (rwkv.cpp files compute in fp32) survive exactly.
    _same(_sd(rwkvkit.load(src)), _sd(rwkvkit.load(dst)))


# ---------------------------------------------------------------- bad input
def _write_cpp(path, sd: dict, gen: str, n_layer: int):
    cpp = rwkvcpp.from_official(sd, gen)
    recs = [(k, "FP32", tuple(v.shape), v.float().contiguous().numpy().tobytes()) for k, v in cpp.items()]
    emb = sd["emb.weight"]
    rwkvcpp.write(path, rwkvcpp.Header(101, emb.shape[0], emb.shape[1], n_layer, 0), recs)


def _bad_inputs(tmp_path) -> dict:
    cases = {}
    sd6, sd5 = _random("6", seed=8), _random("5.2", seed=9)
    for gen, sd in (("6", sd6), ("5.2", sd5)):
        torch.save(sd, tmp_path / f"ok{gen}.pth")
        raw = (tmp_path / f"ok{gen}.pth").read_bytes()
        (tmp_path / f"trunc{gen}.pth").write_bytes(raw[: len(raw) // 2])
        cases[f"truncated v{gen} .pth"] = (tmp_path / f"trunc{gen}.pth", CheckpointError, ["truncated or corrupt"])
    for name in ("5v2-730K-Q5_1", "6v0-3m-Q5_0"):
        fixture = shared_file(f"{DIR}tiny-rwkv-{name}.bin").read_bytes()
        (tmp_path / f"trunc-{name}.bin").write_bytes(fixture[: len(fixture) - 1000])
        cases[f"truncated {name}"] = (tmp_path / f"trunc-{name}.bin", CheckpointError, ["truncated", "head.weight"])
    # LoRA ranks that disagree with w1's (D_mix 8, D_decay 24).
    bad = dict(sd6, **{"blocks.1.att.time_maa_w2": torch.zeros(5, 16, 64)})
    torch.save(bad, tmp_path / "w2.pth")
    cases["v6 time_maa_w2 rank"] = (tmp_path / "w2.pth", ShapeError, ["blocks.1.att.time_maa_w2", "(5, 16, 64)", "(5, 8, 64)"])
    bad = dict(sd6, **{"blocks.2.att.time_decay_w2": torch.zeros(32, 64)})
    torch.save(bad, tmp_path / "dw2.pth")
    cases["v6 time_decay_w2 rank"] = (tmp_path / "dw2.pth", ShapeError, ["blocks.2.att.time_decay_w2", "(32, 64)", "(24, 64)"])
    bad = dict(sd6, **{"blocks.1.att.time_decay_w2": torch.zeros(16, 64)})
    _write_cpp(tmp_path / "dw2.bin", bad, "6", 3)
    cases["v6 .bin time_decay_w2 rank"] = (tmp_path / "dw2.bin", ShapeError, ["blocks.1.att.time_decay_w2", "(16, 64)", "(24, 64)"])
    cpp = rwkvcpp.from_official(sd6, "6")
    cpp["blocks.0.att.time_maa_w2"] = torch.zeros(5 * 64, 8)
    recs = [(k, "FP32", tuple(v.shape), v.float().contiguous().numpy().tobytes()) for k, v in cpp.items()]
    rwkvcpp.write(tmp_path / "w2flat.bin", rwkvcpp.Header(101, 37, 64, 3, 0), recs)
    cases["v6 .bin 2-D time_maa_w2"] = (tmp_path / "w2flat.bin", ShapeError, ["blocks.0.att.time_maa_w2", "(320, 8)"])
    # RWKV-5 without its GroupNorm: read as RWKV-4 by the names, named as RWKV-5 missing ln_x.
    # 5.2: an RWKV-5-only name gives it away; 5.0 with time_first has RWKV-4's
    # names, but a per-head time_decay (3,) where RWKV-4 has (C_att,) = (48,).
    for gen, evidence in (("5.2", "'blocks.0.att.gate.weight' with shape (48, 48)"), ("5", "'blocks.0.att.time_decay' with shape (3,)")):
        sd = _random(gen, seed=10)
        miss = {k: v for k, v in sd.items() if ".ln_x." not in k}
        torch.save(miss, tmp_path / f"noln{gen}.pth")
        cases[f"v{gen} without ln_x .pth"] = (
            tmp_path / f"noln{gen}.pth", CheckpointError, ["RWKV-5 checkpoint missing tensor 'blocks.0.att.ln_x.weight'", evidence],
        )
    # rwkv.cpp's 5.0 ("5.1") without ln_x: its (H, 1, 1) decay factor must not
    # be misread as an RWKV-4 decay.
    cpp = rwkvcpp.from_official(_random("5", seed=10), "5")
    recs = [(k, "FP32", tuple(v.shape), v.float().contiguous().numpy().tobytes()) for k, v in cpp.items() if ".ln_x." not in k]
    rwkvcpp.write(tmp_path / "noln.bin", rwkvcpp.Header(101, 37, 48, 2, 0), recs)
    cases["v5 without ln_x .bin"] = (
        tmp_path / "noln.bin", CheckpointError,
        ["RWKV-5 checkpoint missing tensor 'blocks.0.att.ln_x.weight'", "'blocks.0.att.time_decay' with shape (3, 1, 1)"],
    )
    sd = _random("5.2", seed=10)
    # A v5 decay that is not a factor in (0, 1): not an rwkv.cpp v5 file.
    cpp = rwkvcpp.from_official(sd, "5.2")
    cpp["blocks.1.att.time_decay"] = -cpp["blocks.1.att.time_decay"]
    recs = [(k, "FP32", tuple(v.shape), v.float().contiguous().numpy().tobytes()) for k, v in cpp.items()]
    rwkvcpp.write(tmp_path / "negdecay.bin", rwkvcpp.Header(101, 37, 48, 3, 0), recs)
    cases["v5 decay outside (0, 1)"] = (tmp_path / "negdecay.bin", CheckpointError, ["blocks.1.att.time_decay", "outside (0, 1)"])
    # State-tuned files: refused by name.
    tuned = dict(sd6, **{f"blocks.{i}.att.time_state": torch.zeros(4, 16, 16) for i in range(3)})
    torch.save(tuned, tmp_path / "tuned.pth")
    cases["state-tuned v6"] = (tmp_path / "tuned.pth", CheckpointError, ["state-tuned", "'blocks.0.att.time_state'", "(4, 16, 16)"])
    return cases


def test_bad_rwkv56_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    for name, (path, exc, words) in _bad_inputs(tmp_path).items():
        with pytest.raises(exc) as info:
            rwkvkit.load(path)
        msg = str(info.value)
        print(f"{name}: {msg}")
        assert "\n" not in msg, f"{name}: {msg!r}"
        for w in words:
            assert w in msg, f"{name}: {w!r} not in {msg!r}"
        for to, dst in (("rwkvkit", "out"), ("rwkvcpp", "out.bin")):
            rc, out, err = _run(["convert", str(path), str(tmp_path / dst), "--to", to], capsys)
            lines = err.strip().splitlines()
            assert rc == 1 and len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
            assert all(w in lines[0] for w in words), f"{name}: {lines[0]!r}"
        # info reads shapes only: value problems (a decay outside (0, 1)) pass it.
        rc, out, err = _run(["info", str(path)], capsys)
        assert "Traceback" not in err and (rc == 0 if "outside" in name else rc == 1 and len(err.strip().splitlines()) == 1), f"info {name}: {err!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bin").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind


def test_state_of_another_generation_is_refused_by_a_rwkv6_model(tmp_path):
    from rwkvkit.state import MatrixState, State, StateBase

    model = rwkvkit.load(_path("6v0", "Q5_1"))
    State.zeros(12, 1, 128).save(tmp_path / "v4.safetensors")
    MatrixState.zeros(12, 1, 128, 16, 8, "7").save(tmp_path / "v7.safetensors")
    MatrixState.zeros(12, 1, 128, 16, 8, "5.2").save(tmp_path / "v52.safetensors")
    for name, gen in (("v4", "RWKV-4"), ("v7", "RWKV-7"), ("v52", "RWKV-5.2")):
        state = StateBase.load(tmp_path / f"{name}.safetensors")
        with pytest.raises(RwkvkitError) as info:
            model(torch.tensor([[1]]), state)
        msg = str(info.value)
        assert "\n" not in msg and gen in msg and "RWKV-6" in msg, msg
    # Its own state passes, after a save/load too.
    _, own = model(torch.tensor([PROMPT]))
    own.save(tmp_path / "v6.safetensors")
    model.check_state(StateBase.load(tmp_path / "v6.safetensors"))
