"""The training loop: learning, exact resume, state carry, interruption, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit.cli import build_parser
from rwkvkit.commands.train import config_from_args
from rwkvkit.errors import RwkvkitError
from rwkvkit.train import TrainConfig, prepare, train
from rwkvkit.train.config import _fields

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n" * 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "t.txt").write_text(TEXT)
    prepare([d / "t.txt"], d / "data", val_fraction=0.1, progress=False)
    return d / "data"


def _cfg(corpus, out, **kw):
    base = dict(
        data=str(corpus), out=str(out), n_layer=2, n_embd=32, ctx_len=16, batch_size=4, max_steps=8,
        lr_init=1e-2, lr_final=1e-3, val_every=0, val_windows=4, save_every=0, progress=False, plot=False,
        wkv_backend="torch", threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_overfits_tiny_text(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(corpus, out, ctx_len=32, batch_size=8, max_steps=40, plot=True))
    losses = _losses(out)
    assert len(losses) == 40 and losses[0] > 4.5  # starts near ln(256) = 5.5
    assert sum(losses[-5:]) / 5 < 0.7
    assert summary["val_loss"] < 0.8
    assert (out / "loss.png").stat().st_size > 1000
    # OUT/model is a plain checkpoint: loading it gives the same validation loss.
    model = rwkvkit.load(out / "model")
    val = rwkvkit.train.load_tokens(corpus, "val")
    x = torch.from_numpy(val.tokens[: 4 * 33].astype("int64")).reshape(4, 33)
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    assert ce.item() == pytest.approx(summary["val_loss"], rel=1e-4)


def test_resume_equals_uninterrupted(corpus, tmp_path):
    kw = dict(grad_accum=2, bptt_chunks=2, warmup_steps=2, l2wrap=1e-2, val_every=3)
    full = tmp_path / "full"
    train(_cfg(corpus, full, **kw))
    part = tmp_path / "part"
    s1 = train(_cfg(corpus, part, stop_after=3, save_every=2, **kw))
    assert s1["stop"] == "stopped" and s1["steps"] == 3
    assert json.loads((part / "latest.json").read_text())["step"] == 3
    s2 = train(_cfg(corpus, part, resume=True, save_every=2, **kw))
    assert s2["steps"] == 8
    assert _losses(part) == _losses(full)  # exactly, step by step
    a = rwkvkit.load(full / "model").state_dict()
    b = rwkvkit.load(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # keep_checkpoints = 2
    assert len(list((part / "checkpoints").glob("step-*"))) == 2


def test_state_carry_is_one_long_window(corpus, tmp_path):
    """Two chunks of 16 with the state carried (not detached) give the same
    losses as one window of 32: the state carries the gradient exactly."""
    a = train(_cfg(corpus, tmp_path / "a", ctx_len=32, max_steps=3))
    b = train(_cfg(corpus, tmp_path / "b", ctx_len=16, bptt_chunks=2, bptt_detach=False, max_steps=3))
    c = train(_cfg(corpus, tmp_path / "c", ctx_len=16, bptt_chunks=2, bptt_detach=True, max_steps=3))
    la, lb, lc = _losses(tmp_path / "a"), _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # Detached: same first forward pass, different gradients afterwards.
    assert lc[0] == pytest.approx(la[0], rel=1e-6)
    assert abs(lc[2] - la[2]) > 1e-5


def test_sigint_saves_a_checkpoint_and_resume_continues(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rwkvkit", "train", "--data", str(corpus), "--out", str(out),
           "--n-layer", "1", "--n-embd", "16", "--ctx-len", "16", "--batch-size", "2", "--max-steps", "100000",
           "--save-every", "0", "--val-every", "0", "--no-progress", "--no-plot", "--threads", "1", "--wkv-backend", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stop"] == "interrupted"
    step = json.loads((out / "latest.json").read_text())["step"]
    assert step == summary["steps"] == len(metrics.read_text().splitlines())
    assert not list((out / "checkpoints").glob(".*"))  # no temporary leftovers
    s = train(_cfg(corpus, out, n_layer=1, n_embd=16, batch_size=2, max_steps=step + 2, resume=True))
    assert s["steps"] == step + 2 and len(_losses(out)) == step + 2


def test_help_lists_every_option_and_config_files(tmp_path, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name in _fields():
        assert "--" + name.replace("_", "-") in text, name
    (tmp_path / "c.toml").write_text('[train]\nctx-len = 64\nlr_init = 1\nbptt-detach = false\n')
    args = parser.parse_args(["train", "--config", str(tmp_path / "c.toml"), "--ctx-len", "128", "--data", "x"])
    cfg = config_from_args(args)
    assert cfg.ctx_len == 128 and cfg.lr_init == 1.0 and cfg.bptt_detach is False and cfg.data == "x"
    assert cfg.batch_size == TrainConfig.batch_size
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 3, "max-steps": 7}))
    cfg = config_from_args(parser.parse_args(["train", "--config", str(tmp_path / "c.json")]))
    assert (cfg.n_layer, cfg.max_steps) == (3, 7)
    (tmp_path / "bad.json").write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(RwkvkitError, match="unknown option 'n_layers'"):
        config_from_args(parser.parse_args(["train", "--config", str(tmp_path / "bad.json")]))
    (tmp_path / "bad2.json").write_text(json.dumps({"ctx_len": "long"}))
    with pytest.raises(RwkvkitError, match="ctx_len"):
        config_from_args(parser.parse_args(["train", "--config", str(tmp_path / "bad2.json")]))


def test_bad_options(corpus, tmp_path):
    with pytest.raises(RwkvkitError, match="--data"):
        train(TrainConfig(out=str(tmp_path)))
    with pytest.raises(RwkvkitError, match="fewer than one window"):
        train(_cfg(corpus, tmp_path / "x", ctx_len=100000))
    with pytest.raises(RwkvkitError, match="init-from"):
        train(_cfg(corpus, tmp_path / "x", tune="lora"))
    with pytest.raises(RwkvkitError, match="latest.json"):
        train(_cfg(corpus, tmp_path / "empty", resume=True))
    with pytest.raises(RwkvkitError, match="batch-size"):
        train(_cfg(corpus, tmp_path / "x", batch_size=0))


def test_gradient_checkpointing_is_exact_and_bf16_runs(corpus, tmp_path):
    train(_cfg(corpus, tmp_path / "plain", max_steps=3))
    train(_cfg(corpus, tmp_path / "ckpt", max_steps=3, grad_checkpoint=True))
    assert _losses(tmp_path / "ckpt") == _losses(tmp_path / "plain")
    s = train(_cfg(corpus, tmp_path / "bf16", max_steps=3, precision="bf16"))
    bf = _losses(tmp_path / "bf16")
    assert bf != _losses(tmp_path / "plain")  # autocast really ran in bf16 ...
    assert all(abs(a - b) < 0.1 for a, b in zip(bf, _losses(tmp_path / "plain")))  # ... and still learns
    assert s["val_loss"] < 6
