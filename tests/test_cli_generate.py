"""`rwkvkit generate` and `rwkvkit chat` against the library, their errors,
their --help, and the model shipped inside the package."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch

import rwkvkit
from conftest import shared_file
from rwkvkit import cli
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.generate import SHIPPED_MODEL, complete, generate, load_shipped_model
from util import make_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, _ = make_model(RWKV4Config(n_layer=2, n_embd=32, vocab_size=256), seed=4)
    folder = tmp_path_factory.mktemp("m") / "tiny"
    rwkvkit.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return rwkvkit.load(model_dir)


def _run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_greedy_equals_library(model_dir, model, capsys, monkeypatch):
    args = ["generate", "--model", str(model_dir), "--temperature", "0", "--max-tokens", "30"]
    rc, out, err = _run(args + ["--prompt", "ROMEO:"], capsys)
    assert rc == 0, err
    want = generate(model, "bytes", "ROMEO:", max_tokens=30, temperature=0)
    assert out == want + "\n"
    # The prompt from stdin gives the same text; --echo prints it first.
    rc, out2, _ = _run(args, capsys, stdin="ROMEO:", monkeypatch=monkeypatch)
    assert rc == 0 and out2 == out
    rc, out3, _ = _run(args + ["--prompt", "ROMEO:", "--echo"], capsys)
    assert out3 == "ROMEO:" + out


def test_generate_seed_and_sampling_flags(model_dir, model, capsys):
    args = ["generate", "-m", str(model_dir), "-p", "KING:", "-n", "40", "--temperature", "0.9", "--top-p", "0.9",
            "--top-k", "40", "--min-p", "0.01", "--presence-penalty", "0.2", "--frequency-penalty", "0.2", "--seed", "3",
            "--ban", "10", "--stop", "zz"]
    rc, a, _ = _run(args, capsys)
    rc2, b, _ = _run(args, capsys)
    assert rc == rc2 == 0 and a == b
    want = generate(model, "bytes", "KING:", max_tokens=40, temperature=0.9, top_p=0.9, top_k=40, min_p=0.01,
                    presence_penalty=0.2, frequency_penalty=0.2, seed=3, banned_tokens=(10,), stop=["zz"])
    assert a == want + "\n"
    assert "\n" not in a[:-1]  # token 10 (newline) was banned


def test_state_out_then_state_in(model_dir, model, tmp_path, capsys):
    st = tmp_path / "s.safetensors"
    base = ["generate", "-m", str(model_dir), "--temperature", "0", "-n", "12"]
    rc, first, _ = _run(base + ["-p", "Thou art", "--state-out", str(st)], capsys)
    assert rc == 0 and st.is_file()
    rc, second, _ = _run(base + ["-p", " and", "--state-in", str(st)], capsys)
    assert rc == 0
    r1 = complete(model, "bytes", "Thou art", max_tokens=12, temperature=0)[0]
    assert first == r1.text + "\n"
    # The saved state had read the prompt and every generated token (compared
    # as ids: a random model's bytes need not be valid UTF-8).
    ids = list(b"Thou art") + r1.tokens + list(b" and")
    r2 = complete(model, "bytes", [ids], max_tokens=12, temperature=0)[0]
    assert second == r2.text + "\n"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-p", ""], "prompt is empty"),
        (["-p", "x", "--top-p", "2"], "top_p"),
        (["-p", "x", "--tokenizer", "bytes", "--max-tokens", "-3"], "max_tokens"),
        (["-p", "x", "--model", "/nonexistent/model.pth"], "nonexistent"),
        (["-p", "x", "--state-in", "/nonexistent/s.safetensors"], "does not exist"),
    ],
)
def test_generate_errors_are_one_line(model_dir, capsys, extra, message):
    argv = ["generate", "--model", str(model_dir)] + extra
    rc, out, err = _run(argv, capsys)
    assert rc == 1 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith("rwkvkit generate: error:")


def test_vocab_mismatch_fails_before_any_text(model_dir, capsys):
    rc, out, err = _run(["generate", "-m", str(model_dir), "-p", "hello", "--tokenizer", "world"], capsys)
    assert rc == 1 and out == "" and "not the model's tokenizer" in err


def test_every_flag_is_explained():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for verb in ("generate", "chat"):
        for action in sub.choices[verb]._actions:
            assert action.help and action.help.strip(), f"{verb} {action.option_strings} has no help"


def test_chat_keeps_state_between_turns(model_dir, model, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "conv.safetensors"
    script = f"hi\nhow are you\n/save {saved}\n/reset\n/load {saved}\n/help\n/bogus\n/quit\nnever read\n"
    argv = ["chat", "-m", str(model_dir), "--temperature", "0", "-n", "20"]
    rc, out, err = _run(argv, capsys, stdin=script, monkeypatch=monkeypatch)
    assert rc == 0, err
    opts = dict(max_tokens=20, temperature=0, stop=["\n\n"], want_state=True)
    r1 = complete(model, "bytes", "User: hi\n\nAssistant:", **opts)[0]
    turn2 = ("" if r1.finish_reason == "stop" else "\n\n") + "User: how are you\n\nAssistant:"
    r2 = complete(model, "bytes", turn2, state=r1.state, **opts)[0]
    lines = out.split("\n")
    assert out.startswith(f"Assistant:{r1.text}\nAssistant:{r2.text}\n")
    assert f"(state saved to {saved})" in lines and "(conversation reset)" in lines
    assert f"(state loaded from {saved})" in lines and "commands:" in lines
    assert any(line.startswith("(unknown command /bogus") for line in lines)
    assert "never read" not in out
    loaded = rwkvkit.State.load(saved)
    assert loaded.allclose(r2.state, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- shipped model
def test_shipped_model_is_in_the_package():
    assert (SHIPPED_MODEL / "model.safetensors").is_file() and (SHIPPED_MODEL / "config.json").is_file()
    size = (SHIPPED_MODEL / "model.safetensors").stat().st_size
    assert size < 8 * 2**20


def test_shipped_model_has_learned_shakespeare():
    # Bits per character on the start of the validation split (the last 10%
    # of Tiny Shakespeare, never trained on): a uniform guess over bytes is 8.
    model = load_shipped_model()
    raw = shared_file("tinyshakespeare.txt").read_bytes()
    val = torch.tensor(list(raw[int(0.9 * len(raw)) :][:8001]))
    with torch.no_grad():
        logits, _ = model(val[None, :-1])
    bpc = torch.nn.functional.cross_entropy(logits[0], val[1:]).item() / math.log(2)
    assert bpc < 2.5, bpc


def test_readme_command_runs_the_shipped_model():
    # The console entry point, as the README's first command runs it.
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvkit", "generate", "--prompt", "ROMEO:", "--max-tokens", "60", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 20


# ------------------------------------------------------- file errors keep going
def test_chat_save_to_an_impossible_path_goes_on(model_dir, model, tmp_path, capsys, monkeypatch):
    """/save that cannot write reports why and the conversation goes on (the
    old code ended the chat with a traceback); /load of a folder says so."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    good = tmp_path / "ok.safetensors"
    script = f"hi\n/save {blocker}/x.safetensors\n/save {folder}\n/load {folder}\nhow are you\n/save {good}\n/quit\n"
    rc, out, err = _run(["chat", "-m", str(model_dir), "--temperature", "0", "-n", "20"], capsys, stdin=script, monkeypatch=monkeypatch)
    assert rc == 0, err
    lines = out.split("\n")
    assert any(line.startswith(f"(cannot save to {blocker}/x.safetensors: ") for line in lines), out
    assert any(line.startswith(f"(cannot save to {folder}: ") for line in lines), out
    assert any(line.startswith("(cannot load: ") and "is a directory" in line for line in lines), out
    assert not any("does not exist" in line for line in lines)
    # The second turn continued the first one's state.
    opts = dict(max_tokens=20, temperature=0, stop=["\n\n"], want_state=True)
    r1 = complete(model, "bytes", "User: hi\n\nAssistant:", **opts)[0]
    turn2 = ("" if r1.finish_reason == "stop" else "\n\n") + "User: how are you\n\nAssistant:"
    r2 = complete(model, "bytes", turn2, state=r1.state, **opts)[0]
    assert f"Assistant:{r2.text}" in lines
    assert rwkvkit.State.load(good).allclose(r2.state, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "ok.safetensors"]


def test_generate_state_out_failure_keeps_the_text(model_dir, tmp_path, capsys, monkeypatch):
    """A --state-out that fails when written: the text is printed, then one
    error line and exit 1 (the old code ended in a traceback)."""
    args = ["generate", "-m", str(model_dir), "-p", "ROMEO:", "--temperature", "0", "-n", "15"]
    rc, want, _ = _run(args, capsys)
    assert rc == 0
    from rwkvkit import state as state_mod

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_mod.StateBase, "save", full_disk)
    rc, out, err = _run(args + ["--state-out", str(tmp_path / "s.safetensors")], capsys)
    assert rc == 1 and out == want
    assert err.count("\n") == 1 and err.startswith("rwkvkit generate: error: the text was generated but the state could not be saved")
    assert "No space left on device" in err


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_generate_state_out_that_cannot_be_a_file_is_refused_first(model_dir, tmp_path, capsys, where):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    dest = tmp_path if where == "folder" else blocker / "s.safetensors"
    rc, out, err = _run(["generate", "-m", str(model_dir), "-p", "x", "-n", "3", "--state-out", str(dest)], capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1 and "--state-out" in err
