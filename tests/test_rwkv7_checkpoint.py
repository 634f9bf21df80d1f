"""RWKV-7 checkpoints: rwkv.cpp files (its tiny 7v0 model and expected logits),
fla's Hugging Face layout, the info/convert CLI, and bad input.

References: rwkv5-7 spec 2.4-2.7 and 7; shared/data/README.md section 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rwkvkit
from rwkvkit import checkpoint, rwkvcpp
from rwkvkit.cli import main
from rwkvkit.errors import CheckpointError, RwkvkitError, ShapeError
from rwkvkit.models.rwkv7 import RWKV7Config
from rwkvkit.models.rwkv7_init import random_state_dict
from conftest import shared_file

PROMPT = [34, 105, 110]  # '"in', rwkv.cpp's test prompt (shared/data README 1.4)
FIX = "rwkvcpp/other_versions/tiny-rwkv-7v0-834K-{}.bin"
TYPES = ("FP32", "FP16", "Q5_0", "Q5_1")
# Small but complete: 2 heads, distinct LoRA ranks, so a swapped rank or a
# missed transpose changes a shape.
CFG = RWKV7Config(n_layer=3, n_embd=64, vocab_size=97, head_size=32, d_decay=32, d_aaa=64, d_mv=32, d_gate=96)


def _expected() -> torch.Tensor:
    return torch.from_numpy(np.fromfile(shared_file("rwkvcpp/other_versions/expected-logits-7v0-834K.bin"), dtype="<f4"))


def _last_logits(model, tokens=PROMPT):
    """Last-token logits of one sequence call and of a token-by-token run, from the empty state."""
    with torch.no_grad():
        seq, _ = model(torch.tensor([tokens]))
        state = None
        for t in tokens:
            one, state = model(torch.tensor([[t]]), state)
    return seq[0, -1], one[0, -1]


def _same(a: dict, b: dict, skip=()):
    assert set(a) - set(skip) == set(b) - set(skip)
    for k in set(a) - set(skip):
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def _sd(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------- rwkv.cpp files
# Bounds on the logits after '"in' against rwkv.cpp's FP32 output (spec 7.3):
# - FP32: max |d| <= 1e-4 (the spec's float64 reference: 3.7e-7).
# - FP16: rwkv.cpp's own rule |sum d| <= 1.05 * |0.005766|, and max |d| <= one
#   fp16 rounding (2^-11 relative) of the largest logit (2.615 -> 1.3e-3).
#   FP16 storage moves each weight by at most 2^-11 of itself; with every
#   sub-layer's input renormalised by a LayerNorm / GroupNorm the error does
#   not compound with depth, so the logits move by about one such rounding of
#   their own size, not more.  rwkv.cpp's tolerance (total 6e-3 summed over
#   256 logits) also covers its fp16 activations, which we do not have.
# - Q5_0/Q5_1: rwkv.cpp's constants include ggml's 8-bit quantisation of the
#   activations, which a float evaluation of the dequantised weights does not
#   reproduce (spec 7.3: -0.073 here vs rwkv.cpp's -0.065 for Q5_1), so the
#   check is the arg-max (32, ' ') and a loose bound: max |d| <= 0.02 (under
#   0.5% of the logits' range 4.2; measured 4e-3) and |sum d| <= 0.15 (about
#   twice rwkv.cpp's own Q5_1 deviation; measured 0.075).
FP16_SUM_REF = 0.005766
Q5_MAX, Q5_SUM = 0.02, 0.15


@pytest.mark.parametrize("qtype", TYPES)
def test_7v0_matches_rwkvcpp_logits(qtype):
    model = rwkvkit.load(shared_file(FIX.format(qtype)))
    assert isinstance(model, rwkvkit.RWKV7) and model.dtype == torch.float32
    expected = _expected()
    for mode, logits in zip(("sequence", "one token at a time"), _last_logits(model)):
        d = logits.double() - expected.double()
        dmax, dsum = d.abs().max().item(), d.sum().item()
        print(f"7v0 {qtype} {mode}: max |d| {dmax:.3g}, sum {dsum:+.3g}")
        assert logits.argmax().item() == expected.argmax().item() == 32
        if qtype == "FP32":
            assert dmax <= 1e-4
        elif qtype == "FP16":
            assert abs(dsum) <= 1.05 * FP16_SUM_REF
            assert dmax <= 2.0**-11 * expected.abs().max().item()
        else:
            assert dmax <= Q5_MAX and abs(dsum) <= Q5_SUM


def test_7v0_layout_is_undone():
    """The file's forms (spec 7.1) map to official names and shapes by hand."""
    path = shared_file(FIX.format("FP32"))
    _, records, raw = rwkvcpp.read_raw(path)
    assert "blocks.0.att.x_rwkvag" in raw and "blocks.0.att.v1" not in raw and "blocks.1.att.v1" in raw
    assert raw["blocks.3.att.x_rwkvag"].shape == (6, 1, 64) and raw["blocks.3.att.w1"].shape == (32, 64)
    ck = checkpoint.read(path)
    sd = ck.tensors
    for i, m in enumerate("rwkvag"):
        assert sd[f"blocks.3.att.x_{m}"].shape == (1, 1, 64)
        assert torch.equal(sd[f"blocks.3.att.x_{m}"].reshape(-1), raw["blocks.3.att.x_rwkvag"][i, 0])
    for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
        assert torch.equal(sd[f"blocks.3.att.{name}"], raw[f"blocks.3.att.{name}"].T)
    assert sd["blocks.3.att.w1"].shape == (64, 32) and sd["blocks.3.att.w2"].shape == (32, 64)
    assert sd["blocks.3.att.r_k"].shape == (1, 64) and sd["blocks.3.ffn.x_k"].shape == (1, 1, 64)
    cfg = checkpoint.infer_config(ck)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.n_head, cfg.dim_ffn) == (12, 64, 256, 64, 1, 256)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate, cfg.layer0_v_lora) == (32, 32, 32, 32, False)
    assert cfg.group_norm_eps == 64e-5  # rwkv.cpp's RWKV-7 GroupNorm eps (spec 7.1)


