"""Parameter groups, learning-rate schedule, Adam settings and L2Wrap (spec 4.2, 4.3)."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.models.rwkv4 import RWKV
from rwkvkit.train.optim import L2Wrap, build_optimizer, lr_at, param_groups


def _model():
    return RWKV(RWKV4Config(n_layer=2, n_embd=8, vocab_size=11))


def _group_of(groups, name):
    for g in groups:
        if name in g["names"]:
            return g
    raise KeyError(name)


def test_layerwise_lr_and_no_decay_by_default():
    groups = param_groups(_model().named_parameters(), weight_decay=0.0, layerwise_lr=True)
    assert _group_of(groups, "blocks.1.att.time_decay")["lr_scale"] == 2.0
    assert _group_of(groups, "blocks.1.att.time_first")["lr_scale"] == 3.0
    assert _group_of(groups, "blocks.1.att.time_mix_k")["lr_scale"] == 1.0
    assert _group_of(groups, "head.weight")["lr_scale"] == 1.0
    assert all(g["weight_decay"] == 0 for g in groups)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(_model().parameters()))


def test_weight_decay_only_on_matrices():
    groups = param_groups(_model().named_parameters(), weight_decay=0.1, layerwise_lr=False)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    model = _model()
    expected = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert decayed == expected
    assert "emb.weight" in decayed and "head.weight" in decayed
    # time_mix is (1, 1, C): one non-singleton dimension, so no decay.
    assert "blocks.0.att.time_mix_k" not in decayed
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_optimizer_settings():
    model = _model()
    opt = build_optimizer(param_groups(model.named_parameters()), lr=1e-3)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-8
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    opt = build_optimizer(param_groups(model.named_parameters(), weight_decay=0.01), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)


def test_exponential_schedule():
    kw = dict(lr_init=6e-4, lr_final=1e-5, total_steps=101)
    assert lr_at(0, **kw) == pytest.approx(6e-4)
    assert lr_at(100, **kw) == pytest.approx(1e-5)
    # Geometric interpolation: the midpoint is the geometric mean.
    assert lr_at(50, **kw) == pytest.approx(math.sqrt(6e-4 * 1e-5))
    assert lr_at(500, **kw) == pytest.approx(1e-5)  # clipped after the end


def test_hold_and_warmup():
    kw = dict(lr_init=1e-3, lr_final=1e-4, total_steps=21, hold_steps=10, warmup_steps=4)
    # v4neo warm-up factor 0.2 + 0.8 step / warmup.
    assert lr_at(0, **kw) == pytest.approx(0.2e-3)
    assert lr_at(2, **kw) == pytest.approx((0.2 + 0.8 * 2 / 4) * 1e-3)
    assert lr_at(4, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # end of the constant phase
    assert lr_at(15, **kw) == pytest.approx(math.sqrt(1e-3 * 1e-4))
    assert lr_at(20, **kw) == pytest.approx(1e-4)


def test_cosine_and_constant():
    kw = dict(lr_init=1e-3, lr_final=1e-4, total_steps=11, schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(1e-3)
    assert lr_at(5, **kw) == pytest.approx(0.55e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-4)
    assert lr_at(7, lr_init=1e-3, lr_final=1e-4, total_steps=11, schedule="constant") == 1e-3
    with pytest.raises(ValueError):
        lr_at(0, lr_init=1, lr_final=1, total_steps=2, schedule="linear")


def test_l2wrap_forward_is_identity_and_gradient_is_closed_form():
    torch.manual_seed(0)
    B, T, Vv = 3, 5, 7
    logits = (torch.randn(B, T, Vv, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, Vv, (B, T))
    factor = 1e-2
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, Vv), target.reshape(-1))
    out = L2Wrap.apply(ce, logits, factor)
    assert out.item() == ce.item()
    (0.5 * out).backward()  # a scaled loss scales the auxiliary gradient too
    got = logits.grad.clone()

    # Closed form: the gradient of ce + factor * mean_t (max_j y_tj)^2 / 2.
    logits.grad = None
    ce2 = torch.nn.functional.cross_entropy(logits.reshape(-1, Vv), target.reshape(-1))
    aux = factor * (logits.max(dim=-1).values ** 2).mean() / 2
    (0.5 * (ce2 + aux)).backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-12, atol=1e-14)

    # And the extra gradient sits only at each position's arg-max.
    logits.grad = None
    ce3 = torch.nn.functional.cross_entropy(logits.reshape(-1, Vv), target.reshape(-1))
    ce3.backward()
    extra = got * 2 - logits.grad
    nz = extra.abs() > 0
    assert torch.equal(nz.sum(-1), torch.ones(B, T, dtype=torch.long))
    assert torch.equal(nz.float().argmax(-1), logits.detach().argmax(-1))
