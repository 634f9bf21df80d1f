"""The HTTP server, spoken to with the official `openai` client over loopback.

The model is a small random byte-level RWKV-4 whose output head is biased to
printable ASCII and newline (so generated text survives a round trip through
UTF-8, which stop strings and follow-up turns need).  Expected outputs come
from rwkvkit.generate (a separate implementation of decoding that runs one
prompt at a time) or from a plain token-by-token loop written here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import importorskip
import torch

importorskip("fastapi")
openai = importorskip("openai")
httpx = importorskip("httpx")

from rwkvkit.models.rwkv4 import RWKV4Config  # noqa: E402
from rwkvkit.generate import complete  # noqa: E402
from rwkvkit.init import random_state_dict  # noqa: E402
from rwkvkit.models.rwkv4 import RWKV  # noqa: E402
from rwkvkit.serve import Engine, EngineConfig, create_app, make_server  # noqa: E402
from rwkvkit.tokenizer import ByteTokenizer  # noqa: E402

NAME = "tiny-test"


def _printable_model(seed: int = 1) -> RWKV:
    cfg = RWKV4Config(n_layer=2, n_embd=64, vocab_size=256)
    sd = random_state_dict(cfg, seed=seed)
    # ln_out's bias puts a large constant in channel 0 of every final hidden
    # state; head rows outside printable ASCII + "\n" read it with a negative
    # weight, so their logits are about -90 and are never chosen.
    sd["ln_out.bias"][0] = 30.0
    allowed = torch.zeros(256, dtype=torch.bool)
    allowed[32:127] = True
    allowed[10] = True
    sd["head.weight"][:, 0] = torch.where(allowed, torch.zeros(256), torch.full((256,), -3.0))
    model = RWKV(cfg)
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _printable_model()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@contextlib.contextmanager
def serving(model, tok, api_key=None, **engine_kw):
    """A server on 127.0.0.1 (a free port) in a thread; yields (base_url, engine)."""
    engine = Engine(model, tok, EngineConfig(**engine_kw))
    app = create_app(engine, NAME, api_key=api_key)
    server, sock = make_server(app, "127.0.0.1", 0, "warning")
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)


def client(base, key="unused"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok, max_batch=16, max_queue=32, max_prompt_tokens=512, max_tokens_limit=300) as s:
        yield s


def _greedy_alone(model, tok, prompt, n, **kw):
    return complete(model, tok, prompt, max_tokens=n, temperature=0, **kw)[0]


# --------------------------------------------------------------- endpoints
def test_models_health_metrics(server):
    base, _ = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    m0 = httpx.get(base + "/metrics").json()
    prompt = "Count me"
    c.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0)
    m = httpx.get(base + "/metrics").json()
    # The values, not only the keys: one request of len(prompt) tokens and 5 generated ones.
    assert m["requests_total"] - m0["requests_total"] == 1
    assert m["prompt_tokens_total"] - m0["prompt_tokens_total"] == len(prompt.encode())
    assert m["completion_tokens_total"] - m0["completion_tokens_total"] == 5
    assert m["sequences_finished"] - m0["sequences_finished"] == 1
    assert m["decode_steps_total"] - m0["decode_steps_total"] == 5  # alone: one row per step
    assert m["requests_rejected"] == m0["requests_rejected"] and m["requests_failed"] == m0["requests_failed"]
    assert m["running_sequences"] == 0 and m["waiting_requests"] == 0 and m["max_batch"] == 16
    assert m["tokens_per_second"] > 0 and 0 < m["batch_occupancy"] <= 1
    assert m["batch_occupancy"] == pytest.approx(m["recent_batch_size"] / 16)
    assert 0 <= m["prefix_cache"]["hit_rate"] <= 1


def test_completion_greedy_equals_generate(server, model, tok):
    c = client(server[0])
    prompt = "The quick brown fox"
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    ref = _greedy_alone(model, tok, prompt, 40)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 40
    assert r.usage.total_tokens == len(prompt.encode()) + 40
    # Token-id prompts and echo.
    r2 = c.completions.create(model=NAME, prompt=list(prompt.encode()), max_tokens=40, temperature=0, echo=True)
    assert r2.choices[0].text == prompt + ref.text


def test_seeded_sampling_n_choices_equal_generate(server, model, tok):
    c = client(server[0])
    prompt = "Once upon a time"
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0.9, top_p=0.9, n=3, seed=11)
    # rwkvkit.generate seeds batch row i with seed + i, as the server does choice i.
    ref = complete(model, tok, [prompt] * 3, max_tokens=30, temperature=0.9, top_p=0.9, seed=11)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [x.text for x in ref]
    assert len({ch.text for ch in r.choices}) > 1
    assert r.usage.completion_tokens == 90
    again = c.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0.9, top_p=0.9, n=3, seed=11)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]


def test_penalties_equal_reference_loop(server, model, tok):
    c = client(server[0])
    prompt, presence, frequency, n = "abc abc abc", 0.7, 0.4, 30
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    # OpenAI's definition: logit - presence * [count > 0] - frequency * count,
    # counting the generated tokens.
    with torch.no_grad():
        logits, state = model(torch.tensor([list(prompt.encode())]), logits="last")
        counts = torch.zeros(256)
        out = []
        for _ in range(n):
            lg = logits[0, -1] - presence * (counts > 0).float() - frequency * counts
            t = int(lg.argmax())
            out.append(t)
            counts[t] += 1
            logits, state = model(torch.tensor([[t]]), state, logits="last")
    assert r.choices[0].text == bytes(out).decode()
    plain = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
    assert plain.choices[0].text != r.choices[0].text


def test_streaming_equals_non_streaming(server):
    c = client(server[0])
    kw = dict(model=NAME, prompt="Streaming test", max_tokens=50, temperature=0)
    full = c.completions.create(**kw)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    # Really streamed (pieces that queued up while the client was slow are merged, so not one per token).
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) >= 2
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 50 and chunks[-1].usage.prompt_tokens == len(b"Streaming test")


def test_stop_strings(server, model, tok):
    c = client(server[0])
    prompt = "Stop here"
    base = c.completions.create(model=NAME, prompt=prompt, max_tokens=60, temperature=0).choices[0].text
    stop = base[20:23]
    want = base[: base.find(stop)]
    assert _greedy_alone(model, tok, prompt, 60, stop=(stop,)).text == want
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=60, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=60, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_format_and_stream(server, model, tok):
    c = client(server[0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\n\nthere"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0)
    rendered = "System: Be brief.\n\nUser: Hello\nthere\n\nAssistant:"
    ref = _greedy_alone(model, tok, rendered, 40, stop=("\n\n", "\nUser:"))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text.lstrip()
    assert r.choices[0].finish_reason == ("stop" if ref.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == len(rendered.encode())
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_prefix_cache_follow_up_turn(server, model, tok):
    base, engine = server
    c = client(base)
    before = engine.cache.stats()
    # A completion, then the same text continued: the state after the prompt
    # and its generated tokens is reused.
    p1 = "A long shared beginning of a document. "
    t1 = c.completions.create(model=NAME, prompt=p1, max_tokens=25, temperature=0).choices[0].text
    p2 = p1 + t1 + " And then"
    r2 = c.completions.create(model=NAME, prompt=p2, max_tokens=20, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == len((p1 + t1).encode())
    assert r2.choices[0].text == _greedy_alone(model, tok, p2, 20).text
    # A follow-up chat turn starts from the cached first turn.
    turn1 = [{"role": "system", "content": "A system prompt shared by every conversation."}, {"role": "user", "content": "First question?"}]
    a1 = c.chat.completions.create(model=NAME, messages=turn1, max_tokens=20, temperature=0)
    assert a1.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content}, {"role": "user", "content": "Second?"}]
    a2 = c.chat.completions.create(model=NAME, messages=turn2, max_tokens=20, temperature=0)
    assert a2.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens
    rendered = "".join(
        f"{name}: {text}\n\n"
        for name, text in (("System", turn1[0]["content"]), ("User", "First question?"), ("Assistant", a1.choices[0].message.content), ("User", "Second?"))
    ) + "Assistant:"
    ref = _greedy_alone(model, tok, rendered, 20, stop=("\n\n", "\nUser:"))
    assert a2.choices[0].message.content == ref.text.lstrip()
    after = engine.cache.stats()
    assert after["hits"] >= before["hits"] + 2
    assert after["hit_tokens"] > before["hit_tokens"]
    assert httpx.get(base + "/metrics").json()["prefix_cache"]["hit_rate"] > 0


# ------------------------------------------------------- batching equality
def test_concurrent_requests_equal_alone(server):
    base, engine = server
    c = client(base)
    jobs = []
    for i in range(12):
        kw = dict(model=NAME, prompt=f"Request number {i}: " + "x" * (i % 5), max_tokens=20 + 7 * (i % 4))
        if i % 3 == 2:
            kw.update(temperature=0.8, top_p=0.95, seed=100 + i)
        else:
            kw.update(temperature=0)
        jobs.append((kw, i % 2 == 0))  # half of them streamed

    def run(job):
        kw, stream = job
        if not stream:
            return c.completions.create(**kw).choices[0].text
        return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))

    alone = [run(j) for j in jobs]
    engine.cache.clear()  # under load every prompt is prefilled again
    m0 = engine.stats()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    m1 = engine.stats()
    assert together == alone
    tokens = m1["completion_tokens_total"] - m0["completion_tokens_total"]
    steps = m1["decode_steps_total"] - m0["decode_steps_total"]
    assert tokens / steps > 2, f"requests were not batched: {tokens} tokens in {steps} steps"


# -------------------------------------------------------------- bad input
def test_logit_bias(server, model, tok):
    c = client(server[0])
    prompt = "The quick brown fox"
    plain = _greedy_alone(model, tok, prompt, 20).text
    first = plain.encode()[0]  # ban the character greedy decoding starts with; favour "z" a little
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0,
                             logit_bias={str(first): -100, str(ord("z")): 5})
    ref = complete(model, tok, prompt, max_tokens=20, temperature=0, logit_bias={first: -100, ord("z"): 5})[0]
    assert r.choices[0].text == ref.text != plain
    assert chr(first) not in r.choices[0].text
    # +100 all but forces a token, even when sampling.
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                  temperature=0.8, seed=3, logit_bias={str(ord("q")): 100})
    assert r.choices[0].message.content == "q" * 8
    for bad in ({"x": 1}, {"256": 1}, {"65": 101}, {"-1": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="x", max_tokens=2, logit_bias=bad)
        assert e.value.body["param"] == "logit_bias", bad


def test_chat_logprobs_equal_the_model(server, model, tok):
    c = client(server[0])
    messages = [{"role": "user", "content": "Tell me"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and len(entries) > 0
    # The reference: the whole text in one parallel pass, log-softmax at each generated position.
    rendered = "User: Tell me\n\nAssistant:"
    gen = [b for e in entries for b in e.bytes]
    ids = torch.tensor([list(rendered.encode()) + gen])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids)[0][0], -1)
    p0 = len(rendered.encode()) - 1
    for j, e in enumerate(entries):
        assert len(e.bytes) == 1 and e.token == bytes(e.bytes).decode("utf-8", "replace")
        assert abs(e.logprob - ref[p0 + j, e.bytes[0]].item()) < 1e-4
        top = torch.topk(ref[p0 + j], 3)
        assert [t.bytes[0] for t in e.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy takes the most likely
    assert bytes(gen).decode().lstrip() == r.choices[0].message.content
    # Streaming carries the same entries, spread over the chunks.
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.bytes, round(e.logprob, 5)) for e in streamed] == [(e.bytes, round(e.logprob, 5)) for e in entries]
    # Off unless asked; top_logprobs alone is refused.
    plain = c.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=messages, max_tokens=4, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_errors_are_openai_shaped_4xx(server):
    base, _ = server
    c = client(base)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="other", prompt="x", max_tokens=5)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="x", max_tokens=5, extra_body={"bogus_field": 1})
    assert "bogus_field" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="x", max_tokens=301)
    assert "300" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="y" * 513, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"
    for bad in (dict(temperature=5), dict(top_p=1.5), dict(n=0), dict(max_tokens=0), dict(presence_penalty=3)):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=NAME, prompt="x", **{"max_tokens": 5, **bad})
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=NAME, prompt="", max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=NAME, messages=[], max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}], max_tokens=5)
    # Raw HTTP: malformed JSON, a body that is not an object, wrong types, unknown routes.
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (b'{"model": "tiny-test", "prompt": 5}', 400), (b"", 400)):
        resp = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == status, body
        err = resp.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        assert "Traceback" not in resp.text
    resp = httpx.get(base + "/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = httpx.get(base + "/v1/completions")
    assert resp.status_code == 405 and "error" in resp.json()
    assert httpx.get(base + "/health").json()["status"] == "ok"  # still serving


def test_api_key_checked_on_every_request(model, tok):
    with serving(model, tok, api_key="s3cret", max_batch=2) as (base, _):
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert httpx.get(base + "/health").status_code == 401
        assert httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "x"}).json()["error"]["code"] == "invalid_api_key"
        good = client(base, "s3cret")
        assert good.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0).usage.completion_tokens == 3
        assert httpx.get(base + "/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_queue_bound_gives_429_and_disconnect_frees_slot(model, tok):
    with serving(model, tok, max_batch=1, max_queue=1, max_tokens_limit=100000) as (base, engine):
        c = client(base)
        long = dict(model=NAME, prompt="long", max_tokens=100000, temperature=0, stream=True)
        with httpx.Client(timeout=30) as h, h.stream("POST", base + "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            got = 0
            for line in lines:  # the first request is decoding
                got += line.startswith("data: ")
                if got >= 3:
                    break
            queued = threading.Thread(target=lambda: c.completions.create(model=NAME, prompt="q", max_tokens=2, temperature=0))
            queued.start()
            deadline = time.monotonic() + 10
            while engine.stats()["waiting_requests"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=NAME, prompt="x", max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        # The client hung up: its slot goes to the queued request (which could
        # not run before: max_batch 1), long before 100000 tokens.
        queued.join(60)
        assert not queued.is_alive()
        deadline = time.monotonic() + 5
        while engine.stats()["running_sequences"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.stats()["requests_cancelled"] >= 1
        assert engine.stats()["completion_tokens_total"] < 100000


class _FailsOnce:
    """The model, except that its first RNN step raises (a device error, say)."""

    def __init__(self, model):
        self.model, self.config, self.device, self.failures = model, model.config, model.device, 1

    def new_state(self, batch):
        return self.model.new_state(batch)

    def __call__(self, tokens, state=None, *, logits="all"):
        if tokens.shape[1] == 1 and self.failures:
            self.failures -= 1
            raise RuntimeError("simulated device failure")
        return self.model(tokens, state, logits=logits)


def test_failed_step_is_a_clean_500_and_the_server_goes_on(model, tok):
    with serving(_FailsOnce(model), tok, max_batch=4) as (base, engine):
        c = client(base)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=NAME, prompt="boom", max_tokens=5, temperature=0)
        assert e.value.status_code == 500
        assert "RuntimeError" in e.value.body["message"] and "Traceback" not in str(e.value.body)
        r = c.completions.create(model=NAME, prompt="boom", max_tokens=5, temperature=0)
        assert r.choices[0].text == _greedy_alone(model, tok, "boom", 5).text
        assert engine.stats()["requests_failed"] == 1


# ------------------------------------------------------- hostile clients
def _raw_http(base, request: bytes, timeout=10.0) -> bytes:
    """Send ``request`` bytes on a fresh connection (from a thread, so that an
    answer sent before the server has read everything is still received); the
    answer, read until the server closes the connection."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(base)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        def send():
            with contextlib.suppress(OSError):
                s.sendall(request)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_non_streamed_request_is_cancelled_when_the_client_leaves(model, tok):
    with serving(model, tok, max_batch=2, max_tokens_limit=100000) as (base, engine):
        import json as _json
        import socket
        from urllib.parse import urlparse

        body = _json.dumps({"model": NAME, "prompt": "long", "max_tokens": 100000, "temperature": 0}).encode()
        u = urlparse(base)
        s = socket.create_connection((u.hostname, u.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait(lambda: engine.stats()["running_sequences"] == 1, timeout=120)  # a first use may compile the kernels
        s.close()  # the client hangs up before the answer
        # Cancelled at the next poll (DISCONNECT_POLL_S), not after 100000 tokens.
        _wait(lambda: engine.stats()["running_sequences"] == 0, timeout=20)
        st = engine.stats()
        assert st["requests_cancelled"] == 1
        assert st["completion_tokens_total"] < 100000


def test_chunked_body_over_the_limit_is_refused_while_reading(model, tok):
    from rwkvkit.serve import app as app_mod

    with serving(model, tok, max_batch=2) as (base, engine):
        # A chunked body (no Content-Length) of 9 MiB: refused with 413 once
        # 8 MiB have arrived, without reading the rest.
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        piece = b"x" * 2**20
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        n = app_mod.MAX_BODY_BYTES // len(piece) + 1
        answer = _raw_http(base, head + chunk * n + b"0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"request body larger than" in answer
        # A chunked body under the limit is served.
        good = b'{"model": "tiny-test", "prompt": "hi", "max_tokens": 2, "temperature": 0}'
        close = head.replace(b"chunked\r\n", b"chunked\r\nConnection: close\r\n")
        answer = _raw_http(base, close + b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good))
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert httpx.get(base + "/health").json()["status"] == "ok"


def test_bad_unicode_deep_json_and_huge_seeds_are_400(server):
    base, _ = server
    post = lambda body: httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})  # noqa: E731
    chat = lambda body: httpx.post(base + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})  # noqa: E731
    cases = [
        (post, b'{"model": "tiny-test", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        (chat, b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 2}', "messages"),
        (post, b'{"model": "tiny\\ud800", "prompt": "x", "max_tokens": 2}', "model"),
        (post, b'{"model": "tiny-test", "prompt": "x", "max_tokens": 2, "seed": 18446744073709551616}', "seed"),
        (post, b'{"model": "tiny-test", "prompt": "x", "max_tokens": 2, "seed": 18446744073709551615, "n": 2}', "seed"),
        (post, b'{"model": "tiny-test", "prompt": "x", "max_tokens": 2, "seed": -9223372036854775809}', "seed"),
        (post, b'{"a": ' * 5000 + b"1" + b"}" * 5000, None),
        (post, b"[" * 5000 + b"]" * 5000, None),
    ]
    for send, body, param in cases:
        r = send(body)
        assert r.status_code == 400, (body[:80], r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
        if param:
            assert (err["param"] or "").startswith(param), (body[:80], err)
    # The largest seeds that fit still work: 2**64 - 1 alone, 2**64 - 2 with n=2.
    for seed, n in ((2**64 - 1, 1), (2**64 - 2, 2), (-(2**63), 1)):
        r = post(b'{"model": "tiny-test", "prompt": "x", "max_tokens": 2, "seed": %d, "n": %d}' % (seed, n))
        assert r.status_code == 200, r.text
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_wrong_types_are_refused(server):
    base, _ = server
    for extra in ({"temperature": "0.5"}, {"max_tokens": True}, {"n": "2"}, {"stream": 1}, {"top_p": "1"},
                  {"seed": True}, {"echo": "yes"}, {"prompt": [1, True]}):
        body = {"model": NAME, "prompt": "x", "max_tokens": 2, **extra}
        r = httpx.post(base + "/v1/completions", json=body)
        assert r.status_code == 400, (extra, r.text[:200])
        assert r.json()["error"]["param"] == next(iter(extra)) or next(iter(extra)) in r.json()["error"]["message"], r.text
    # Integers for floats stay accepted (JSON has one number type).
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2, "temperature": 0, "top_p": 1})
    assert r.status_code == 200, r.text


