"""torchrun with two gloo processes equals one process with the same global
batch, with DDP and with FSDP (sharded weights), and an FSDP run resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit.errors import RwkvkitError
from rwkvkit.train import TrainConfig, prepare, train

TEXT = "".join(f"Line {i}: all the world's a stage, and all the men and women merely players.\n" for i in range(60))


def _losses(out):
    return [json.loads(line)["loss"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]


COMMON = dict(n_layer=2, n_embd=32, ctx_len=16, batch_size=4, grad_accum=2, max_steps=4, lr_init=5e-3,
              lr_final=1e-3, val_every=2, val_windows=8, save_every=0, wkv_backend="torch", threads=1)


def _data(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prepare([tmp_path / "t.txt"], tmp_path / "data", val_fraction=0.1, progress=False)
    return tmp_path / "data"


def _torchrun(data, out, *extra, **opts):
    flags = []
    for k, v in {**COMMON, **opts}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rwkvkit", "train", "--data", str(data), "--out", str(out), "--no-progress", "--no-plot", *flags, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"steps"') == 1  # printed by rank 0 only
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_same_weights(a_dir, b_dir, atol=1e-6):
    a = rwkvkit.load(a_dir).state_dict()
    b = rwkvkit.load(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(parallel, tmp_path):
    data = _data(tmp_path)
    one = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), progress=False, plot=False, **COMMON))
    two = _torchrun(data, tmp_path / "two", parallel=parallel)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    # FSDP divides the gradients before its reduce-scatter and DDP after its
    # all-reduce: fp32 rounding differs, and Adam (m / sqrt(v)) turns that into
    # up to ~3e-6 on weights with near-zero gradients, 1e-4 of the 4 steps' movement.
    _assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-6 if parallel == "ddp" else 1e-5)
    if parallel == "fsdp":
        # The checkpoint holds the whole (gathered) model and optimiser state, by name.
        st = torch.load(next((tmp_path / "two" / "checkpoints").glob("step-*")) / "trainer.pt", weights_only=False)
        assert st["parallel"] == "fsdp"
        assert any(k.endswith("att.key.weight") for k in st["optimizer"]["state"])


def test_fsdp_resume_equals_uninterrupted(tmp_path):
    data = _data(tmp_path)
    _torchrun(data, tmp_path / "full", parallel="fsdp")
    _torchrun(data, tmp_path / "cut", "--stop-after", "2", parallel="fsdp")
    assert not (tmp_path / "cut" / "model").exists()
    # Its optimiser state is stored by name: a plain run refuses it, with the reason.
    with pytest.raises(RwkvkitError, match="--parallel fsdp"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "cut"), progress=False, plot=False, resume=True, **COMMON))
    _torchrun(data, tmp_path / "cut", "--resume", parallel="fsdp")
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), rel=1e-5, abs=1e-6)
    _assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
