"""Sampling against the `rwkv` package's PIPELINE.sample_logits where the
result is deterministic (the kept set and the final distribution), and the
deliberate differences (top_p = 1.0, greedy ties)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_file
from rwkvkit.errors import RwkvkitError
from rwkvkit.sampling import (
    SamplingConfig,
    apply_penalties,
    final_probs,
    kept_mask,
    make_generators,
    penalty_weights,
    sample,
    update_penalty_state,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second thread only adds synchronisation.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pip_distribution(monkeypatch, logits: torch.Tensor, **kw) -> np.ndarray:
    """The probabilities the package hands to its draw (CPU path), captured."""
    import rwkv.utils as U

    seen = {}

    def fake_choice(a, p):
        seen["p"] = np.array(p, dtype=np.float64)
        return 0

    monkeypatch.setattr(U.np.random, "choice", fake_choice)
    U.PIPELINE.sample_logits(None, logits.clone(), **kw)
    return seen["p"]


def _logits(V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * scale


@pytest.mark.parametrize(
    "top_p,top_k,temperature",
    [(0.85, 0, 1.0), (0.5, 0, 1.0), (0.9, 20, 0.7), (0.3, 5, 1.5), (0.999, 0, 0.8), (0.0, 0, 1.0), (0.95, 3, 1.0)],
)
def test_kept_set_and_distribution_match_rwkv_package(monkeypatch, top_p, top_k, temperature):
    for seed in range(5):
        logits = _logits(1000, seed)
        want = _pip_distribution(monkeypatch, logits, temperature=temperature, top_p=top_p, top_k=top_k)
        cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
        got = final_probs(logits[None], cfg)[0].double().numpy()
        assert np.array_equal(got > 0, want > 0), f"kept sets differ (seed {seed})"
        assert np.abs(got - want).max() < 1e-6


def test_top_p_one_is_greedy_in_the_package_but_not_here(monkeypatch):
    collapsed = 0
    for seed in range(20):
        logits = _logits(50277, seed, scale=2.0)
        want = _pip_distribution(monkeypatch, logits, temperature=1.0, top_p=1.0, top_k=0)
        quirk = final_probs(logits[None], SamplingConfig(top_p=1.0, rwkv_top_p_quirk=True))[0].double().numpy()
        fixed = final_probs(logits[None], SamplingConfig(top_p=1.0))[0].double().numpy()
        assert np.array_equal(quirk > 0, want > 0)
        assert (fixed > 0).all()
        assert np.abs(fixed - torch.softmax(logits.double(), -1).numpy()).max() < 1e-6
        collapsed += int((want > 0).sum() == 1)
    # The documented quirk really happens (spec section 6: 200/200 trials).
    assert collapsed >= 15


def test_temperature_zero_is_argmax_with_penalties_and_bans():
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.0], [3.0, 0.0, 2.0, 2.5]])
    cfg = SamplingConfig(temperature=0)
    assert sample(logits, cfg).tolist() == [1, 0]
    assert sample(logits, SamplingConfig(temperature=0, banned_tokens=(1, 0))).tolist() == [2, 3]
    counts = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    seen = torch.tensor([[False, True, False, False], [True, False, False, False]])
    cfg = SamplingConfig(temperature=0, presence_penalty=0.05, frequency_penalty=0.1)
    # Row 0: token 1 loses 0.15 -> 4.85 < 4.9; row 1: token 0 seen with count 0
    # still loses the presence penalty (the package's rule) -> 2.95 > 2.5.
    assert sample(logits, cfg, counts=counts, seen=seen).tolist() == [2, 0]


def test_penalty_update_decays_then_adds():
    counts = torch.zeros(2, 5)
    seen = torch.zeros(2, 5, dtype=torch.bool)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    counts, seen = update_penalty_state(counts, seen, torch.tensor([1, 2]), 0.5, weights)
    counts, seen = update_penalty_state(counts, seen, torch.tensor([1, 3]), 0.5, weights)
    assert counts.tolist() == [[0, 1.5, 0, 0, 0], [0, 0, 0, 1.0, 0]]
    assert seen.tolist() == [[False, True, False, False, False], [False, False, True, True, False]]
    out = apply_penalties(torch.zeros(2, 5), counts, seen, presence=0.2, frequency=0.1)
    assert torch.allclose(out, torch.tensor([[0, -0.35, 0, 0, 0], [0, 0, -0.2, -0.3, 0]]))


def test_penalty_free_tokens_match_package_rule():
    # The package gives 0 weight to tokens whose decoded text is a substring of
    # " \t0123456789"; check our byte-table version against tokenizers' decode.
    from tokenizers import Tokenizer

    from rwkvkit.tokenizer import load_tokenizer

    path = shared_file("tokenizers/20B_tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    w = penalty_weights(load_tokenizer(path), 50277)
    want = torch.tensor([0.0 if hf.decode([i]) in " \t0123456789" else 1.0 for i in range(50277)])
    assert torch.equal(w, want)
    assert 0 < int((w == 0).sum()) < 50  # spaces, digits, pairs like "12", <|endoftext|>


def test_min_p_and_top_k():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    assert kept_mask(probs, min_p=0.3).tolist() == [[True, True, True, False, False]]
    assert kept_mask(probs, top_k=2).tolist() == [[True, True, False, False, False]]
    assert kept_mask(probs, top_p=0.7).tolist() == [[True, True, False, False, False]]
    assert kept_mask(probs, top_p=0.71).tolist() == [[True, True, True, False, False]]
    # Ties at the top-p cut are kept, as in the package.
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    assert kept_mask(tied, top_p=0.5).tolist() == [[True, True, True, True]]


def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    cfg = SamplingConfig(temperature=1.0)
    a = torch.stack([sample(logits, cfg, make_generators(7, 3)) for _ in range(3)])
    b = torch.stack([sample(logits, cfg, make_generators(7, 3)) for _ in range(3)])
    assert torch.equal(a, b)
    # 6000 rows with one shared generator: one call, 6000 independent draws.
    many = sample(logits[:1].repeat(6000, 1), cfg, make_generators(11, 1)[0])
    freq = torch.bincount(many, minlength=4).double() / many.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.02)
    # Rows with their own generators draw independently (different seeds).
    gens = make_generators(11, 3)
    rows = torch.stack([sample(logits, cfg, gens) for _ in range(30)])  # [30, 3]
    assert not torch.equal(rows[:, 0], rows[:, 1])
    # Temperature sharpens the kept distribution: p ** (1 / T) renormalised.
    p = final_probs(logits[:1], SamplingConfig(temperature=0.5))[0]
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(p, want / want.sum(), atol=1e-6)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("penalty_decay", 1.5), ("presence_penalty", float("nan"))],
)
def test_bad_settings_are_refused(field, value):
    with pytest.raises(RwkvkitError, match=field):
        SamplingConfig(**{field: value}).validate()
    with pytest.raises(RwkvkitError, match="banned token"):
        SamplingConfig(banned_tokens=(300,)).validate(vocab_size=256)


def test_logit_bias_is_added_before_everything_else():
    from rwkvkit.errors import RwkvkitError
    from rwkvkit.sampling import SamplingConfig, add_logit_bias, sample

    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    got = add_logit_bias(logits, ((0, 5.0), (2, -1.5)))
    assert torch.equal(got, torch.tensor([[6.0, 2.0, 1.5, 0.5], [5.0, 0.0, -1.5, 0.0]]))
    assert torch.equal(logits[0], torch.tensor([1.0, 2.0, 3.0, 0.5]))  # a copy
    # Greedy follows the biased logits; a ban still wins over a bias.
    assert sample(logits, SamplingConfig(temperature=0, logit_bias=((0, 5.0),))).tolist() == [0, 0]
    assert sample(logits, SamplingConfig(temperature=0, logit_bias=((0, 5.0),), banned_tokens=(0,))).tolist() == [2, 1]
    with pytest.raises(RwkvkitError, match="must be in \\[-100, 100\\]"):
        SamplingConfig(logit_bias=((1, 150.0),)).validate()
    with pytest.raises(RwkvkitError, match="outside the vocabulary"):
        SamplingConfig(logit_bias=((9, 1.0),)).validate(vocab_size=4)
