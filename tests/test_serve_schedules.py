"""The engine against sequential generation, over random schedules (hypothesis).

Requests arrive at random decode steps, with random prompts sharing prefixes
(so the prefix cache is hit and finished rows are fed once more for it), stop
strings (including ones that stay a held-back prefix until the end), lengths,
choice counts, sampling settings and cancellations.  The engine is stepped by
hand (no thread), so each example is one exact interleaving.  Every request
that is not cancelled must produce what ``rwkvkit.generate`` produces for it
alone; a cancelled one a prefix of that.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import importorskip

hypothesis = importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rwkvkit.models.rwkv4 import RWKV4Config  # noqa: E402
from rwkvkit.generate import complete  # noqa: E402
from rwkvkit.init import random_state_dict  # noqa: E402
from rwkvkit.models.rwkv4 import RWKV  # noqa: E402
from rwkvkit.sampling import SamplingConfig  # noqa: E402
from rwkvkit.serve.engine import Engine, EngineConfig, GenRequest  # noqa: E402
from rwkvkit.tokenizer import ByteTokenizer  # noqa: E402

# The default run stays fast; `pytest -m slow` (or RWKVKIT_HYPOTHESIS_EXAMPLES) explores more.
EXAMPLES = int(os.environ.get("RWKVKIT_HYPOTHESIS_EXAMPLES", "25"))


def _printable_model(seed: int = 3) -> RWKV:
    """A random byte-level model that only writes printable ASCII and newlines."""
    cfg = RWKV4Config(n_layer=1, n_embd=32, vocab_size=256)
    sd = random_state_dict(cfg, seed=seed)
    sd["ln_out.bias"][0] = 30.0
    allowed = torch.zeros(256, dtype=torch.bool)
    allowed[32:127] = True
    allowed[10] = True
    sd["head.weight"][:, 0] = torch.where(allowed, torch.zeros(256), torch.full((256,), -3.0))
    model = RWKV(cfg)
    model.load_state_dict(sd)
    return model.eval()


MODEL = _printable_model()
TOK = ByteTokenizer()
_REF: dict = {}


def reference(prompt: str, max_tokens: int, temperature: float, seed: int, stop: tuple[str, ...]):
    key = (prompt, max_tokens, temperature, seed, stop)
    if key not in _REF:
        c = complete(MODEL, TOK, prompt, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed, stop=stop)[0]
        _REF[key] = (c.text, c.finish_reason)
    return _REF[key]


class _HandEngine(Engine):
    """The engine without its thread: the test runs the scheduler's iterations."""

    @property
    def running(self):
        return True

    def iteration(self):
        self._drop_cancelled()
        self._admit()
        if self._rows:
            self._step()


BASES = ["The cat", "The cat sat", "A dog", "The cat sat on"]

request_st = st.fixed_dictionaries({
    "arrive": st.integers(0, 12),
    "prompt": st.builds(lambda b, tail: b + tail, st.sampled_from(BASES), st.text(" abc", max_size=3)),
    "max_tokens": st.integers(1, 14),
    "n": st.sampled_from([1, 1, 1, 2]),
    "greedy": st.booleans(),
    "seed": st.integers(0, 2**20),
    # none; a short string; the last character of the unstopped text plus
    # text it never writes (held back until the end, then flushed)
    "stop": st.sampled_from(["none", "short", "tail"]),
    "short": st.text(" etaoinsh\n", min_size=1, max_size=2),
    "cancel": st.one_of(st.none(), st.integers(0, 20)),
})


def _run_schedule(reqs, prefill_budget):
    engine = _HandEngine(MODEL, TOK, EngineConfig(max_batch=4, max_queue=64, cache_bytes=2**20, prefill_budget=prefill_budget))
    plans = []
    for r in reqs:
        temp = 0.0 if r["greedy"] else 0.9
        stops: tuple[str, ...] = ()
        if r["stop"] == "short":
            stops = (r["short"],)
        elif r["stop"] == "tail":
            full, _ = reference(r["prompt"], r["max_tokens"], temp, r["seed"], ())
            if full:
                stops = (full[-1] + "\x07never",)
        events: list[dict] = []
        req = GenRequest(ids=TOK.encode(r["prompt"]), sampling=SamplingConfig(temperature=temp, top_p=1.0), max_tokens=r["max_tokens"],
                         emit=events.append, n=r["n"], stop=stops, seed=r["seed"])
        plans.append((r, temp, stops, req, events))
    step, pending = 0, list(range(len(plans)))
    while True:
        for i in list(pending):
            r, _, _, req, _ = plans[i]
            if r["arrive"] <= step:
                engine.submit(req)
                pending.remove(i)
        for r, _, _, req, _ in plans:
            if r["cancel"] is not None and r["cancel"] == step:
                req.cancel()
        engine.iteration()
        step += 1
        if not pending and not engine._rows and not engine._waiting:
            break
        assert step < 500, "the engine did not finish"
    return plans


def _check(plans):
    for r, temp, stops, req, events in plans:
        texts = ["" for _ in range(req.n)]
        reasons = [None] * req.n
        for e in events:
            assert e["type"] != "error", e
            if e["type"] == "text":
                assert reasons[e["index"]] is None, "text after done"
                texts[e["index"]] += e["text"]
            elif e["type"] == "done":
                reasons[e["index"]] = e["finish_reason"]
        for i in range(req.n):
            want, why = reference(r["prompt"], r["max_tokens"], temp, r["seed"] + i, stops)
            if reasons[i] is None:  # cancelled before the end: what came is a prefix
                assert req.cancelled.is_set(), (r, i)
                assert want.startswith(texts[i]), (r, i, texts[i], want)
            else:
                assert texts[i] == want, (r, i, stops, texts[i], want)
                assert reasons[i] == why, (r, i, reasons[i], why)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(reqs=st.lists(request_st, min_size=1, max_size=7), prefill_budget=st.sampled_from([1, 8, 2048]))
def test_engine_equals_sequential_generation(reqs, prefill_budget):
    _check(_run_schedule(reqs, prefill_budget))


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request_st, min_size=1, max_size=10), prefill_budget=st.sampled_from([1, 8, 2048]))
def test_engine_equals_sequential_generation_many(reqs, prefill_budget):
    _check(_run_schedule(reqs, prefill_budget))
