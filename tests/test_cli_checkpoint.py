"""``rwkvkit info`` and ``rwkvkit convert``: output, and one clean line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import rwkvkit
from rwkvkit.cli import main
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.init import random_state_dict
from conftest import REPO, shared_file

CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50)


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_rwkvcpp_json(capsys):
    path = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP16.bin")
    rc, out, err = _run(["info", str(path), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    # Sizes as documented for this fixture (shared/data README 1.1).
    assert (info["layers"], info["n_embd"], info["dim_ffn"], info["vocab"]) == (4, 128, 256, 256)
    assert info["format"] == "rwkvcpp" and info["format_version"] == 100 and info["quantization"] == "FP16"
    assert info["generation"] == "RWKV-4"
    # 30 FP16 matrices and 48 FP32 vectors (README 1.2); the count is the file's own.
    assert info["dtypes"] == {"FP16": 655360, "FP32": 6144}
    assert info["parameters"] == 655360 + 6144 == RWKV4Config(n_layer=4, n_embd=128, vocab_size=256, dim_ffn=256).num_params
    # rwkv.cpp's state: 5 * n_embd fp32 values per layer (README 1.3).
    assert info["state_bytes_per_sequence"] == 4 * 5 * 128 * 4
    assert info["file_bytes"] == os.path.getsize(path)


def test_info_table(capsys):
    rc, out, _ = _run(["info", str(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin"))], capsys)
    assert rc == 0
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert lines["layers"].strip() == "4" and lines["quantization"].strip() == "FP32"
    assert "10,240 bytes per sequence" in out and "2,649,149 bytes" in out


def test_info_of_a_variant_rwkvkit_does_not_run(tmp_path, capsys):
    sd = dict(random_state_dict(CFG), **{"blocks.1.tiny_q.weight": torch.zeros(4, 32)})
    torch.save(sd, tmp_path / "tiny.pth")
    rc, out, _ = _run(["info", str(tmp_path / "tiny.pth")], capsys)
    assert rc == 0 and "RWKV-4a" in out
    assert "no: rwkvkit runs RWKV-4, RWKV-5 (Eagle), RWKV-6 (Finch), RWKV-7 (Goose) (found 'blocks.1.tiny_q.weight')" in out


def test_info_rwkvkit_folder(tmp_path, capsys):
    torch.save(random_state_dict(CFG, dtype=torch.bfloat16), tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "kit"), "--to", "rwkvkit"]) == 0
    capsys.readouterr()
    rc, out, _ = _run(["info", str(tmp_path / "kit"), "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["format"] == "rwkvkit" and info["dtypes"] == {"bfloat16": CFG.num_params}
    assert info["dim_att"] == 32 and info["rescale_every"] == 0


@pytest.mark.parametrize("to", ["rwkvkit", "hf", "pth", "safetensors", "rwkvcpp"])
def test_convert_every_target(to, tmp_path, capsys):
    sd = random_state_dict(CFG, seed=3)
    torch.save(sd, tmp_path / "m.pth")
    dst = tmp_path / ("out.bin" if to in ("pth", "safetensors", "rwkvcpp") else "out")
    rc, out, err = _run(["convert", str(tmp_path / "m.pth"), str(dst), "--to", to], capsys)
    assert rc == 0, err
    assert "wrote" in out
    rc, out, _ = _run(["info", str(dst), "--json"], capsys)
    assert rc == 0 and json.loads(out)["format"] == to and json.loads(out)["parameters"] == CFG.num_params
    model = rwkvkit.load(dst)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    ref = rwkvkit.load(tmp_path / "m.pth")
    with torch.no_grad():
        a, b = model(tokens)[0], ref(tokens)[0]
    # rwkv.cpp stores -exp(d) and we take log(-w): float rounding only.
    assert torch.equal(a, b) if to != "rwkvcpp" else (a - b).abs().max().item() < 1e-5


def test_convert_to_quantized_rwkvcpp(tmp_path, capsys):
    src = str(shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin"))
    rc, _, err = _run(["convert", src, str(tmp_path / "q.bin"), "--to", "rwkvcpp", "--type", "Q8_0"], capsys)
    assert rc == 0, err
    rc, out, _ = _run(["info", str(tmp_path / "q.bin"), "--json"], capsys)
    info = json.loads(out)
    assert info["quantization"] == "Q8_0" and info["format_version"] == 101
    # The 28 per-layer matrices (4 layers x 7) quantised; emb, head, vectors FP32.
    assert info["tensor_types"] == {"Q8_0": 4 * (4 * 128 * 128 + 2 * 128 * 256 + 128 * 128), "FP32": 2 * 256 * 128 + 6144}
    rc, _, err = _run(["convert", src, str(tmp_path / "h"), "--to", "hf", "--type", "Q8_0"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "only to --to rwkvcpp" in err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_dtype(tmp_path, capsys, dtype):
    """--dtype: every tensor is the source tensor rounded to that dtype (one
    rounding, round-to-nearest, as .to() does), under the same names."""
    src = random_state_dict(CFG)
    torch.save(src, tmp_path / "m.pth")
    name = str(dtype).removeprefix("torch.")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "h.pth"), "--to", "pth", "--dtype", name]) == 0
    sd = torch.load(tmp_path / "h.pth", weights_only=True)
    assert sd.keys() == src.keys()
    for k, v in src.items():
        assert sd[k].dtype == dtype and sd[k].shape == v.shape, k
        assert torch.equal(sd[k], v.to(dtype)), k


# ----------------------------------------------------------- bad input
def _bad_inputs(tmp_path):
    """name -> (path, words the error must contain)."""
    cases = {}
    cases["missing"] = (tmp_path / "nope.pth", ["no such file"])
    (tmp_path / "empty.bin").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.bin", ["empty"])
    good = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[: len(good) // 2])
    cases["truncated rwkv.cpp"] = (tmp_path / "cut.bin", ["truncated", "tensor '"])
    (tmp_path / "hdr.bin").write_bytes(good[:10])
    cases["truncated rwkv.cpp header"] = (tmp_path / "hdr.bin", ["truncated", "header"])
    sd = random_state_dict(CFG)
    torch.save(sd, tmp_path / "ok.pth")
    whole = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) * 2 // 3])
    cases["truncated pth"] = (tmp_path / "cut.pth", ["truncated or corrupt"])
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "ok.safetensors"))
    st = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[:200])
    cases["truncated safetensors header"] = (tmp_path / "cut.safetensors", ["truncated", "header"])
    (tmp_path / "cut2.safetensors").write_bytes(st[: len(st) - 100])
    cases["truncated safetensors data"] = (tmp_path / "cut2.safetensors", ["truncated"])
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases["random bytes"] = (tmp_path / "random.bin", ["not a checkpoint"])
    (tmp_path / "notes.txt").write_text("hello, this is not a model\n")
    cases["text file"] = (tmp_path / "notes.txt", ["not a checkpoint"])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "readme.md").write_text("x")
    cases["folder without a model"] = (tmp_path / "dir", ["holds no model"])
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    cases["HF folder without weights"] = (tmp_path / "cfgonly", ["no weights"])
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases["unknown HF model"] = (tmp_path / "llama", ["llama"])
    miss = dict(sd)
    del miss["blocks.1.ffn.key.weight"]
    torch.save(miss, tmp_path / "miss.pth")
    cases["missing key"] = (tmp_path / "miss.pth", ["blocks.1.ffn.key.weight"])
    wrong = dict(sd, **{"blocks.0.att.time_first": torch.zeros(31)})
    torch.save(wrong, tmp_path / "wrong.pth")
    cases["wrong shape"] = (tmp_path / "wrong.pth", ["blocks.0.att.time_first", "(31,)", "(32,)"])
    torch.save(dict(sd, extra=torch.zeros(1)), tmp_path / "extra.pth")
    cases["extra key"] = (tmp_path / "extra.pth", ["unexpected", "'extra'"])
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["not a dict"] = (tmp_path / "list.pth", ["list"])
    cases["output over a non-model folder"] = (tmp_path / "ok.pth", ["not a model folder"])
    cases["output folder over a file"] = (tmp_path / "ok.pth", ["is a file"])
    # rwkv.cpp RWKV-6 files load now (tests/test_rwkv56_checkpoint.py); a truncated one is one line.
    fixture = shared_file("rwkvcpp/other_versions/tiny-rwkv-6v0-3m-Q5_0.bin").read_bytes()
    (tmp_path / "trunc6.bin").write_bytes(fixture[: len(fixture) - 1000])
    cases["RWKV-6"] = (tmp_path / "trunc6.bin", ["truncated", "head.weight"])
    return cases


def test_bad_inputs_give_one_line(tmp_path, capsys):
    for name, (path, words) in _bad_inputs(tmp_path).items():
        verb = ["convert", str(path), str(tmp_path / "out"), "--to", "rwkvkit"] if name == "RWKV-6" else ["info", str(path)]
        if name in ("missing key", "wrong shape", "extra key"):
            verb = ["convert", str(path), str(tmp_path / "out"), "--to", "hf"]
        if name == "output over a non-model folder":
            verb = ["convert", str(path), str(tmp_path / "dir"), "--to", "hf"]
        if name == "output folder over a file":
            verb = ["convert", str(path), str(tmp_path / "notes.txt"), "--to", "rwkvkit"]
        rc, out, err = _run(verb, capsys)
        lines = err.strip().splitlines()
        assert rc == 1, f"{name}: exit code {rc}, stderr {err!r}"
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
        for w in words:
            assert w in lines[0], f"{name}: {w!r} not in {lines[0]!r}"
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["readme.md"]
    assert (tmp_path / "notes.txt").read_text() == "hello, this is not a model\n"


def test_bad_input_in_a_real_process(tmp_path):
    # Fixed bytes: the in-process fuzz test in test_checkpoint.py covers random headers.
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvkit", "info", str(tmp_path / "random.bin")], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("rwkvkit info: error: ") and "not a checkpoint" in proc.stderr


def test_load_model_arg(tmp_path):
    from rwkvkit.commands.common import load_model_arg
    from rwkvkit.errors import RwkvkitError

    torch.save(random_state_dict(CFG), tmp_path / "m.pth")
    model = load_model_arg(tmp_path / "m.pth", dtype="bf16", device="cpu", rescale_every=6)
    assert model.dtype == torch.bfloat16 and model.config.rescale_every == 6 and not model.training
    for kw, words in (
        ({"dtype": "int3"}, "unknown dtype"),
        ({"device": "nonsense"}, "--device"),
        ({"rescale_every": -1}, "rescale_every"),
        ({"ln0_fold_dtype": "fp8"}, "unknown dtype"),
    ):
        with pytest.raises(RwkvkitError, match=words):
            load_model_arg(tmp_path / "m.pth", **kw)
    with pytest.raises(RwkvkitError, match="no model given"):
        load_model_arg("")
    if not torch.cuda.is_available():
        with pytest.raises(RwkvkitError, match="no CUDA GPU"):
            load_model_arg(tmp_path / "m.pth", device="cuda")


def test_info_reads_no_tensor_data(monkeypatch, capsys):
    """info on an rwkv.cpp file neither decodes a tensor nor builds a model."""
    from rwkvkit import model as model_module, rwkvcpp

    def refuse(*a, **k):
        raise AssertionError("info must not read tensor data or build the model")

    monkeypatch.setattr(rwkvcpp, "read_tensor", refuse)
    monkeypatch.setattr(rwkvcpp, "dequantize", refuse)
    from rwkvkit.models.rwkv7 import RWKV7

    monkeypatch.setattr(model_module.RWKV, "__init__", refuse)
    monkeypatch.setattr(RWKV7, "__init__", refuse)
    for name in ("tiny-rwkv-4v0-660K-FP16.bin", "other_versions/tiny-rwkv-7v0-834K-Q5_1.bin"):
        rc, out, err = _run(["info", str(shared_file(f"rwkvcpp/{name}")), "--json"], capsys)
        assert rc == 0, err
        assert json.loads(out)["parameters"] > 0
