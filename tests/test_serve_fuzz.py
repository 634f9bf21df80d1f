"""Property-based fuzzing of the HTTP API with schemathesis, from the
server's own OpenAPI schema (FastAPI's, with the request models added): no
generated request, valid or not, gets a 5xx, and the server is healthy
afterwards.  A bounded number of examples per operation by default; many
more under ``-m slow``."""

from __future__ import annotations

import zlib

import pytest

from conftest import importorskip

importorskip("fastapi")
schemathesis = importorskip("schemathesis")
httpx = importorskip("httpx")

from hypothesis import HealthCheck, settings  # noqa: E402

from test_serve import NAME, _printable_model, serving  # noqa: E402
from rwkvkit.serve import Engine, EngineConfig, create_app  # noqa: E402
from rwkvkit.tokenizer import ByteTokenizer  # noqa: E402

LIMITS = dict(max_batch=4, max_queue=64, max_prompt_tokens=256, max_tokens_limit=16)


def _schema():
    # The schema of an app like the served one (building it starts nothing).
    app = create_app(Engine(_printable_model(), ByteTokenizer(), EngineConfig(**LIMITS)), NAME)
    doc = app.openapi()
    return schemathesis.openapi.from_dict(doc)


schema = _schema()


@pytest.fixture(scope="module")
def live():
    with serving(_printable_model(), ByteTokenizer(), **LIMITS) as (base, engine):
        yield base, engine


def test_schema_describes_the_request_bodies():
    doc = schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert "requestBody" in doc["paths"][path]["post"], path
    props = doc["components"]["schemas"]["CompletionBody"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "echo", "temperature"} <= set(props)


COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def _check(case, base):
    # Our model name most of the time, so that requests reach generation.
    if isinstance(case.body, dict) and "model" in case.body and zlib.crc32(repr(case.body).encode()) % 4:
        case.body["model"] = NAME
    response = case.call(base_url=base, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])


@schema.parametrize()
@settings(max_examples=25, **COMMON)
def test_no_5xx(case, live):
    _check(case, live[0])


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=400, **COMMON)
def test_no_5xx_many(case, live):
    _check(case, live[0])


def test_healthy_afterwards(live):
    base, engine = live
    assert httpx.get(base + "/health").json()["status"] == "ok" and engine.running
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
