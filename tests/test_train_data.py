"""`rwkvkit prepare` and the token-file readers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rwkvkit.cli import main
from rwkvkit.errors import RwkvkitError
from rwkvkit.train import data as D


def _read(folder, split):
    t = D.load_tokens(folder, split)
    return bytes(np.asarray(t.tokens, dtype=np.uint8)), t


def test_single_file_split_at_line_end(tmp_path):
    text = "".join(f"line {i:04d} of the text\n" for i in range(200)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    meta = D.prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.1, progress=False)
    train, td = _read(tmp_path / "out", "train")
    val, vd = _read(tmp_path / "out", "val")
    # Byte tokenizer: id = byte; the two splits concatenate to the input.
    assert train + val == text
    assert train.endswith(b"\n") and len(train) >= 0.9 * len(text) and len(train) < 0.9 * len(text) + 30
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["dtype"] == "uint16"
    assert td.vocab_size == 256 and td.tokenizer == "bytes"
    assert td.tokens.dtype == np.uint16
    assert list(td.doc_starts) == [0] and list(vd.doc_starts) == [0]


def test_folder_jsonl_and_boundaries(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.md").write_text("beta!")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two", "three"])]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    D.prepare([src, tmp_path / "c.jsonl"], tmp_path / "out", val_fraction=0.0, separator=10, progress=False)
    train, td = _read(tmp_path / "out", "train")
    assert train == b"alpha\nbeta!\none\ntwo\nthree\n"
    assert list(td.doc_starts) == [0, 6, 12, 16, 20]
    val, _ = _read(tmp_path / "out", "val")
    assert val == b""


def test_jsonl_documents_are_not_split(tmp_path):
    docs = [f"document number {i}" for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    meta = D.prepare([tmp_path / "d.jsonl"], tmp_path / "out", text_field="body", val_fraction=0.25, progress=False)
    train, _ = _read(tmp_path / "out", "train")
    val, _ = _read(tmp_path / "out", "val")
    assert train + val == "".join(docs).encode()
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 20
    assert 3 <= meta["splits"]["val"]["documents"] <= 7


def test_large_vocab_uses_uint32(tmp_path, monkeypatch):
    class Big:
        name = "big"
        vocab_size = 70000
        eot_id = 0

        def encode(self, text):
            return [65535 + ord(c) for c in text]

    monkeypatch.setattr(D, "get_tokenizer", lambda name: Big())
    (tmp_path / "a.txt").write_text("abc")
    meta = D.prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="big", val_fraction=0.0, progress=False)
    t = D.load_tokens(tmp_path / "out", "train")
    assert meta["dtype"] == "uint32" and meta["separator"] == 0
    assert list(t.tokens) == [65535 + 97, 65535 + 98, 65535 + 99, 0]


def test_streaming_over_chunk_boundaries(tmp_path, monkeypatch):
    # Force tiny read chunks: the output must not depend on where reads end.
    monkeypatch.setattr(D, "_CHUNK", 7)
    text = ("héllo wörld\n" * 30 + "no newline at the end é").encode()
    (tmp_path / "a.txt").write_bytes(text)
    D.prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.3, progress=False)
    train, _ = _read(tmp_path / "out", "train")
    val, _ = _read(tmp_path / "out", "val")
    assert train + val == text


def test_bad_inputs(tmp_path):
    with pytest.raises(RwkvkitError, match="does not exist"):
        D.prepare([tmp_path / "missing.txt"], tmp_path / "out", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(RwkvkitError, match=r"bad.jsonl:2"):
        D.prepare([tmp_path / "bad.jsonl"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(RwkvkitError, match="val_fraction"):
        D.prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=1.5, progress=False)
    D.prepare([tmp_path / "a.txt"], tmp_path / "ok", val_fraction=0.0, progress=False)
    with open(tmp_path / "ok" / "train.bin", "r+b") as fh:
        fh.truncate(2)
    with pytest.raises(RwkvkitError, match="truncated"):
        D.load_tokens(tmp_path / "ok", "train")
    with pytest.raises(RwkvkitError, match="neither"):
        D.load_tokens(tmp_path / "a.txt", "train")


def test_cli_prepare(tmp_path, capsys):
    text = "".join(f"hello world {i}\n" for i in range(40)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    assert main(["prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--no-progress", "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    # Read back what the command wrote: the two splits are the input's bytes,
    # split at a line end near 75%, and the summary line reports those counts.
    train, td = _read(tmp_path / "out", "train")
    val, _ = _read(tmp_path / "out", "val")
    assert train + val == text and train.endswith(b"\n")
    assert 0.75 * len(text) <= len(train) < 0.75 * len(text) + 20
    assert f"{len(train):,} train tokens (1 documents), {len(val):,} validation tokens (1)" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["splits"]["val"]["tokens"] == len(val)
    # --separator N goes after each document; documents start after it.
    (tmp_path / "b.txt").write_bytes(b"second doc\n")
    argv = ["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(tmp_path / "sep"),
            "--no-progress", "--val-fraction", "0", "--separator", "7"]
    assert main(argv) == 0
    both, t = _read(tmp_path / "sep", "train")
    assert both == text + b"\x07" + b"second doc\n" + b"\x07"
    assert list(t.doc_starts) == [0, len(text) + 1]
    assert main(["prepare", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_binidx(tmp_path):
    # A Megatron MMapIndexedDataset pair, written from its published layout.
    docs = [np.array([5, 6, 7], np.uint16), np.array([8, 9], np.uint16)]
    (tmp_path / "d.bin").write_bytes(b"".join(d.tobytes() for d in docs))
    sizes = np.array([len(d) for d in docs], np.int32)
    pointers = np.array([0, 6], np.int64)
    doc_idx = np.array([0, 1, 2], np.int64)
    head = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 2, 3)
    (tmp_path / "d.idx").write_bytes(head + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    t = D.load_tokens(tmp_path / "d", vocab_size=50277)
    assert list(t.tokens) == [5, 6, 7, 8, 9] and list(t.doc_starts) == [0, 3]
    with pytest.raises(RwkvkitError, match="vocab"):
        D.load_tokens(tmp_path / "d.bin")


def test_windows_are_a_function_of_the_step():
    a = D.window_offsets(1000, 17, 8, seed=1, step=5, micro=0)
    assert np.array_equal(a, D.window_offsets(1000, 17, 8, seed=1, step=5, micro=0))
    assert not np.array_equal(a, D.window_offsets(1000, 17, 8, seed=1, step=6, micro=0))
    assert a.min() >= 0 and a.max() <= 1000 - 17
    with pytest.raises(RwkvkitError, match="fewer than one window"):
        D.window_offsets(10, 17, 1, seed=0, step=0, micro=0)


def test_20b_tokenizer_ids_match_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer

    from conftest import shared_file

    path = shared_file("tokenizers/20B_tokenizer.json")
    docs = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = D.prepare([tmp_path / "d.jsonl"], tmp_path / "out", tokenizer=str(path), val_fraction=0.0, progress=False)
    ref = Tokenizer.from_file(str(path))
    expected = []
    for d in docs:
        expected += ref.encode(d).ids + [0]  # <|endoftext|> after each document
    t = D.load_tokens(tmp_path / "out", "train")
    assert list(t.tokens) == expected
    assert meta["vocab_size"] == 50277 and meta["dtype"] == "uint16" and meta["separator"] == 0
