"""Checkpoint formats against independent references: rwkv.cpp's own logits and
files, gguf-py's ggml (de)quantisers, transformers' own save/load, torch.save."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import rwkvkit
from rwkvkit import checkpoint, rwkvcpp
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.errors import CheckpointError, ShapeError, UnsupportedModelError
from rwkvkit.init import random_state_dict
from conftest import shared_file
from util import hf_key, hf_model, make_model

PROMPT = [34, 105, 110]  # '"in', rwkv.cpp's test prompt (shared/data README 1.4)
CFG = RWKV4Config(n_layer=7, n_embd=64, vocab_size=97)  # crosses one rescale boundary
ODD = RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_att=24, dim_ffn=72)
# transformers fails on dim_att != n_embd (its state has hidden_size channels).
HF_ODD = RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_ffn=72)


def _tokens(cfg, B=2, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def _expected_4v0() -> torch.Tensor:
    return torch.from_numpy(np.fromfile(shared_file("rwkvcpp/expected-logits-4v0-660K.bin"), dtype="<f4"))


def _last_logits(model, tokens=PROMPT):
    """Last-token logits of one parallel call and of a token-by-token RNN run."""
    with torch.no_grad():
        par, _ = model(torch.tensor([tokens]))
        state = None
        for t in tokens:
            rnn, state = model(torch.tensor([[t]]), state)
    return par[0, -1], rnn[0, -1]


# ----------------------------------------------------------------- rwkv.cpp
def test_rwkvcpp_fp32_matches_rwkvcpp_logits():
    model = rwkvkit.load(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin"))
    assert model.dtype == torch.float32 and not model.training
    expected = _expected_4v0()
    par, rnn = _last_logits(model)
    d_par = (par - expected).abs().max().item()
    d_rnn = (rnn - expected).abs().max().item()
    print(f"4v0 FP32 vs rwkv.cpp: parallel {d_par:.3g}, rnn {d_rnn:.3g}")
    assert d_par < 1e-4 and d_rnn < 1e-4


@pytest.mark.parametrize("dtype,tol", [(None, 5e-3), ("float16", 2e-2)])
def test_rwkvcpp_fp16_matches_rwkvcpp_logits(dtype, tol):
    model = rwkvkit.load(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP16.bin"), dtype=dtype)
    # rwkv.cpp computes in fp32 from its FP16 matrices: so does the default.
    assert model.dtype == (torch.float32 if dtype is None else torch.float16)
    expected = _expected_4v0()
    par, rnn = _last_logits(model)
    d = max((par - expected).abs().max().item(), (rnn - expected).abs().max().item())
    print(f"4v0 FP16 file (model dtype {model.dtype}) vs rwkv.cpp FP32 logits: {d:.3g}")
    assert d < tol


def test_rwkvcpp_transforms_are_undone():
    """time_decay = log(-stored) and time_mix (C,) -> (1, 1, C), against the raw file."""
    path = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    _, records = rwkvcpp.read_index(path)
    raw = {r.name: np.frombuffer(mm[r.offset : r.offset + r.nbytes].tobytes(), "<f4").reshape(r.shape) for r in records}
    model = rwkvkit.load(path)
    sd = model.state_dict()
    assert np.all(raw["blocks.2.att.time_decay"] < 0)
    np.testing.assert_allclose(-np.exp(sd["blocks.2.att.time_decay"].double().numpy()), raw["blocks.2.att.time_decay"], rtol=1e-6)
    assert sd["blocks.1.ffn.time_mix_r"].shape == (1, 1, 128)
    assert torch.equal(sd["blocks.1.ffn.time_mix_r"].reshape(-1), torch.from_numpy(raw["blocks.1.ffn.time_mix_r"].copy()))
    assert torch.equal(sd["head.weight"], torch.from_numpy(raw["head.weight"].copy()))


QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def test_gguf_block_layouts_are_ggml_v101():
    """gguf-py's block sizes are the version-101 layouts rwkvkit decodes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name in QTYPES:
        _, block, nbytes = rwkvcpp.TYPES[rwkvcpp.TYPE_CODES[name]]
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, nbytes), name