@pytest.mark.parametrize("qtype", TYPES)
def test_writer_reproduces_rwkvcpp_files(qtype, tmp_path):
    """FP32 fixture -> convert --type X gives, tensor for tensor, the bytes of
    rwkv.cpp's own X file: its converter's FP16 rule (LoRAs FP16, the
    vectors/x_rwkvag/r_k FP32) and its quantizer's choice (LoRAs, r_k, emb,
    head stay FP32)."""
    src = shared_file(FIX.format("FP32"))
    ref = shared_file(FIX.format(qtype))
    out = checkpoint.convert(src, tmp_path / "out.bin", "rwkvcpp", rwkvcpp_type=qtype)
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


def test_rwkvcpp_round_trips_are_exact(tmp_path):
    """rwkv.cpp -> rwkv.cpp, and through pth / rwkvkit / safetensors and back: identical tensors."""
    src = shared_file(FIX.format("FP32"))
    ref = _sd(rwkvkit.load(src))
    checkpoint.convert(src, tmp_path / "a.bin", "rwkvcpp")
    _same(ref, _sd(rwkvkit.load(tmp_path / "a.bin")))
    for to, name in (("pth", "m.pth"), ("rwkvkit", "kit"), ("safetensors", "m.safetensors")):
        checkpoint.convert(src, tmp_path / name, to)
        assert checkpoint.detect_format(tmp_path / name) == to
        _same(ref, _sd(rwkvkit.load(tmp_path / name)))
        checkpoint.convert(tmp_path / name, tmp_path / f"{name}.bin", "rwkvcpp")
        assert (tmp_path / f"{name}.bin").read_bytes() == (tmp_path / "a.bin").read_bytes(), name
    # The safetensors file holds the official names and shapes.
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_slice("blocks.1.att.x_k").get_shape() == [1, 1, 64]
        assert f.get_slice("blocks.1.att.w1").get_shape() == [64, 32]


