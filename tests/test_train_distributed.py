"""torchrun with two gloo processes equals one process with the same global
batch, with DDP and with FSDP (sharded weights), and an FSDP run resumes.

The equivalence runs are in float64 (torch's default dtype on both sides).
Two processes sum each gradient in another order than one (per-process partial
sums, then the all-reduce / reduce-scatter), and Adam divides by sqrt(v) + eps:
on a weight whose gradient is near zero a rounding difference dg moves the
weight by up to lr * dg / eps per step.  In float32 (dg ~ 1e-7 of the summed
terms) that bound is far above any useful tolerance, so whether a CPU passed
depended on its SIMD width and reduction order (an AMD Zen 4 was 2.1e-6 off).
In float64 the reductions differ by ~1e-16 relative.  What remains is the part
the model computes in float32 whatever the weights' dtype: the WKV kernel sums
the gradients of time_decay and time_first over the batch rows in float32
(relative error <= n * 2**-24 with n = 64 rows x positions), and Adam turns a
relative gradient error r into at most ~2 r of its normalised step m/sqrt(v);
over 4 steps of lr <= 5e-3 at up to 3x (time_first's rate) that is
4 * 5e-3 * 3 * 2 * 64 * 2**-24 = 4.6e-7 (the weights downstream move less).
F64_ATOL is that bound.  A real defect (a wrong shard, a missing or doubled
division by the process count, other rows) moves weights by ~lr = 1e-3.
"""

from __future__ import annotations

import contextlib
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


# See the module docstring: 4 steps * lr 5e-3 * rate 3 * 2 * 64 * 2**-24.
F64_ATOL = 4 * 5e-3 * 3 * 2 * 64 * 2**-24
# The resume test: the same process count and rows on both sides, so the same
# reductions in the same order, and the checkpoint round trip is exact: equal.
F32_ATOL = 0.0

# `python -m rwkvkit` with float64 as torch's default dtype (the model, its
# weights, gradients and Adam state are then float64).
F64_MAIN = "import sys, torch; torch.set_default_dtype(torch.float64); from rwkvkit.cli import main; sys.exit(main())"


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _torchrun(data, out, *extra, f64=False, **opts):
    flags = []
    for k, v in {**COMMON, **opts}.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    if f64:
        script = Path(out).parent / "f64_main.py"
        script.write_text(F64_MAIN + "\n")
        entry = [str(script)]
    else:
        entry = ["-m", "rwkvkit"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *entry, "train", "--data", str(data), "--out", str(out), "--no-progress", "--no-plot", *flags, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"steps"') == 1  # printed by rank 0 only
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_same_weights(a_dir, b_dir, atol, dtype=torch.float32):
    a = rwkvkit.load(a_dir).state_dict()
    b = rwkvkit.load(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one(parallel, tmp_path):
    data = _data(tmp_path)
    with _default_dtype(torch.float64):
        one = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), progress=False, plot=False, **COMMON))
    two = _torchrun(data, tmp_path / "two", f64=True, parallel=parallel)
    # Weights within F64_ATOL move a loss of ~4 by far less than 1e-6 of it.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-6, abs=0)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6, abs=0)
    _assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=F64_ATOL, dtype=torch.float64)
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
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # same reductions in the same order
    _assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model", atol=F32_ATOL)