@pytest.fixture(scope="module")
def fp32_4v0():
    path = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin")
    header, records, raw = rwkvcpp.read_raw(path)
    ref = rwkvkit.load(path)
    return header, records, raw, _last_logits(ref)[0]


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_rwkvcpp_against_gguf(qtype, fp32_4v0, tmp_path):
    """Quantise the 4v0 matrices with gguf-py (an independent ggml port), write
    an rwkv.cpp file like rwkv.cpp's quantizer (matrices quantised, emb/head and
    vectors FP32), and check rwkvkit decodes each tensor exactly as gguf does."""
    from gguf import GGMLQuantizationType, quants

    header, records, raw, ref_logits = fp32_4v0
    gtype = GGMLQuantizationType[qtype]
    out, expected = [], {}
    for rec in records:
        arr = raw[rec.name].numpy()
        if arr.ndim == 2 and rec.name not in ("emb.weight", "head.weight"):
            q = quants.quantize(arr, gtype)  # [rows, bytes per row]
            expected[rec.name] = quants.dequantize(q, gtype)
            out.append((rec.name, qtype, rec.shape, q.tobytes()))
        else:
            out.append((rec.name, "FP32", rec.shape, arr.astype("<f4").tobytes()))
    path = tmp_path / f"4v0-{qtype}.bin"
    hdr = rwkvcpp.Header(rwkvcpp.VERSION, header.n_vocab, header.n_embed, header.n_layer, rwkvcpp.TYPE_CODES[qtype])
    rwkvcpp.write(path, hdr, out)
    assert len(expected) == 28
    ck = checkpoint.read(path)
    for name, want in expected.items():
        got = ck.tensors[name].numpy()
        assert got.dtype == np.float32
        assert np.array_equal(got, want), f"{qtype} {name}: max diff {np.abs(got - want).max()}"
    model = rwkvkit.load(path)
    assert model.dtype == torch.float32
    par, rnn = _last_logits(model)
    d = (par - ref_logits).abs().max().item()
    print(f"{qtype} logits vs FP32: max |diff| {d:.3g}")
    # rwkvkit's own quantizer (convert --to rwkvcpp --type) writes gguf's bytes.
    ours = checkpoint.convert(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin"), tmp_path / "ours.bin", "rwkvcpp", rwkvcpp_type=qtype)
    _, our_records = rwkvcpp.read_index(ours)
    their = {r.name: r for r in rwkvcpp.read_index(path)[1]}
    mine, theirs = np.memmap(ours, dtype=np.uint8, mode="r"), np.memmap(path, dtype=np.uint8, mode="r")
    for rec in our_records:
        other = their[rec.name]
        assert (rec.type_name, rec.shape) == (other.type_name, other.shape), rec.name
        if rec.type_name == qtype:
            assert np.array_equal(mine[rec.offset : rec.offset + rec.nbytes], theirs[other.offset : other.offset + other.nbytes]), rec.name
    assert (par - rnn).abs().max().item() < 1e-4
    # Loose: quantisation noise only (4-bit types perturb the logits by ~0.1).
    assert d < {"Q8_0": 0.05}.get(qtype, 0.6)
    assert torch.isfinite(par).all()


@pytest.mark.parametrize("model_name", ["5v1-730K", "5v2-730K"])
@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_real_rwkvcpp_q5_files_decode_within_one_step(model_name, qtype):
    """Files quantised by rwkv.cpp itself.  Their blocks are byte-identical to
    gguf-py quantising the FP32 file of the same model (so rwkv.cpp writes the
    ggml version-101 layout gguf implements), and every decoded element lies
    within one quantisation step of the FP32 value."""
    from gguf import GGMLQuantizationType, quants

    base = f"rwkvcpp/other_versions/tiny-rwkv-{model_name}"
    _, _, fp32 = rwkvcpp.read_raw(shared_file(f"{base}-FP32.bin"))
    qpath = shared_file(f"{base}-{qtype}.bin")
    _, records, quant = rwkvcpp.read_raw(qpath)
    mm = np.memmap(qpath, dtype=np.uint8, mode="r")
    n = 0
    for rec in records:
        if rec.type_name != qtype:
            assert torch.equal(quant[rec.name], fp32[rec.name]), rec.name
            continue
        n += 1
        ours = quants.quantize(fp32[rec.name].numpy(), GGMLQuantizationType[qtype]).reshape(-1)
        assert np.array_equal(ours, mm[rec.offset : rec.offset + rec.nbytes]), f"{rec.name}: blocks differ from gguf's"
        x = fp32[rec.name].double().reshape(-1, 32)  # ggml blocks along the last axis
        err = (quant[rec.name].double().reshape(-1, 32) - x).abs()
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        if qtype == "Q5_0":
            # d = -(value of largest magnitude)/16; the opposite extreme is
            # clipped from q = 32 to 31, a full step off; others within half.
            step = torch.maximum(lo.abs(), hi.abs()) / 16
            bound = step * (1 + 16 * 2.0**-11)
        else:
            step = (hi - lo) / 31
            bound = step * (0.5 + 31 * 2.0**-11) + lo.abs() * 2.0**-11
        assert bool((err <= bound + 1e-7).all()), f"{rec.name}: error {err.max().item()} exceeds the quantisation step"
        assert err.max().item() > 0  # really quantised
    assert n == 12 * (7 if model_name == "5v1-730K" else 8)  # 7 matrices a layer; 5.2 adds att.gate


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantizer_edge_blocks_match_gguf(qtype):
    """Zero, constant, one-sign and exact-half blocks quantise to gguf's bytes."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 96)).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 1.5
    x[2, :32] = -3
    x[3, :16] = 0
    x[4, :32] = np.round(rng.standard_normal(32) * 4) / 4
    x[5] = np.abs(x[5])
    got = rwkvcpp.quantize(x, qtype)
    want = quants.quantize(x, GGMLQuantizationType[qtype])
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(rwkvcpp.dequantize(got.reshape(-1), qtype, x.size).reshape(x.shape), quants.dequantize(want, GGMLQuantizationType[qtype]))


def test_version_100_quantized_is_refused(tmp_path):
    header, records, raw = rwkvcpp.read_raw(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin"))
    from gguf import GGMLQuantizationType, quants

    out = []
    for rec in records:
        arr = raw[rec.name].numpy()
        if rec.name == "blocks.0.att.key.weight":
            out.append((rec.name, "Q8_0", rec.shape, quants.quantize(arr, GGMLQuantizationType.Q8_0).tobytes()))
        else:
            out.append((rec.name, "FP32", rec.shape, arr.tobytes()))
    path = tmp_path / "old.bin"
    rwkvcpp.write(path, rwkvcpp.Header(100, 256, 128, 4, 9), out)
    with pytest.raises(CheckpointError, match="version-100.*blocks.0.att.key.weight|blocks.0.att.key.weight.*version-100"):
        rwkvkit.load(path)


def test_rwkvcpp_writer_round_trip(tmp_path):
    src = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin")
    model = rwkvkit.load(src)
    out = checkpoint.convert(src, tmp_path / "again.bin", "rwkvcpp")
    header, records = rwkvcpp.read_index(out)
    _, ref_records = rwkvcpp.read_index(src)
    assert {r.name: (r.shape, r.type_name) for r in records} == {r.name: (r.shape, r.type_name) for r in ref_records}
    again = rwkvkit.load(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-6, atol=0, msg=k)
    d = (_last_logits(again)[0] - _expected_4v0()).abs().max().item()
    assert d < 1e-4
    # FP16 output: the same tensors FP16 as in rwkv.cpp's own FP16 file.
    out16 = checkpoint.convert(src, tmp_path / "half.bin", "rwkvcpp", dtype="float16")
    _, r16 = rwkvcpp.read_index(out16)
    _, ref16 = rwkvcpp.read_index(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP16.bin"))
    assert {r.name: r.type_name for r in r16} == {r.name: r.type_name for r in ref16}


# ---------------------------------------------------------------------- pth
@pytest.mark.parametrize(
    "dtype,prefix",
    [(torch.float32, ""), (torch.float16, ""), (torch.bfloat16, ""), (torch.bfloat16, "_forward_module.")],
)
def test_pth_logits_equal_in_memory_model(dtype, prefix, tmp_path):
    sd = random_state_dict(CFG, seed=1, dtype=dtype)
    path = tmp_path / "m.pth"
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    ref, _ = make_model(CFG, seed=1, dtype=dtype)
    model = rwkvkit.load(path)
    assert model.dtype == dtype
    tokens = _tokens(CFG)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], ref(tokens)[0])


def test_mixed_dtype_pth_keeps_fp32_decays(tmp_path):
    """bf16 weights with fp32 time_decay/time_first: loaded and re-saved as stored."""
    sd = random_state_dict(CFG, seed=16, dtype=torch.bfloat16)
    fp32 = random_state_dict(CFG, seed=16)
    for k in sd:
        if k.endswith(("time_decay", "time_first")):
            sd[k] = fp32[k]
    torch.save(sd, tmp_path / "mixed.pth")
    model = rwkvkit.load(tmp_path / "mixed.pth")
    assert model.dtype == torch.bfloat16 and model.blocks[3].att.time_decay.dtype == torch.float32
    checkpoint.save_pth(model, tmp_path / "again.pth")
    _assert_same_sd(sd, torch.load(tmp_path / "again.pth", weights_only=True))
    assert rwkvkit.load(tmp_path / "mixed.pth", dtype="bfloat16").blocks[3].att.time_decay.dtype == torch.bfloat16
    ref, _ = make_model(CFG, seed=16, dtype=torch.bfloat16)
    for block in ref.blocks:
        block.att.time_decay.data = block.att.time_decay.data.float()
        block.att.time_first.data = block.att.time_first.data.float()
    ref.load_state_dict(sd)
    tokens = _tokens(CFG)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], ref(tokens)[0])


def test_pth_rebuilt_from_rwkvcpp_gives_the_same_logits(tmp_path):
    """The official .pth that rwkv.cpp's FP32 file was converted from, rebuilt
    here by hand (time_decay = log(-stored), time_mix (1, 1, C))."""
    src = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin")
    _, _, raw = rwkvcpp.read_raw(src)
    sd = {}
    for k, v in raw.items():
        if k.endswith("time_decay"):
            v = torch.log(-v.double()).float()
        elif ".time_mix_" in k:
            v = v.reshape(1, 1, -1)
        sd[k] = v
    torch.save(sd, tmp_path / "4v0.pth")
    a = _last_logits(rwkvkit.load(tmp_path / "4v0.pth"))[0]
    b = _last_logits(rwkvkit.load(src))[0]
    assert torch.equal(a, b)
    assert (a - _expected_4v0()).abs().max().item() < 1e-4


def test_safetensors_file_and_dtype_cast(tmp_path):
    from safetensors.torch import save_file

    sd = random_state_dict(ODD, seed=2)
    save_file(sd, str(tmp_path / "x.weights"))  # the name does not matter
    ref, _ = make_model(ODD, seed=2)
    model = rwkvkit.load(tmp_path / "x.weights")
    tokens = _tokens(ODD)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], ref(tokens)[0])
    half = rwkvkit.load(tmp_path / "x.weights", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.config.dim_att == 24 and half.config.dim_ffn == 72


def test_load_options(tmp_path):
    sd = random_state_dict(CFG, seed=4, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "m.pth")
    model = rwkvkit.load(tmp_path / "m.pth", rescale_every=6, ln0_fold_dtype="bfloat16")
    ref, _ = make_model(CFG, seed=4, dtype=torch.bfloat16)
    ref.config.rescale_every = 6
    ref.fold_ln0("bfloat16")
    tokens = _tokens(CFG)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], ref(tokens)[0])
    assert model.config.rescale_every == 6 and model.config.ln0_fold_dtype == "bfloat16"


# ----------------------------------------------------------------------- HF
def _write_hf_bin(hf, folder, shards: int = 1):
    """A pytorch_model.bin folder (transformers 5 only writes safetensors)."""
    folder.mkdir()
    hf.config.save_pretrained(folder)
    sd = hf.state_dict()
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    keys = list(sd)
    wmap = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        wmap.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


@pytest.fixture(scope="module")
def hf_random():
    return hf_model(random_state_dict(CFG, seed=6), CFG, rescale_every=0)


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_hf_folder_written_by_transformers(layout, hf_random, tmp_path):
    from transformers import RwkvForCausalLM

    hf = hf_random
    folder = tmp_path / "hf"
    if layout == "safetensors":
        hf.save_pretrained(folder, safe_serialization=True)
    elif layout == "sharded-safetensors":
        hf.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        _write_hf_bin(hf, folder, shards=1 if layout == "bin" else 3)
        # transformers itself reads the folder we wrote.
        RwkvForCausalLM.from_pretrained(folder)
    model = rwkvkit.load(folder)
    tokens = _tokens(CFG)
    with torch.no_grad():
        ours = model(tokens)[0]
        ref = hf(tokens).logits
    d = (ours - ref).abs().max().item()
    print(f"HF {layout}: max |diff| {d:.3g}")
    assert d < 1e-5


def test_convert_to_hf_loads_in_transformers(tmp_path):
    from transformers import RwkvForCausalLM

    sd = random_state_dict(HF_ODD, seed=7)
    torch.save(sd, tmp_path / "m.pth")
    checkpoint.convert(tmp_path / "m.pth", tmp_path / "hf", "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv" and cfg["architectures"] == ["RwkvForCausalLM"]
    hf = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.attention_hidden_size == 40 and hf.config.intermediate_size == 72
    for k, v in sd.items():
        assert torch.equal(hf.state_dict()[hf_key(k)], v), k
    ref, _ = make_model(HF_ODD, seed=7)
    tokens = _tokens(HF_ODD)
    with torch.no_grad():
        d = (hf(tokens).logits - ref(tokens)[0]).abs().max().item()
    print(f"convert --to hf, transformers vs rwkvkit: {d:.3g}")
    assert d < 1e-5


def test_hf_name_table_matches_tests_mapping():
    for key in CFG.expected_shapes():
        assert checkpoint.official_to_hf(key) == hf_key(key)
        assert checkpoint.hf_to_official(hf_key(key)) == key


def test_hf_other_model_type_is_refused(tmp_path):
    # rwkv5/rwkv6 folders are read (tests/test_rwkv56_checkpoint.py); other model types are named.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type 'mamba'.*expected one of.*'rwkv6' .Rwkv6ForCausalLM."):
        rwkvkit.load(tmp_path)


# ------------------------------------------------------------ round trips
def _assert_same_sd(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_convert_round_trip_is_exact(dtype, tmp_path):
    sd = random_state_dict(ODD, seed=8, dtype=dtype)
    torch.save(sd, tmp_path / "a.pth")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "kit", "rwkvkit")
    checkpoint.convert(tmp_path / "kit", tmp_path / "hf", "hf")
    checkpoint.convert(tmp_path / "hf", tmp_path / "b.pth", "pth")
    for fmt, p in (("rwkvkit", "kit"), ("hf", "hf"), ("pth", "b.pth")):
        assert checkpoint.detect_format(tmp_path / p) == fmt
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    _assert_same_sd(sd, back)
    assert back["blocks.0.att.time_mix_k"].shape == (1, 1, 40)


def test_save_and_load_rwkvkit_folder(tmp_path):
    model, sd = make_model(CFG, seed=9)
    model.config.rescale_every = 6
    rwkvkit.save(model, tmp_path / "kit")
    cfg = json.loads((tmp_path / "kit" / "config.json").read_text())
    assert cfg["format"] == "rwkvkit" and cfg["n_layer"] == 7 and cfg["rescale_every"] == 6
    again = rwkvkit.load(tmp_path / "kit")
    assert again.config.rescale_every == 6
    assert rwkvkit.load(tmp_path / "kit", rescale_every=0).config.rescale_every == 0
    _assert_same_sd(dict(model.state_dict()), dict(again.state_dict()))
    tokens = _tokens(CFG)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], again(tokens)[0])


def test_failed_write_leaves_destination_intact(tmp_path, monkeypatch):
    import safetensors.torch

    sd = random_state_dict(ODD, seed=10)
    torch.save(sd, tmp_path / "a.pth")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "kit", "rwkvkit")
    checkpoint.convert(tmp_path / "a.pth", tmp_path / "b.pth", "pth")
    before = {p.name: p.read_bytes() for p in (tmp_path / "kit").iterdir()}
    pth_before = (tmp_path / "b.pth").read_bytes()
    other = random_state_dict(ODD, seed=11)
    torch.save(other, tmp_path / "other.pth")

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.convert(tmp_path / "other.pth", tmp_path / "kit", "rwkvkit")
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (open(f, "wb").write(b"partial"), (_ for _ in ()).throw(OSError("disk full"))))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.convert(tmp_path / "other.pth", tmp_path / "b.pth", "pth")
    assert {p.name: p.read_bytes() for p in (tmp_path / "kit").iterdir()} == before
    assert (tmp_path / "b.pth").read_bytes() == pth_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "kit", "other.pth"]


# ---------------------------------------------------------------- validation
def test_missing_wrong_and_extra_keys(tmp_path):
    sd = random_state_dict(ODD, seed=12)
    bad = dict(sd)
    del bad["blocks.1.att.time_first"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing tensor 'blocks\.1\.att\.time_first'"):
        rwkvkit.load(tmp_path / "missing.pth")
    bad = dict(sd)
    bad["blocks.2.ffn.value.weight"] = torch.zeros(40, 71)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ShapeError, match=r"'blocks\.2\.ffn\.value\.weight' has shape \(40, 71\), expected \(40, 72\)"):
        rwkvkit.load(tmp_path / "shape.pth")
    bad = dict(sd, **{"blocks.1.att.extra": torch.zeros(3)})
    torch.save(bad, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['blocks\.1\.att\.extra'\]"):
        rwkvkit.load(tmp_path / "extra.pth")


@pytest.mark.parametrize(
    "extra,label",
    [
        ({"blocks.2.tiny_q.weight": torch.zeros(4, 40)}, "RWKV-4a"),
        ({"blocks.1.att.qq.weight": torch.zeros(4, 40)}, "RWKV-4b"),
    ],
)
def test_variants_are_refused_by_key(extra, label, tmp_path):
    sd = dict(random_state_dict(ODD, seed=13), **extra)
    torch.save(sd, tmp_path / "v.pth")
    with pytest.raises(UnsupportedModelError, match=label):
        rwkvkit.load(tmp_path / "v.pth")


@pytest.mark.parametrize(
    "extra,missing",
    [
        ({"blocks.0.att.ln_x.weight": torch.zeros(24)}, "blocks.0.att.ln_x.bias"),
        ({"blocks.0.att.time_maa_x": torch.zeros(1, 1, 40)}, "blocks.0.att.time_faaaa"),
        ({"blocks.0.att.x_r": torch.zeros(1, 1, 40)}, "blocks.0.att.r_k"),
    ],
)
def test_one_key_of_a_later_generation_is_a_broken_checkpoint(extra, missing, tmp_path):
    """RWKV-5, -6 and -7 are supported: an RWKV-4 file with one of their keys
    is read as that generation and refused for the tensor it lacks."""
    sd = dict(random_state_dict(ODD, seed=13), **extra)
    torch.save(sd, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match=f"missing tensor '{re.escape(missing)}'"):
        rwkvkit.load(tmp_path / "v.pth")


def test_pip_converted_file_is_refused(tmp_path):
    sd = dict(random_state_dict(ODD, seed=14))
    sd["_strategy"] = "cpu fp32"
    sd["_version"] = 0.7
    torch.save(sd, tmp_path / "conv.pth")
    with pytest.raises(UnsupportedModelError, match="rwkv. pip package.*_strategy|_strategy.*pip"):
        rwkvkit.load(tmp_path / "conv.pth")


def test_format_is_detected_by_content(tmp_path):
    sd = random_state_dict(ODD, seed=15)
    torch.save(sd, tmp_path / "model.safetensors")  # a misleading name
    assert checkpoint.detect_format(tmp_path / "model.safetensors") == "pth"
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bin")
    rwkvkit.load(tmp_path / "weights.bin")
    # Legacy (non-zip) torch.save container: no mmap, still loads.
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert rwkvkit.load(tmp_path / "legacy.pth").config.dim_att == 24


@pytest.mark.parametrize("head", [b"", b"\x80\x02", b"\x80\x1e", b"PK\x03\x04", b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"ggmf"])
def test_garbage_gives_one_clean_error(head, tmp_path, recwarn):
    """Random bytes behind every header rwkvkit sniffs: a CheckpointError, never a crash or a torch warning."""
    rng = np.random.default_rng(len(head))
    for i in range(40):
        body = rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        path = tmp_path / f"junk{i}.bin"
        path.write_bytes(head + body)
        with pytest.raises(CheckpointError) as info:
            rwkvkit.load(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg and len(msg) < 600, msg
    assert not [w for w in recwarn.list if "pickle" in str(w.message)], [str(w.message) for w in recwarn.list]


def test_big_loads_show_progress(tmp_path, monkeypatch, capsys):
    torch.save(random_state_dict(ODD, seed=3), tmp_path / "m.pth")
    monkeypatch.setattr(checkpoint, "_PROGRESS_BYTES", 0)  # every file counts as big
    rwkvkit.load(tmp_path / "m.pth")
    assert "loading m.pth" not in capsys.readouterr().err  # progress is off by default
    rwkvkit.load(tmp_path / "m.pth", progress=True)
    err = capsys.readouterr().err
    assert "loading m.pth" in err and "159k" in err  # the bar counts the bytes of the file's tensors
