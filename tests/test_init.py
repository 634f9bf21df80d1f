"""The paper's initialisation (spec 4.1), checked element by element against the
formulas written out here independently of rwkvkit.init."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.init import init_weights
from rwkvkit.models.rwkv4 import RWKV

L, C, V = 4, 24, 50


@pytest.fixture(scope="module")
def model():
    m = RWKV(RWKV4Config(n_layer=L, n_embd=C, vocab_size=V))
    init_weights(m, seed=3)
    return m


def _expected_vectors(l: int) -> dict[str, list[float]]:
    r01 = l / (L - 1)
    r10 = 1 - l / L
    out: dict[str, list[float]] = {"decay": [], "first": [], "att_k": [], "att_v": [], "att_r": [], "ffn_k": [], "ffn_r": []}
    for h in range(C):
        out["decay"].append(-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
        out["first"].append(math.log(0.3) + [0.0, 0.5, -0.5][h % 3])
        d = h / C
        out["att_k"].append(d**r10)
        out["att_v"].append(d**r10 + 0.3 * r01)
        out["att_r"].append(d ** (0.5 * r10))
        out["ffn_k"].append(d**r10)
        out["ffn_r"].append(d**r10)
    return out


@pytest.mark.parametrize("layer", range(L))
def test_vectors_follow_the_formulas(model, layer):
    exp = _expected_vectors(layer)
    b = model.blocks[layer]
    got = {
        "decay": b.att.time_decay,
        "first": b.att.time_first,
        "att_k": b.att.time_mix_k,
        "att_v": b.att.time_mix_v,
        "att_r": b.att.time_mix_r,
        "ffn_k": b.ffn.time_mix_k,
        "ffn_r": b.ffn.time_mix_r,
    }
    for name, t in got.items():
        torch.testing.assert_close(t.detach().reshape(-1), torch.tensor(exp[name]), rtol=0, atol=1e-6, msg=name)
    assert b.att.time_mix_k.shape == (1, 1, C)


def test_decay_range_and_order(model):
    # Channel 0 decays slowest (d = -5), the last channel fastest (d = 3).
    for b in model.blocks:
        d = b.att.time_decay.detach()
        assert d[0].item() == pytest.approx(-5.0)
        assert d[-1].item() == pytest.approx(3.0)
        assert torch.all(d[1:] >= d[:-1])


def test_matrices(model):
    zero = ("att.key", "att.receptance", "att.output", "ffn.receptance", "ffn.value")
    for b in model.blocks:
        for name in zero:
            sub, lin = name.split(".")
            assert torch.count_nonzero(getattr(getattr(b, sub), lin).weight) == 0, name
        # Orthogonal: W W^T = gain^2 I on the smaller side.
        wv = b.att.value.weight.detach().double()  # (A, C), gain 1
        torch.testing.assert_close(wv @ wv.T, torch.eye(C, dtype=torch.float64), atol=1e-5, rtol=0)
        wk = b.ffn.key.weight.detach().double()  # (4C, C), gain sqrt(4C / C) = 2
        torch.testing.assert_close(wk.T @ wk, 4.0 * torch.eye(C, dtype=torch.float64), atol=1e-4, rtol=0)
        for ln in (b.ln1, b.ln2):
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    head = model.head.weight.detach().double()  # (V, C), gain 0.5 sqrt(V / C)
    torch.testing.assert_close(head.T @ head, 0.25 * V / C * torch.eye(C, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.all(model.blocks[0].ln0.weight == 1)


def test_embedding_options():
    cfg = RWKV4Config(n_layer=1, n_embd=16, vocab_size=300)
    m = RWKV(cfg)
    init_weights(m, emb_init="uniform")
    e = m.emb.weight.detach()
    assert e.abs().max() <= 1e-4 and e.abs().max() > 0.9e-4
    init_weights(m, emb_init="normal")
    assert m.emb.weight.std().item() == pytest.approx(1e-4, rel=0.05)
    init_weights(m, emb_init="orthogonal")
    e = m.emb.weight.detach().double()  # gain 1e-4 sqrt(max(V, C)): entries of RMS 1e-4
    torch.testing.assert_close(e.T @ e, (1e-4) ** 2 * 300 * torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError):
        init_weights(m, emb_init="bogus")


def test_single_layer_guard():
    # r01 = l / (L - 1) is undefined for L = 1; the recipe uses 0.
    m = RWKV(RWKV4Config(n_layer=1, n_embd=8, vocab_size=10))
    init_weights(m)
    d = m.blocks[0].att.time_decay.detach()
    exp = torch.tensor([-5 + 8 * (h / 7) ** 0.7 for h in range(8)])
    torch.testing.assert_close(d, exp, atol=1e-6, rtol=0)