def test_write_state_dict_rules_for_a_random_model(tmp_path):
    """Generation from the keys; layer 0's v LoRA left out (unused; absent in
    rwkv.cpp's files); types per spec 7.1; reload gives the same model and logits."""
    sd = random_state_dict(CFG, seed=2)
    assert "blocks.0.att.v1" in sd
    path = tmp_path / "m.bin"
    rwkvcpp.write_state_dict(path, sd, CFG.n_layer, "FP16")  # no generation given: detected
    header, records = rwkvcpp.read_index(path)
    types = {r.name: r.type_name for r in records}
    assert header.version == 101 and header.data_type == 1
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(types) and "blocks.1.att.v1" in types
    for n in ("emb.weight", "head.weight", "blocks.1.att.w1", "blocks.1.att.g2", "blocks.2.att.key.weight", "blocks.2.ffn.value.weight"):
        assert types[n] == "FP16", n
    for n in ("blocks.1.att.x_rwkvag", "blocks.1.att.w0", "blocks.1.att.a0", "blocks.1.att.v0", "blocks.1.att.k_k",
              "blocks.1.att.k_a", "blocks.1.att.r_k", "blocks.1.ffn.x_k", "blocks.1.ln1.weight", "ln_out.bias"):
        assert types[n] == "FP32", n
    for q in ("Q5_1", "Q8_0"):
        assert rwkvcpp.tensor_type("blocks.1.att.key.weight", (64, 64), q, "7") == q
        for n in ("blocks.1.att.w1", "blocks.1.att.a2", "blocks.1.att.g1", "blocks.1.att.r_k", "emb.weight", "head.weight"):
            assert rwkvcpp.tensor_type(n, (64, 32), q, "7") == "FP32", n
    # FP32: exact, and the model computes what the in-memory one does.
    rwkvcpp.write_state_dict(path, sd, CFG.n_layer, "FP32", generation="7")
    model = rwkvkit.load(path)
    assert model.config.layer0_v_lora is False
    _same(sd, _sd(model), skip=("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))
    torch.save(sd, tmp_path / "m.pth")
    ref = rwkvkit.load(tmp_path / "m.pth")  # the same load path: same runtime attached
    tokens = [5, 17, 80, 3, 3, 42]
    for a, b in zip(_last_logits(model, tokens), _last_logits(ref, tokens)):
        assert torch.equal(a, b)


# ------------------------------------------------------------ Hugging Face
def test_hf_mapping_by_hand(tmp_path):
    """fla's RWKV7ForCausalLM names and shapes, written out here independently
    of the code's table (spec 2.6; fla/models/rwkv7, fla/layers/rwkv7)."""
    sd = random_state_dict(CFG, seed=3)
    torch.save(sd, tmp_path / "m.pth")
    checkpoint.convert(tmp_path / "m.pth", tmp_path / "hf", "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    C = CFG.n_embd
    expect = {
        "model.embeddings.weight": sd["emb.weight"],
        "model.layers.0.pre_norm.weight": sd["blocks.0.ln0.weight"],
        "model.layers.2.attn_norm.bias": sd["blocks.2.ln1.bias"],
        "model.layers.1.ffn_norm.weight": sd["blocks.1.ln2.weight"],
        "model.layers.1.attn.x_a": sd["blocks.1.att.x_a"],  # (1, 1, C) in fla
        "model.layers.1.attn.w_lora.lora.0.weight": sd["blocks.1.att.w1"].T,
        "model.layers.1.attn.w_lora.lora.2.weight": sd["blocks.1.att.w2"].T,
        "model.layers.1.attn.w_lora.lora.2.bias": sd["blocks.1.att.w0"].reshape(C),
        "model.layers.2.attn.a_lora.lora.0.weight": sd["blocks.2.att.a1"].T,
        "model.layers.2.attn.a_lora.lora.2.bias": sd["blocks.2.att.a0"].reshape(C),
        "model.layers.1.attn.v_lora.lora.2.weight": sd["blocks.1.att.v2"].T,
        "model.layers.1.attn.v_lora.lora.2.bias": sd["blocks.1.att.v0"].reshape(C),
        "model.layers.0.attn.g_lora.lora.0.weight": sd["blocks.0.att.g1"].T,
        "model.layers.0.attn.g_lora.lora.2.weight": sd["blocks.0.att.g2"].T,
        "model.layers.2.attn.k_k": sd["blocks.2.att.k_k"].reshape(C),
        "model.layers.2.attn.k_a": sd["blocks.2.att.k_a"].reshape(C),
        "model.layers.2.attn.r_k": sd["blocks.2.att.r_k"],
        "model.layers.1.attn.r_proj.weight": sd["blocks.1.att.receptance.weight"],
        "model.layers.1.attn.k_proj.weight": sd["blocks.1.att.key.weight"],
        "model.layers.1.attn.v_proj.weight": sd["blocks.1.att.value.weight"],
        "model.layers.1.attn.o_proj.weight": sd["blocks.1.att.output.weight"],
        "model.layers.1.attn.g_norm.weight": sd["blocks.1.att.ln_x.weight"],
        "model.layers.0.ffn.x_k": sd["blocks.0.ffn.x_k"].reshape(C),
        "model.layers.0.ffn.key.weight": sd["blocks.0.ffn.key.weight"],
        "model.layers.2.ffn.value.weight": sd["blocks.2.ffn.value.weight"],
        "model.norm.bias": sd["ln_out.bias"],
        "lm_head.weight": sd["head.weight"],
    }
    for k, v in expect.items():
        assert hf[k].shape == v.shape and torch.equal(hf[k], v), k
    assert hf["model.layers.1.attn.x_a"].shape == (1, 1, C)
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in hf)  # fla's layer 0 has none
    assert "model.layers.0.attn.g_lora.lora.2.bias" not in hf and "model.layers.1.pre_norm.weight" not in hf
    # One HF tensor per official one, less layer 0's v0/v1/v2.
    assert len(hf) == len(sd) - 3
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv7" and cfg["architectures"] == ["RWKV7ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["vocab_size"], cfg["intermediate_size"]) == (64, 3, 32, 97, 256)
    assert (cfg["decay_low_rank_dim"], cfg["a_low_rank_dim"], cfg["v_low_rank_dim"], cfg["gate_low_rank_dim"]) == (32, 64, 32, 96)
    assert cfg["norm_eps"] == 1e-5 and cfg["norm_bias"] is True and cfg["tie_word_embeddings"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_round_trip_is_exact(dtype, tmp_path):
    sd = random_state_dict(CFG, seed=4, dtype=dtype)
    torch.save(sd, tmp_path / "a.pth")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "hf", "hf")
    assert checkpoint.detect_format(tmp_path / "hf") == "hf"
    checkpoint.convert(tmp_path / "hf", tmp_path / "kit", "rwkvkit")
    checkpoint.convert(tmp_path / "kit", tmp_path / "hf2", "hf")
    checkpoint.convert(tmp_path / "hf2", tmp_path / "b.pth", "pth")
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    _same(sd, back, skip=("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))
    assert "blocks.0.att.v1" not in back
    assert rwkvkit.load(tmp_path / "hf").config.layer0_v_lora is False
    # The second HF folder is byte-identical to the first.
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()


def test_hf_variants_and_bad_folders(tmp_path):
    sd = random_state_dict(CFG, seed=5)
    torch.save(sd, tmp_path / "a.pth")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "hf", "hf")
    ref = _sd(rwkvkit.load(tmp_path / "hf"))
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())

    def folder(name, tensors, **cfg_changes):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **cfg_changes}))
        return d

    # fla's newer model_type name, and its first layout (x_x (6, C) holding the six mixes).
    _same(ref, _sd(rwkvkit.load(folder("fla", hf, model_type="rwkv7_fla"))))
    old = {k: v for k, v in hf.items() if ".attn.x_" not in k}
    for i in range(CFG.n_layer):
        old[f"model.layers.{i}.attn.x_x"] = torch.cat([hf[f"model.layers.{i}.attn.x_{c}"].reshape(1, -1) for c in "rwkvag"])
    _same(ref, _sd(rwkvkit.load(folder("xx", old))))
    # A (C,)-shaped x_r (some exports squeeze every (1, 1, C)) reads the same.
    sq = dict(hf, **{"model.layers.1.attn.x_r": hf["model.layers.1.attn.x_r"].reshape(-1)})
    _same(ref, _sd(rwkvkit.load(folder("squeezed", sq))))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.0.attn.q_proj.weight.*RWKV7ForCausalLM"):
        rwkvkit.load(folder("extra", dict(hf, **{"model.layers.0.attn.q_proj.weight": torch.zeros(64, 64)})))
    with pytest.raises(ShapeError, match="model.layers.1.attn.w_lora.lora.0.weight"):
        rwkvkit.load(folder("flat", dict(hf, **{"model.layers.1.attn.w_lora.lora.0.weight": torch.zeros(32 * 64)})))


