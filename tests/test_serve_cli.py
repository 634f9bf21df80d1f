"""`rwkvkit serve` on the command line: flag errors, and a real start on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import importorskip

importorskip("fastapi")
importorskip("uvicorn")

import rwkvkit  # noqa: E402
from rwkvkit.cli import main  # noqa: E402
from rwkvkit.models.rwkv4 import RWKV4Config  # noqa: E402
from rwkvkit.init import random_state_dict  # noqa: E402
from rwkvkit.models.rwkv4 import RWKV  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = RWKV4Config(n_layer=1, n_embd=32, vocab_size=256)
    model = RWKV(cfg)
    model.load_state_dict(random_state_dict(cfg))
    folder = tmp_path_factory.mktemp("serve") / "tiny-model"
    rwkvkit.save(model, folder)
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-key-env", "RWKVKIT_TEST_SURELY_UNSET_VAR"], "RWKVKIT_TEST_SURELY_UNSET_VAR"),
        (["--api-key", "a", "--api-key-env", "B"], "not both"),
        (["--api-key", ""], "--api-key is empty"),
        (["--api-key", "  "], "--api-key is empty"),
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "max_batch"),
        (["--chat-user", " "], "--chat-user"),
    ],
)
def test_bad_flags_are_one_line_errors(model_dir, capsys, argv, message):
    assert main(["serve", "--model", str(model_dir), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkvkit serve: error:") and message in err
    assert len(err.splitlines()) == 1


def test_serve_verb_starts_on_loopback(model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rwkvkit", "serve", "--model", str(model_dir), "--port", "0", "--log-level", "warning", "--threads", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        base = None
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            base = m.group(1) if m else None
        assert base, "the server did not say where it listens"
        health = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())
        assert health == {"status": "ok", "model": "tiny-model"}
        models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=30).read())
        assert [m["id"] for m in models["data"]] == ["tiny-model"]
        req = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"model": "tiny-model", "prompt": "hi", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"content-type": "application/json"},
        )
        out = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}}
    finally:
        proc.terminate()
        proc.wait(30)
