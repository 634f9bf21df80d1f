"""The training loop: learning, exact resume, state carry, interruption, CLI."""

from __future__ import annotations

import json
import math
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
    """Two chunks of 16 with the state carried (not detached) back-propagate
    what one window of 32 does.  Compared on one training step's gradients,
    not on losses after Adam steps (Adam amplifies rounding of near-zero
    gradients by a machine-dependent amount).  The two orders of the same
    float32 sums may differ by rounding: the bound per tensor is 4x the
    change that merely reversing the batch's rows makes to the one-window
    gradient, plus n u max|g| (float32 summation of n = B * T terms)."""
    from rwkvkit.train import loop

    cpu = torch.device("cpu")
    kw = dict(precision="fp32", wkv_backend="reference")
    one = _cfg(corpus, tmp_path / "x", ctx_len=32, **kw)
    carried = _cfg(corpus, tmp_path / "x", ctx_len=16, bptt_chunks=2, bptt_detach=False, **kw)
    detached = _cfg(corpus, tmp_path / "x", ctx_len=16, bptt_chunks=2, bptt_detach=True, **kw)
    torch.manual_seed(0)
    model = loop._build_model(one, 256, cpu)
    # Random weights (the official init zeroes att.output and ffn.value, so
    # that no gradient would flow through the carried state at all).
    from rwkvkit.init import random_state_dict

    model.load_state_dict(random_state_dict(model.config, seed=1))
    data = rwkvkit.train.load_tokens(corpus, "train")
    batch = rwkvkit.train.data.get_batch(data, rwkvkit.train.data.window_offsets(len(data), 33, 4, 0, 0, 0), 33)

    def step(cfg, b=batch):
        model.zero_grad(set_to_none=True)
        losses = loop._sequence_loss(model, b, cfg, cpu, train=True)
        return losses.double().mean().item(), {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}

    la, ga = step(one)
    _, gr = step(one, batch.flip(0))
    lb, gb = step(carried)
    lc, gc = step(detached)
    n_u = batch.shape[0] * (batch.shape[1] - 1) * 2.0**-24
    assert ga.keys() == gb.keys() == gr.keys()
    assert abs(lb - la) <= n_u * la and abs(lc - la) <= n_u * la  # the same forward pass
    for name in ga:
        tol = 4 * (gr[name] - ga[name]).abs().max().item() + n_u * ga[name].abs().max().item()
        assert (gb[name] - ga[name]).abs().max().item() <= tol, name
    # Detached: the first chunk gets no gradient from the second's loss, far
    # beyond rounding.
    worst = max((gc[n] - ga[n]).abs().max().item() / (ga[n].abs().max().item() + 1e-30) for n in ga)
    assert worst > 1000 * n_u
    # And the loop runs both ways end to end (the first loss is before any update).
    a = train(_cfg(corpus, tmp_path / "a", ctx_len=32, max_steps=2))
    b = train(_cfg(corpus, tmp_path / "b", ctx_len=16, bptt_chunks=2, bptt_detach=False, max_steps=2))
    assert _losses(tmp_path / "b")[0] == pytest.approx(_losses(tmp_path / "a")[0], rel=1e-6)
    assert math.isfinite(a["val_loss"]) and math.isfinite(b["val_loss"])


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
    # The message says how to continue, and that command (the run's options
    # come from the folder) does.
    assert f"continue with: rwkvkit train --out {out} --resume" in stderr
    s = train(TrainConfig(out=str(out), resume=True, max_steps=step + 2, progress=False))
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
    plain = train(_cfg(corpus, tmp_path / "plain", max_steps=3))
    train(_cfg(corpus, tmp_path / "ckpt", max_steps=3, grad_checkpoint=True))
    assert _losses(tmp_path / "ckpt") == _losses(tmp_path / "plain")
    s = train(_cfg(corpus, tmp_path / "bf16", max_steps=3, precision="bf16"))
    bf, fp = _losses(tmp_path / "bf16"), _losses(tmp_path / "plain")
    assert bf != fp  # autocast really ran in bf16 ...
    # ... and learns as fp32 does: 3 steps take the loss from ln(256) ~ 5.6 (the
    # first row, before any update) to ~4.1 nats; bf16's 8-bit mantissa moves
    # it by a few 1e-3 nats (0.004 seen), so 0.05 is 10x that and 1/30 of what
    # the steps learned (the old check, val_loss < 6, held for an untrained model).
    assert fp[0] > 5.4 and plain["val_loss"] < fp[0] - 1.0
    assert all(abs(a - b) < 0.05 for a, b in zip(bf, fp))
    assert s["val_loss"] == pytest.approx(plain["val_loss"], abs=0.05)