def test_auth_and_rate_limit_headers(model, tok):
    with serving(model, tok, api_key="s3cret", max_batch=1, max_queue=0, max_tokens_limit=100000) as (base, engine):
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer"})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        long = dict(model=NAME, prompt="long", max_tokens=100000, temperature=0, stream=True)
        with httpx.Client(timeout=30, headers=auth) as h, h.stream("POST", base + "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            _wait(lambda: engine.stats()["running_sequences"] == 1)
            r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, headers=auth)
            assert r.status_code == 429, (r.text, engine.stats())
            assert int(r.headers["retry-after"]) >= 1


def test_empty_api_key_is_refused(model, tok):
    from rwkvkit.errors import RwkvkitError

    with pytest.raises(RwkvkitError, match="empty"):
        create_app(Engine(model, tok), NAME, api_key="")


def test_host_header_checked_against_dns_rebinding(model, tok):
    engine = Engine(model, tok, EngineConfig(max_batch=2))
    app = create_app(engine, NAME, allowed_hosts=["my.example"], cors_origins=["http://app.example"])
    server, sock = make_server(app, "127.0.0.1", 0, "warning")
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait(lambda: server.started, 20)
    base = f"http://127.0.0.1:{port}"
    try:
        for host, ok in (("evil.example", False), (f"evil.example:{port}", False), ("127.0.0.1", True),
                         (f"localhost:{port}", True), ("[::1]:80", True), ("my.example", True), ("MY.EXAMPLE:1", True),
                         ("sub.my.example", False)):
            r = httpx.get(base + "/v1/models", headers={"Host": host})
            assert (r.status_code == 200) == ok, (host, r.status_code, r.text[:200])
            if not ok:
                assert r.status_code == 421 and "Host" in r.json()["error"]["message"]
        # CORS only for the origin given.
        pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        r = httpx.options(base + "/v1/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        server.should_exit = True
        thread.join(10)


class _Blocking:
    """The model, except that a decode step waits until ``release`` is set."""

    def __init__(self, model):
        self.model, self.config, self.device = model, model.config, model.device
        self.entered, self.release = threading.Event(), threading.Event()

    def new_state(self, batch):
        return self.model.new_state(batch)

    def __call__(self, tokens, state=None, *, logits="all"):
        if tokens.shape[1] == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.model(tokens, state, logits=logits)


def test_engine_stop_does_not_forget_a_running_scheduler(model, tok):
    from rwkvkit.serve.engine import GenRequest
    from rwkvkit.sampling import SamplingConfig

    blocking = _Blocking(model)
    engine = Engine(blocking, tok, EngineConfig(max_batch=2)).start()
    first = engine._thread
    events = []
    engine.submit(GenRequest(ids=[65], sampling=SamplingConfig(temperature=0), max_tokens=5, emit=events.append))
    assert blocking.entered.wait(20)
    assert engine.stop(timeout=0.2) is False  # still inside a step
    assert engine._thread is first and first.is_alive()
    from rwkvkit.errors import RwkvkitError

    with pytest.raises(RwkvkitError, match="still"):
        engine.start()  # never a second scheduler on the same model
    blocking.release.set()
    assert engine.stop(timeout=20) is True
    assert engine._thread is None and not first.is_alive()
    assert events[-1]["type"] == "error"  # the pending request was told
    engine.start()  # a clean restart
    assert engine.running
    engine.stop()
