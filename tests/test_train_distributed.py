"""torchrun with two gloo processes equals one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit.train import TrainConfig, prepare, train

TEXT = "".join(f"Line {i}: all the world's a stage, and all the men and women merely players.\n" for i in range(60))


def _losses(out):
    return [json.loads(line)["loss"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prepare([tmp_path / "t.txt"], tmp_path / "data", val_fraction=0.1, progress=False)
    common = dict(n_layer=2, n_embd=32, ctx_len=16, batch_size=4, grad_accum=2, max_steps=4, lr_init=5e-3,
                  lr_final=1e-3, val_every=2, val_windows=8, save_every=0, wkv_backend="torch", threads=1)
    one = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "one"), progress=False, plot=False, **common))

    flags = []
    for k, v in common.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rwkvkit", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "two"),
           "--no-progress", "--no-plot", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert res.stdout.count('"steps"') == 1

    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    a = rwkvkit.load(tmp_path / "one" / "model").state_dict()
    b = rwkvkit.load(tmp_path / "two" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