# ------------------------------------------------------------- the run folder
def _cli(argv, capsys):
    from rwkvkit import cli

    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _flags(corpus, out, **kw):
    cfg = dict(data=str(corpus), out=str(out), n_layer=1, n_embd=16, ctx_len=16, batch_size=2, max_steps=4,
               lr_init=1e-2, save_every=0, val_every=0, val_windows=2, threads=1, wkv_backend="torch")
    cfg.update(kw)
    argv = ["train", "--no-progress", "--no-plot"]
    for k, v in cfg.items():
        if v is not None:
            argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def test_existing_out_is_refused_without_resume_or_overwrite(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _cli(_flags(corpus, out), capsys)
    assert rc == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, stdout, err = _cli(_flags(corpus, out, n_embd=32), capsys)
    assert rc == 1 and stdout == "" and err.count("\n") == 1
    assert "holds a previous run (latest.json, checkpoints/, model/)" in err and "--resume" in err and "a new --out" in err and "--overwrite" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing of the first run was touched
    # An empty folder, or one with only the user's files, is not a previous run.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    rc, _, err = _cli(_flags(corpus, tmp_path / "empty", max_steps=1), capsys)
    assert rc == 0 and (tmp_path / "empty" / "notes.txt").read_text() == "mine"
    # --overwrite starts over: the old run's later checkpoints are gone (they
    # would otherwise outrank the new run's and be the ones kept).
    rc, _, err = _cli(_flags(corpus, out, n_embd=32, max_steps=2, overwrite=None) + ["--overwrite"], capsys)
    assert rc == 0, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert len(_losses(out)) == 2 and rwkvkit.load(out / "model").config.n_embd == 32
    with pytest.raises(RwkvkitError, match="give one of them"):
        train(_cfg(corpus, out, resume=True, overwrite=True))


def test_resume_takes_the_runs_options(corpus, tmp_path, capsys):
    """`--resume --out OUT` alone continues a run started with other shapes
    and rates (the old code built a default model and failed loading the
    checkpoint with a state-dict traceback), equal to the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    opts = dict(n_layer=2, n_embd=24, head_size=8, generation=7, lr_init=3e-3, warmup_steps=2, max_steps=5, seed=3)
    assert _cli(_flags(corpus, full, **opts), capsys)[0] == 0
    rc, _, err = _cli(_flags(corpus, part, stop_after=2, **opts), capsys)
    assert rc == 0 and "continue with: rwkvkit train --out" in err
    rc, stdout, err = _cli(["train", "--out", str(part), "--resume", "--no-progress", "--no-plot"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["steps"] == 5
    assert _losses(part) == _losses(full)
    a, b = rwkvkit.load(full / "model").state_dict(), rwkvkit.load(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((part / "train_config.json").read_text())
    assert (saved["generation"], saved["n_embd"], saved["lr_init"]) == ("7", 24, 3e-3)


def test_resume_refuses_options_that_disagree(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(_flags(corpus, out, stop_after=1), capsys)[0] == 0
    # Given again with the run's value: fine; a different value: refused by name.
    rc, _, err = _cli(_flags(corpus, out, n_embd=32, lr_init=5e-3, max_steps=2) + ["--resume"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "--n-embd 32 (the run has 16)" in err and "--lr-init 0.005 (the run has 0.01)" in err
    assert "--max-steps" not in err  # may grow: how long, not what
    rc, _, err = _cli(_flags(corpus, out, max_steps=2) + ["--resume"], capsys)
    assert rc == 0, err
    assert len(_losses(out)) == 2
    # A config file's options count as given.
    (tmp_path / "c.json").write_text(json.dumps({"ctx_len": 8}))
    rc, _, err = _cli(["train", "--out", str(out), "--resume", "--config", str(tmp_path / "c.json")], capsys)
    assert rc == 1 and "--ctx-len 8 (the run has 16)" in err


def test_resume_after_a_cut_metrics_line(corpus, tmp_path, capsys):
    """A crash mid-write leaves half a line at the end of metrics.jsonl: resume
    drops it (the old code stopped with a JSONDecodeError)."""
    out = tmp_path / "run"
    assert _cli(_flags(corpus, out, stop_after=2, save_every=2), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 2.')
    rc, _, err = _cli(["train", "--out", str(out), "--resume", "--no-progress", "--plot"], capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_ctrl_c_says_how_to_continue(corpus, tmp_path, capsys, monkeypatch):
    from rwkvkit.train import loop

    real = loop._StopFlag.__enter__

    def pressed(self):
        real(self)
        self.requested = True  # as if Ctrl-C came during the first step
        return self

    monkeypatch.setattr(loop._StopFlag, "__enter__", pressed)
    out = tmp_path / "run"
    rc, stdout, err = _cli(_flags(corpus, out), capsys)
    assert rc == 0 and json.loads(stdout)["stop"] == "interrupted"
    assert f"interrupted at step 1, checkpoint saved; continue with: rwkvkit train --out {out} --resume" in err

    def second_press(cfg, model=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("rwkvkit.train.loop.train", second_press)
    rc, _, err = _cli(["train", "--out", str(out), "--resume"], capsys)
    assert rc == 130 and f"continue with: rwkvkit train --out {out} --resume" in err
