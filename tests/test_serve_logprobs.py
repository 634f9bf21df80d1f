"""Scoring through the server: logprobs (and echo) on /v1/completions, and the
tokenizer endpoints lm-eval's local-completions model uses, so that lm-eval
scores an rwkvkit server exactly as the in-process adapter scores the model."""

from __future__ import annotations

import pytest
import torch

from conftest import importorskip

importorskip("fastapi")
openai = importorskip("openai")
httpx = importorskip("httpx")

from test_serve import NAME, _printable_model, client, serving  # noqa: E402
from rwkvkit.tokenizer import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return _printable_model(seed=3)


@pytest.fixture(scope="module")
def server(model):
    with serving(model, ByteTokenizer(), max_batch=4, max_queue=64, max_prompt_tokens=512, max_tokens_limit=64,
                 prefill_chunk=7) as s:
        yield s


def _reference(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)


def test_echo_logprobs_equal_one_parallel_pass(server, model):
    """With echo, every prompt token's log-probability (given the tokens
    before it) and its top 3 equal one parallel pass of the model, although the
    server reads the prompt in chunks of 7 with the state carried."""
    c = client(server[0])
    prompt = "The quick brown fox jumps over the lazy dog, twice."
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0, logprobs=3, echo=True)
    ch = r.choices[0]
    lp = ch.logprobs
    gen = [ord(t) for t in lp.tokens[len(prompt):]]
    ids = list(prompt.encode()) + gen
    assert ch.text == prompt + "".join(map(chr, gen)) and len(gen) == 3
    ref = _reference(model, ids)
    assert lp.tokens == [chr(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-5)
        top = torch.topk(ref[p - 1], 3)
        assert list(lp.top_logprobs[p]) == [chr(t) for t in top.indices.tolist()]
        assert list(lp.top_logprobs[p].values()) == pytest.approx(top.values.tolist(), abs=1e-5)
    # greedy: each generated token is its position's most likely one, exactly
    for p in range(len(prompt), len(ids)):
        assert lp.token_logprobs[p] == max(lp.top_logprobs[p].values())
    assert lp.text_offset == list(range(len(ids)))
    # The prompt as lm-eval sends it, a batch of one token list, scores the same.
    raw = httpx.post(server[0] + "/v1/completions", json={"model": NAME, "prompt": [list(prompt.encode())], "max_tokens": 1,
                                                           "temperature": 0, "logprobs": 1, "echo": True}).json()
    got = raw["choices"][0]["logprobs"]
    assert got["token_logprobs"][: len(prompt)] == pytest.approx(lp.token_logprobs[: len(prompt)], abs=0)
    # Without echo: the generated tokens only, offsets after the prompt.
    r2 = c.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    assert r2.choices[0].logprobs.tokens == lp.tokens[len(prompt):]
    assert r2.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(prompt):], abs=1e-5)
    assert r2.choices[0].logprobs.text_offset == [len(prompt), len(prompt) + 1, len(prompt) + 2]
    assert c.completions.create(model=NAME, prompt=prompt, max_tokens=2).choices[0].logprobs is None


def test_logprobs_bad_requests(server):
    c = client(server[0])
    for kw in (dict(logprobs=6), dict(logprobs=-1), dict(logprobs=2, stream=True)):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=NAME, prompt="x", max_tokens=2, **kw)
    resp = httpx.post(server[0] + "/v1/completions", json={"model": NAME, "prompt": [[1], [2]], "max_tokens": 1})
    assert resp.status_code == 400
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_tokenizer_endpoints(server):
    base = server[0]
    info = httpx.get(base + "/tokenizer_info").json()
    assert "eos_token" in info and info["vocab_size"] == 256
    assert httpx.post(base + "/tokenize", json={"prompt": "hé"}).json()["tokens"] == list("hé".encode())
    assert httpx.post(base + "/detokenize", json={"tokens": list("hé".encode())}).json()["prompt"] == "hé"
    assert httpx.post(base + "/detokenize", json={"tokens": [256]}).status_code == 400


def test_lm_eval_local_completions_equals_the_adapter(server, model):
    """lm-eval's own local-completions model, against the running server
    (finding its tokenizer through /tokenizer_info), gives the in-process
    adapter's log-likelihoods and greedy flags."""
    importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from rwkvkit.lm_eval_adapter import RwkvkitLM

    pairs = [("The cat sat on the", " mat"), ("Question: 2+2=", " 4"), ("a", "b"), ("To be, or not to be", ", that is")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    remote = LocalCompletionsAPI(base_url=server[0] + "/v1/completions", model=NAME, tokenizer_backend="auto",
                                 max_retries=1, num_concurrent=1)
    assert remote.tokenizer_backend == "remote"
    got = remote.loglikelihood(reqs, disable_tqdm=True)
    want = RwkvkitLM(model=model, tokenizer="bytes", batch_size=2).loglikelihood(reqs, disable_tqdm=True)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
