"""Training RWKV-5.2 and RWKV-6 (`rwkvkit train --generation 5|6`): the x052 /
x060 init against spec 8.1, the optimiser groups of spec 8.2, a tiny model
learning a tiny text, BPTT carry, resume, state tuning of the matrix state,
LoRA, and (RWKV-6) two gloo processes against one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rwkvkit
from rwkvkit.errors import RwkvkitError
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv5 import RWKV5, RWKV5Config
from rwkvkit.models.rwkv6 import RWKV6, RWKV6Config
from rwkvkit.state import MatrixState
from rwkvkit.train import TrainConfig, load_tokens, prepare, train
from rwkvkit.train.loop import _build_model, model_config
from rwkvkit.train.optim import model_param_groups

TEXT = "".join(f"Line {i % 7}: all the world's a stage, and all the men and women merely players.\n" for i in range(40))
EPS32 = 2.0**-24
GENS = ["5", "6"]
MODEL_GEN = {"5": "5.2", "6": "6"}


def _base_model(gen: str):
    if gen == "5":
        return RWKV5(RWKV5Config(n_layer=2, n_embd=32, vocab_size=256, head_size=16))
    return RWKV6(RWKV6Config(n_layer=2, n_embd=32, vocab_size=256, head_size=16, d_mix=8, d_decay=8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("v56")
    (d / "t.txt").write_text(TEXT)
    prepare([d / "t.txt"], d / "data", val_fraction=0.1, progress=False)
    for gen in GENS:  # "released-like" random base models for fine-tuning
        base = _base_model(gen)
        sd = random_state_dict(base.config, seed=3)
        if gen == "6":
            # The random file's data-dependent decays reach 1e-9, which wipe a
            # learned initial state within a token; a trained model's w ~ 0.95.
            for k in sd:
                if k.endswith("att.time_decay"):
                    sd[k] = torch.full_like(sd[k], -3.0)
                elif k.endswith("att.time_decay_w2"):
                    sd[k] = sd[k] * 0.1
        base.load_state_dict(sd)
        rwkvkit.save(base, d / f"base{gen}")
    return d


def _cfg(d, out, gen, **kw):
    base = dict(data=str(d / "data"), out=str(out), generation=gen, n_layer=2, n_embd=32, head_size=16, ctx_len=16,
                batch_size=4, max_steps=6, lr_init=1e-2, lr_final=1e-3, val_every=0, val_windows=4, save_every=0,
                progress=False, plot=False, wkv_backend="torch", threads=1)
    if gen == "6":
        base.update(d_mix=8, d_decay=8)
    base.update(kw)
    return TrainConfig(**base)


def _rows(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [r["loss"] for r in _rows(out)]


def _val_batch(d, T=16, B=4):
    val = load_tokens(d / "data", "val")
    return torch.from_numpy(val.tokens[: B * (T + 1)].astype("int64")).reshape(B, T + 1)


# ======================================================================= init
def test_model_config_from_the_flags():
    m5 = model_config(TrainConfig(generation="5", n_layer=2, n_embd=128, head_size=32), 256)
    assert isinstance(m5, RWKV5Config) and m5.generation == "5.2" and m5.bonus == "time_faaaa"
    assert (m5.n_head, m5.dim_att, m5.dim_ffn) == (4, 128, 448)  # 3.5 C rounded down to 32
    m6 = model_config(TrainConfig(generation="6", n_layer=2, n_embd=128, head_size=32), 256)
    assert isinstance(m6, RWKV6Config) and (m6.d_mix, m6.d_decay, m6.dim_ffn) == (32, 64, 448)  # x060 defaults
    m6 = model_config(TrainConfig(generation="6", n_layer=2, n_embd=128, head_size=32, d_mix=8, d_decay=16, dim_ffn=256), 256)
    assert (m6.d_mix, m6.d_decay, m6.dim_ffn) == (8, 16, 256)


@pytest.mark.parametrize("gen", GENS)
def test_init_weights_match_spec_8_1(gen):
    """Spot values of the x052 / x060 formulas, computed here from spec 8.1."""
    L, C, N, V = 3, 64, 16, 256
    cfg = TrainConfig(data="x", out="y", generation=gen, n_layer=L, n_embd=C, head_size=N, seed=5, d_mix=8, d_decay=8)
    model = _build_model(cfg, V, torch.device("cpu"))
    assert model.generation == MODEL_GEN[gen]
    sd = model.state_dict()
    eye = lambda k: torch.eye(k)  # noqa: E731
    for l in range(L):
        r01, r10 = l / (L - 1), 1 - l / L
        p = f"blocks.{l}."
        for n in (0, 1, 17, 40, 63):
            ddd = n / C
            want = {
                "att.time_decay": -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01),
                "att.time_faaaa": r01 * (1 - n / (C - 1)) + 0.1 * (((n + 1) % 3) - 1),
                "att.ln_x.weight": ((l + 1) / L) ** 0.7, "att.ln_x.bias": 0.0,
            }
            if gen == "5":
                want.update({
                    "att.time_mix_k": ddd**r10, "att.time_mix_v": ddd**r10 + 0.3 * r01,
                    "att.time_mix_r": ddd ** (0.5 * r10), "att.time_mix_g": ddd ** (0.5 * r10),
                    "ffn.time_mix_k": ddd**r10, "ffn.time_mix_r": ddd**r10,
                })
            else:
                want.update({
                    "att.time_maa_x": 1 - ddd**r10, "att.time_maa_w": 1 - ddd**r10, "att.time_maa_k": 1 - ddd**r10,
                    "att.time_maa_v": 1 - (ddd**r10 + 0.3 * r01), "att.time_maa_r": 1 - ddd ** (0.5 * r10),
                    "att.time_maa_g": 1 - ddd ** (0.5 * r10),
                    "ffn.time_maa_k": 1 - ddd ** (r10**3), "ffn.time_maa_r": 1 - ddd ** (r10**3),
                })
            for key, value in want.items():
                got = sd[p + key].reshape(-1)[n].item()
                assert got == pytest.approx(value, rel=1e-6, abs=1e-6), (l, n, key)
        if gen == "6":
            assert torch.all(sd[p + "att.time_maa_w1"] == 0) and torch.all(sd[p + "att.time_decay_w1"] == 0)
            for k in ("att.time_maa_w2", "att.time_decay_w2"):
                w = sd[p + k]
                assert w.abs().max() <= 0.01 and w.abs().max() > 0.005, k  # U(-0.01, 0.01)
        for name, gain in (("att.receptance", 1.0), ("att.value", 1.0), ("att.key", 0.1), ("att.gate", 0.1)):
            w = sd[p + name + ".weight"]
            torch.testing.assert_close(w @ w.T, gain**2 * eye(C), atol=1e-5, rtol=0)
        fk = sd[p + "ffn.key.weight"]  # (3.5C, C): orthonormal columns
        torch.testing.assert_close(fk.T @ fk, eye(C), atol=1e-5, rtol=0)
        for zero in ("att.output.weight", "ffn.value.weight", "ffn.receptance.weight"):
            assert torch.all(sd[p + zero] == 0), zero
        assert torch.all(sd[p + "ln1.weight"] == 1) and torch.all(sd[p + "ln2.bias"] == 0)
    emb = sd["emb.weight"]
    assert emb.abs().max() <= 1e-4 and emb.std() > 3e-5
    head = sd["head.weight"]
    torch.testing.assert_close(head.T @ head, (0.5 * math.sqrt(V / C)) ** 2 * eye(C), atol=1e-4, rtol=0)


def test_options_checked_only_where_they_apply(corpus, tmp_path):
    with pytest.raises(RwkvkitError, match="head-size 64 must divide the time-mix width 32"):
        train(_cfg(corpus, tmp_path / "x", "6", head_size=64))
    with pytest.raises(RwkvkitError, match="RWKV-5.2 has"):
        train(_cfg(corpus, tmp_path / "x", "5", wkv_backend="nope"))
    with pytest.raises(RwkvkitError, match="d-mix"):
        train(_cfg(corpus, tmp_path / "x", "6", d_mix=-1))


# ============================================================== optimiser groups
@pytest.mark.parametrize("gen", GENS)
def test_param_groups_follow_configure_optimizers(gen):
    """Spec 8.2 (layerwise_lr, stage 1): time_decay 2x; time_first 3x;
    time_faaaa, time_mix/time_maa and the LoRAs (_w1/_w2, time_decay_w1 among
    them) 1x; weight decay only on 2-D .weight matrices."""
    cfg = TrainConfig(data="x", out="y", generation=gen, n_layer=2, n_embd=32, head_size=16, d_mix=8, d_decay=8)
    model = _build_model(cfg, 256, torch.device("cpu"))
    named = dict(model.named_parameters())
    groups = model_param_groups(model, weight_decay=0.1, layerwise_lr=True)
    assert sum(len(g["params"]) for g in groups) == len(named)
    by_name = {n: g for g in groups for n in g["names"]}
    for name in named:
        g = by_name[name]
        assert g["lr_scale"] == (2.0 if name.endswith("att.time_decay") else 1.0), name
        is_weight_matrix = name.endswith(".weight") and named[name].dim() == 2
        assert (g["weight_decay"] == 0.1) == is_weight_matrix, name
    decayed = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert len(decayed) == 2 + 2 * 8  # emb, head; r k v g output, ffn key receptance value
    if gen == "6":
        assert not decayed & {"blocks.0.att.time_maa_w1", "blocks.1.att.time_decay_w2", "blocks.0.att.ln_x.weight"}
        assert by_name["blocks.0.att.time_decay_w1"]["lr_scale"] == 1.0
    # 5.0's time_first (log u) learns at 3x, as in the Eagle-era trainer.
    from rwkvkit.models.rwkv5 import LR_SCALES

    assert LR_SCALES["att.time_first"] == 3.0
    flat = model_param_groups(model, weight_decay=0.0, layerwise_lr=False)
    assert len(flat) == 1 and flat[0]["lr_scale"] == 1.0 and flat[0]["weight_decay"] == 0.0


# =================================================================== learning
@pytest.mark.parametrize("gen", GENS)
def test_tiny_model_overfits_tiny_text(gen, corpus, tmp_path):
    tokens = load_tokens(corpus / "data", "train").tokens[:]
    counts = Counter(tokens.tolist())
    unigram = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    out = tmp_path / "run"
    s = train(_cfg(corpus, out, gen, ctx_len=32, batch_size=8, max_steps=40))
    losses = _losses(out)
    assert losses[0] > 5.0  # ln(256) = 5.55 at init: output and ffn.value start at zero
    assert sum(losses[-5:]) / 5 < unigram / 4
    assert s["val_loss"] < unigram / 4
    model = rwkvkit.load(out / "model")
    assert model.generation == MODEL_GEN[gen] and model.config.n_head == 2
    x = _val_batch(corpus, 32)
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    ce = nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    assert ce.item() == pytest.approx(s["val_loss"], rel=1e-4)


@pytest.mark.parametrize("gen", GENS)
def test_state_carry_is_one_long_window(gen, corpus, tmp_path):
    a = train(_cfg(corpus, tmp_path / "a", gen, ctx_len=32, max_steps=3, val_every=3))
    b = train(_cfg(corpus, tmp_path / "b", gen, ctx_len=16, bptt_chunks=2, bptt_detach=False, max_steps=3, val_every=3))
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert lb == pytest.approx(la, rel=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


@pytest.mark.parametrize("gen", GENS)
def test_resume_equals_uninterrupted(gen, corpus, tmp_path):
    kw = dict(grad_accum=2, bptt_chunks=2, warmup_steps=2, weight_decay=0.01, val_every=3)
    train(_cfg(corpus, tmp_path / "full", gen, **kw))
    part = tmp_path / "part"
    s1 = train(_cfg(corpus, part, gen, stop_after=2, **kw))
    assert s1["stop"] == "stopped" and s1["steps"] == 2
    s2 = train(_cfg(corpus, part, gen, resume=True, **kw))
    assert s2["steps"] == 6
    assert _losses(part) == _losses(tmp_path / "full")
    a = rwkvkit.load(tmp_path / "full" / "model").state_dict()
    b = rwkvkit.load(part / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ============================================================ state tuning, LoRA
@pytest.mark.parametrize("gen", GENS)
def test_state_tuning_trains_only_the_matrix_state(gen, corpus, tmp_path):
    out = tmp_path / "st"
    base = rwkvkit.load(corpus / f"base{gen}")
    before_sd = {k: v.clone() for k, v in base.state_dict().items()}
    x = _val_batch(corpus)
    with torch.no_grad():
        logits, _ = base(x[:, :-1])
    before = nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    s = train(_cfg(corpus, out, gen, init_from=str(corpus / f"base{gen}"), tune="state", lr_init=0.1, lr_final=0.1,
                   schedule="constant", max_steps=20, val_every=20))
    c = base.config
    assert s["trainable_params"] == c.n_layer * (2 * c.n_embd + c.n_head * c.head_size**2)
    losses = _losses(out)
    assert losses[-1] < losses[0] and s["val_loss"] < before - 0.1
    ck = torch.load(next((out / "checkpoints").glob("step-*")) / "trainer.pt", weights_only=False)
    assert set(ck["trainable"]) == {"att_x", "att_kv", "ffn_x"}
    after = rwkvkit.load(corpus / f"base{gen}").state_dict()
    assert all(torch.equal(after[k], before_sd[k]) for k in before_sd)
    state = MatrixState.load(out / "state.safetensors")
    assert state.generation == MODEL_GEN[gen] and state.batch_size == 1 and state.att_kv.abs().max() > 0
    with torch.no_grad():
        logits, _ = base(x[:, :-1], state.expand(4))
    ce = nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    assert ce == pytest.approx(s["val_loss"], rel=1e-4)


@pytest.mark.parametrize("gen", GENS)
def test_lora_trains_adapters_and_merges(gen, corpus, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    s = train(_cfg(corpus, out, gen, init_from=str(corpus / f"base{gen}"), tune="lora", lora_r=4, merge_lora=True,
                   max_steps=8, lr_init=1e-2, lr_final=1e-2, schedule="constant"))
    losses = _losses(out)
    assert losses[-1] < losses[0]
    base = rwkvkit.load(corpus / f"base{gen}")
    assert 0 < s["trainable_params"] < base.num_parameters() / 4
    merged = rwkvkit.load(out / "model")
    assert merged.generation == MODEL_GEN[gen]
    sb, sm = base.state_dict(), merged.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], sm[k])}
    # The default targets: every projection, the gate included.
    targets = {f"blocks.{i}.{m}.weight" for i in range(2) for m in
               ("att.key", "att.value", "att.receptance", "att.gate", "att.output", "ffn.key", "ffn.receptance", "ffn.value")}
    assert changed == targets


# ============================================================== two processes
# DDP itself is covered for RWKV-4 and -7 by default; v6 DDP and v5 FSDP run under -m slow.
@pytest.mark.parametrize("gen,parallel", [pytest.param("6", "ddp", marks=pytest.mark.slow), ("6", "fsdp"), pytest.param("5", "fsdp", marks=pytest.mark.slow)])
def test_two_gloo_processes_equal_one(gen, parallel, corpus, tmp_path):
    """DDP / FSDP on 2 gloo processes (FSDP shards each block's att and ffn):
    the first step equals one process up to the order of the gradient sums;
    later losses within 1e-4; the weights agree far below one step's update."""
    ranks = dict(d_mix=8, d_decay=8) if gen == "6" else {}
    dist = dict(generation=gen, n_layer=2, n_embd=32, head_size=16, ctx_len=16, batch_size=4,
                grad_accum=2, max_steps=3, lr_init=5e-3, lr_final=1e-3, val_every=3, val_windows=8, save_every=0,
                wkv_backend="torch", threads=1, parallel=parallel, **ranks)
    data = corpus / "data"
    one = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), progress=False, plot=False,
                            **{k: v for k, v in dist.items() if k != "parallel"}))
    flags = []
    for k, v in dist.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rwkvkit",
           "train", "--data", str(data), "--out", str(tmp_path / "two"), "--no-progress", "--no-plot", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout.strip().splitlines()[-1])
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert r2[0]["loss"] == pytest.approx(r1[0]["loss"], rel=128 * EPS32)
    assert r2[0]["grad_norm"] == pytest.approx(r1[0]["grad_norm"], rel=128 * EPS32)
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], rel=1e-4)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert abs(r1[-1]["loss"] - r1[0]["loss"]) > 1e-2
    a = rwkvkit.load(tmp_path / "one" / "model").state_dict()
    two_model = rwkvkit.load(tmp_path / "two" / "model")
    assert two_model.generation == ("5.2" if gen == "5" else gen)
    b = two_model.state_dict()
    assert a.keys() == b.keys()
    # Each weight moves by at most ~lr_init per Adam step; the runs agree to a small fraction of that.
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 0.05 * dist["lr_init"], k