# ---------------------------------------------------------------------- CLI
def test_info_rwkv7(capsys):
    path = shared_file(FIX.format("Q5_1"))
    rc, out, err = _run(["info", str(path), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["generation"] == "RWKV-7 (Goose)" and info["quantization"] == "Q5_1" and info["format_version"] == 101
    assert (info["layers"], info["n_embd"], info["vocab"], info["head_size"], info["dim_ffn"]) == (12, 64, 256, 64, 256)
    assert (info["d_decay"], info["d_aaa"], info["d_mv"], info["d_gate"]) == (32, 32, 32, 32)
    # Per layer 2C + H N^2 fp32 values (spec 5.1).
    assert info["state_bytes_per_sequence"] == 12 * (2 * 64 + 1 * 64 * 64) * 4
    # 72 matrices of 64x64/256x64 quantised; emb, head, LoRAs, vectors FP32.
    assert info["tensor_types"] == {"FP32": info["parameters"] - info["tensor_types"]["Q5_1"], "Q5_1": 12 * (4 * 64 * 64 + 2 * 256 * 64)}
    rc, out, _ = _run(["info", str(path)], capsys)
    assert rc == 0 and "RWKV-4 only" not in out
    rows = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in out.splitlines() if "  " in line}
    assert rows["generation"] == "RWKV-7 (Goose)"
    assert rows["heads"] == "1 x 64 (head_size 64)"
    assert rows["LoRA ranks"] == "decay 32, a 32, v 32, gate 32"
    assert rows["state size"] == "202,752 bytes per sequence"


@pytest.mark.parametrize("to", ["rwkvkit", "hf", "pth", "safetensors", "rwkvcpp"])
def test_convert_cli_every_target(to, tmp_path, capsys):
    src = shared_file(FIX.format("FP16"))
    dst = tmp_path / ("out" if to in ("rwkvkit", "hf") else "out.file")
    rc, out, err = _run(["convert", str(src), str(dst), "--to", to], capsys)
    assert rc == 0, err
    assert f"({to})" in out and checkpoint.detect_format(dst) == to
    # FP16 values loaded as float32 (rwkv.cpp files compute in fp32) survive exactly.
    _same(_sd(rwkvkit.load(src)), _sd(rwkvkit.load(dst)))


# ---------------------------------------------------------------- bad input
def _bad_inputs(tmp_path) -> dict:
    sd = random_state_dict(CFG, seed=6)
    cases = {}
    torch.save(sd, tmp_path / "ok.pth")
    raw = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    cases["truncated .pth"] = (tmp_path / "trunc.pth", CheckpointError, ["truncated or corrupt"])
    fixture = shared_file(FIX.format("Q5_0")).read_bytes()
    (tmp_path / "trunc.bin").write_bytes(fixture[: len(fixture) - 1000])
    cases["truncated .bin"] = (tmp_path / "trunc.bin", CheckpointError, ["truncated", "head.weight"])
    rank = dict(sd, **{"blocks.1.att.w1": torch.zeros(64, 64)})  # w2 stays (32, C)
    torch.save(rank, tmp_path / "rank.pth")
    cases["LoRA rank mismatch"] = (tmp_path / "rank.pth", ShapeError, ["blocks.1.att.w1", "(64, 64)", "(64, 32)"])
    miss = {k: v for k, v in sd.items() if k != "blocks.2.att.k_a"}
    torch.save(miss, tmp_path / "miss.pth")
    cases["missing key"] = (tmp_path / "miss.pth", CheckpointError, ["missing", "blocks.2.att.k_a"])
    deep = dict(sd, **{"blocks.0.ffn.s_emb.weight": torch.zeros(97, 32), "blocks.0.ffn.s1": torch.zeros(64, 32)})
    torch.save(deep, tmp_path / "deep.pth")
    cases["DeepEmbed"] = (tmp_path / "deep.pth", CheckpointError, ["DeepEmbed", "s_emb"])
    cpp = rwkvcpp.from_official(sd, "7")
    cpp["blocks.1.att.x_rwkvag"] = cpp["blocks.1.att.x_rwkvag"][:5]
    recs = [(k, "FP32", tuple(v.shape), v.float().contiguous().numpy().tobytes()) for k, v in cpp.items()]
    rwkvcpp.write(tmp_path / "mix.bin", rwkvcpp.Header(101, 97, 64, 3, 0), recs)
    cases["x_rwkvag of 5 mixes"] = (tmp_path / "mix.bin", ShapeError, ["blocks.1.att.x_rwkvag", "(5, 1, 64)"])
    return cases


def test_bad_rwkv7_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    for name, (path, exc, words) in _bad_inputs(tmp_path).items():
        with pytest.raises(exc) as info:
            rwkvkit.load(path)
        msg = str(info.value)
        assert "\n" not in msg, f"{name}: {msg!r}"
        for w in words:
            assert w in msg, f"{name}: {w!r} not in {msg!r}"
        for to, dst in (("rwkvkit", "out"), ("rwkvcpp", "out.bin")):
            rc, out, err = _run(["convert", str(path), str(tmp_path / dst), "--to", to], capsys)
            lines = err.strip().splitlines()
            assert rc == 1 and len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
            assert all(w in lines[0] for w in words), f"{name}: {lines[0]!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bin").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind


def test_rwkv4_state_is_refused_by_a_rwkv7_model(tmp_path):
    from rwkvkit.state import State, StateBase

    model = rwkvkit.load(shared_file(FIX.format("FP32")))
    State.zeros(12, 1, 64).save(tmp_path / "v4.safetensors")
    state = StateBase.load(tmp_path / "v4.safetensors")
    assert isinstance(state, State) and state.generation == "4"
    with pytest.raises(RwkvkitError, match="RWKV-4 model.*RWKV-7"):
        model.check_state(state)
    with pytest.raises(RwkvkitError, match="RWKV-4 model.*RWKV-7"):
        model(torch.tensor([[1]]), state)
    # Its own state passes, after a save/load too.
    _, own = model(torch.tensor([PROMPT]))
    own.save(tmp_path / "v7.safetensors")
    model.check_state(StateBase.load(tmp_path / "v7.safetensors"))
