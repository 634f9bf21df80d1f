"""Fine-tuning: full (--init-from), LoRA through peft (+ merge), state tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import importorskip
import torch

import rwkvkit
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.state import State
from rwkvkit.train import TrainConfig, load_tokens, prepare, train
from util import make_model

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 25


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    (d / "t.txt").write_text(TEXT)
    prepare([d / "t.txt"], d / "data", val_fraction=0.1, progress=False)
    model, _ = make_model(RWKV4Config(n_layer=2, n_embd=32, vocab_size=256), seed=1)
    rwkvkit.save(model, d / "base")
    return d


def _cfg(d, out, **kw):
    base = dict(data=str(d / "data"), out=str(out), init_from=str(d / "base"), ctx_len=16, batch_size=4,
                max_steps=6, lr_init=1e-2, lr_final=1e-2, schedule="constant", val_every=0, val_windows=4,
                save_every=0, progress=False, plot=False, wkv_backend="torch", threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def _val_batch(d):
    val = load_tokens(d / "data", "val")
    return torch.from_numpy(val.tokens[: 4 * 17].astype("int64")).reshape(4, 17)


def test_full_finetune_starts_from_the_checkpoint(setup, tmp_path):
    base = rwkvkit.load(setup / "base")
    x = _val_batch(setup)
    with torch.no_grad():
        logits, _ = base(x[:, :16])
    first = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    s = train(_cfg(setup, tmp_path / "full", val_every=1, max_steps=1, lr_init=1e-9, lr_final=1e-9))
    # One step at a negligible learning rate: the validation loss is the base model's.
    assert s["val_loss"] == pytest.approx(first, rel=1e-4)


def test_lora_trains_adapters_and_merges(setup, tmp_path):
    peft = importorskip("peft")
    out = tmp_path / "lora"
    s = train(_cfg(setup, out, tune="lora", lora_r=4, merge_lora=True, max_steps=8))
    losses = _losses(out)
    assert losses[-1] < losses[0]
    base = rwkvkit.load(setup / "base")
    n_base = base.num_parameters()
    assert 0 < s["trainable_params"] < n_base / 4
    merged = rwkvkit.load(out / "model")
    sb, sm = base.state_dict(), merged.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], sm[k])}
    targets = {f"blocks.{i}.{m}.weight" for i in range(2) for m in
               ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value", "ffn.receptance")}
    assert changed and changed <= targets
    # The merged checkpoint computes what base + adapter (loaded by peft) computes.
    adapted = peft.PeftModel.from_pretrained(rwkvkit.load(setup / "base"), str(out / "adapter")).eval()
    x = _val_batch(setup)[:, :16]
    with torch.no_grad():
        la, _ = adapted(x)
        lm, _ = merged(x)
    torch.testing.assert_close(lm, la, rtol=1e-4, atol=1e-4)


def test_state_tuning_trains_only_the_state(setup, tmp_path):
    out = tmp_path / "st"
    base = rwkvkit.load(setup / "base")
    x = _val_batch(setup)
    with torch.no_grad():
        logits, _ = base(x[:, :-1])
    before = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    s = train(_cfg(setup, out, tune="state", lr_init=0.2, lr_final=0.2, max_steps=12, val_every=12))
    assert s["val_loss"] < before - 0.1
    n = base.config
    # att_x, ffn_x (C each), aa and pp (dim_att each) per layer; bb is fixed.
    assert s["trainable_params"] == n.n_layer * (2 * n.n_embd + 2 * n.dim_att)
    assert not (out / "model").exists()
    state = State.load(out / "state.safetensors")
    assert state.batch_size == 1 and state.n_layer == 2
    # Generation-side use: the base model run from the saved state reproduces
    # the validation loss the trainer reported.
    val = load_tokens(setup / "data", "val")
    x = torch.from_numpy(val.tokens[: 4 * 17].astype("int64")).reshape(4, 17)
    with torch.no_grad():
        logits, _ = base(x[:, :-1], state.expand(4))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    assert ce == pytest.approx(s["val_loss"], rel=1e-4)
    # And it resumes like any run.
    s2 = train(_cfg(setup, out, tune="state", lr_init=0.2, lr_final=0.2, max_steps=14, resume=True))
    assert s2["steps"] == 14
