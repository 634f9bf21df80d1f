"""Tokenizers against independent implementations: the `rwkv` package's
TRIE_TOKENIZER (World) and the `tokenizers` library (20B), on the shared texts,
LAMBADA and random Unicode; streaming decode; bytes; errors."""

from __future__ import annotations

import json
import os
import random

import pytest

from conftest import importorskip, shared_file
from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    WorldTokenizer,
    check_vocab,
    load_tokenizer,
    parse_world_vocab,
)


def _random_unicode(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    out = []
    while len(out) < n:
        c = rnd.choice([rnd.randint(0, 127), rnd.randint(0x80, 0x7FF), rnd.randint(0x800, 0xFFFF), rnd.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:  # surrogates have no UTF-8 form
            out.append(chr(c))
    return "".join(out)


def _full_corpus() -> dict[str, str]:
    texts = {
        "tinyshakespeare": shared_file("tinyshakespeare.txt").read_text(encoding="utf-8"),
        "enwik8_small": shared_file("enwik8_small.txt").read_text(encoding="utf-8"),
    }
    with open(shared_file("lambada_test.jsonl"), encoding="utf-8") as f:
        texts["lambada"] = "\n".join(json.loads(line)["text"] for line in f)
    texts["random_unicode"] = _random_unicode(100_000, seed=0)
    # Scripts and emoji whose tokens split multi-byte characters.
    rnd = random.Random(1)
    texts["cjk_emoji"] = "".join(
        chr(rnd.choice([rnd.randint(0x4E00, 0x9FFF), rnd.randint(0x1F300, 0x1F64F), rnd.randint(0x0400, 0x04FF), rnd.randint(32, 126)]))
        for _ in range(50_000)
    )
    return texts


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    """About 2.5 MB: all of LAMBADA, the first 300 kB of the other texts, random Unicode."""
    texts = _full_corpus()
    for name in ("tinyshakespeare", "enwik8_small"):
        texts[name] = texts[name][:300_000]
    return texts


@pytest.fixture(scope="module")
def pip_world():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.fixture(scope="module")
def world_py():
    return WorldTokenizer(use_fast=False)


@pytest.fixture(scope="module")
def hf_20b():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(shared_file("tokenizers/20B_tokenizer.json")))


@pytest.fixture(scope="module")
def ours_20b():
    return load_tokenizer(shared_file("tokenizers/20B_tokenizer.json"))


# -------------------------------------------------------------------- World
def test_world_vocab_matches_pip_table(world, pip_world):
    assert world.vocab_size == 65530
    assert world.table[0] == b"" and world.eos_id == 0
    assert {i: b for i, b in enumerate(world.table) if i} == pip_world.idx2token
    # The shared copy of the vocabulary parses to the same table.
    assert parse_world_vocab(shared_file("tokenizers/rwkv_vocab_v20230424.txt")) == world.table


def test_world_fast_backend_is_used(world):
    # pyrwkv-tokenizer is a test dependency: the fast path is what we test.
    assert world.backend == "pyrwkv-tokenizer"


def test_world_ids_equal_rwkv_package(world, pip_world, corpus):
    for name, text in corpus.items():
        ours = world.encode(text)
        assert ours == pip_world.encode(text), name
        assert world.decode(ours) == text, name


@pytest.mark.slow
def test_world_ids_equal_rwkv_package_full_texts(world, pip_world):
    for name, text in _full_corpus().items():
        assert world.encode(text) == pip_world.encode(text), name


def test_world_python_path_equals_rwkv_package(world_py, pip_world, corpus):
    # The pure-Python trie (used without pyrwkv-tokenizer) on a slice of each text.
    for name, text in corpus.items():
        piece = text[:30_000]
        assert world_py.encode(piece) == pip_world.encode(piece), name


def test_world_invalid_utf8_bytes(world, world_py, pip_world):
    rnd = random.Random(3)
    data = bytes(rnd.randrange(256) for _ in range(20_000))
    want = pip_world.encodeBytes(data)
    assert world_py.encode_bytes(data) == want
    # Text read with errors="surrogateescape" keeps its raw bytes.
    assert world.encode(data.decode("utf-8", errors="surrogateescape")) == want
    assert world.decode_bytes(want) == data


def test_world_streaming_never_prints_premature_replacement(world, corpus):
    text = corpus["cjk_emoji"][:20_000]
    ids = world.encode(text)
    # Make sure the test exercises tokens that end inside a character.
    assert any(world.table[i] and not _valid_utf8(world.table[i]) for i in ids)
    dec = world.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_streaming_shows_bytes_that_never_become_valid(world):
    # 0xE4 starts a 3-byte character; "A" proves it never completes.
    ids = [0xE4 + 1, ord("A") + 1]
    dec = world.stream_decoder()
    assert dec.push(ids[0]) == ""
    assert dec.push(ids[1]) == "\ufffdA"
    dec = world.stream_decoder()
    assert dec.push(0xE4 + 1) == "" and dec.flush() == "\ufffd"


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------- 20B
def test_20b_ids_equal_tokenizers(ours_20b, hf_20b, corpus):
    assert ours_20b.vocab_size == 50277 and ours_20b.eos_id == 0
    # Our encode is tokenizers' own; what is ours is the byte table behind
    # decode and streaming, so a slice of each text is enough here.
    for name, text in corpus.items():
        text = text[:100_000]
        ids = hf_20b.encode(text, add_special_tokens=False).ids
        assert ours_20b.encode(text) == ids, name
        assert ours_20b.decode(ids) == hf_20b.decode(ids), name


def test_20b_streaming_equals_full_decode(ours_20b, hf_20b, corpus):
    text = corpus["cjk_emoji"][:10_000] + corpus["lambada"][:10_000]
    ids = hf_20b.encode(text).ids
    dec = ours_20b.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == hf_20b.decode(ids) == text


def test_20b_found_in_model_folder(tmp_path, hf_20b):
    (tmp_path / "tokenizer.json").write_bytes(shared_file("tokenizers/20B_tokenizer.json").read_bytes())
    tok = load_tokenizer("20B", model_path=tmp_path / "model.safetensors")
    assert tok.encode("\nThe") == hf_20b.encode("\nThe").ids


def test_20b_missing_says_where_to_put_it(tmp_path, monkeypatch):
    import rwkvkit.tokenizer as T

    monkeypatch.setattr(T, "user_cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(RwkvkitError) as exc:
        load_tokenizer("20B", model_path=tmp_path)
    msg = str(exc.value)
    assert "20B_tokenizer.json" in msg and str(tmp_path / "cache") in msg and "\n" not in msg


# -------------------------------------------------------------------- bytes
def test_bytes_tokenizer():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_id is None
    text = "ROMEO: ça va? 你好 🙂"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    raw = b"\xff\xfeabc\xe4\xb8"
    assert tok.encode(raw.decode("utf-8", errors="surrogateescape")) == list(raw)
    with pytest.raises(RwkvkitError, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(RwkvkitError, match="not a byte"):
        tok.decode([65, 300])


# ------------------------------------------------------------ loading, errors
def test_load_by_path_and_folder(tmp_path):
    vocab = shared_file("tokenizers/rwkv_vocab_v20230424.txt")
    assert isinstance(load_tokenizer(vocab), WorldTokenizer)
    assert isinstance(load_tokenizer(shared_file("tokenizers/20B_tokenizer.json")), HFTokenizer)
    assert isinstance(load_tokenizer(vocab.parent), HFTokenizer)  # tokenizer.json absent: 20B_tokenizer.json first
    with pytest.raises(RwkvkitError, match="unknown tokenizer"):
        load_tokenizer("gpt5")
    with pytest.raises(RwkvkitError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 'a' 1\n2 'bc' 3\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="has 2 bytes but the line says 3"):
        load_tokenizer(bad)
    bad.write_text("1 'a' 1\n2 __import__('os') 1\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="literal"):
        load_tokenizer(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="cannot read tokenizer file"):
        load_tokenizer(broken)


def test_vocab_mismatch_is_caught(world):
    with pytest.raises(RwkvkitError, match="not the model's tokenizer"):
        check_vocab(world, 256)
    with pytest.raises(RwkvkitError, match="not the model's tokenizer"):
        check_vocab(ByteTokenizer(), 50277)
    check_vocab(world, 65536)  # World models have 6 unused rows
    check_vocab(ByteTokenizer(), 256)


def test_download_20b_with_a_stand_in_hub(tmp_path, monkeypatch, ours_20b):
    """--download-tokenizer: the hub's file is copied once into the user cache
    (atomically) and used from there; a failed download is one clean error.
    The network call is replaced by a stand-in (no network in tests)."""
    importorskip("huggingface_hub")
    import huggingface_hub

    from rwkvkit import tokenizer as tk
    from rwkvkit.errors import RwkvkitError

    src = shared_file("tokenizers/20B_tokenizer.json")
    monkeypatch.setattr(tk, "user_cache_dir", lambda: tmp_path / "cache")
    calls = []

    def fake_download(repo, filename, **kw):
        calls.append((repo, filename))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(RwkvkitError, match="--download-tokenizer"):
        tk.find_20b()  # no download allowed: names the flag
    path = tk.find_20b(download=True)
    assert path == tmp_path / "cache" / tk.TWENTY_B_FILE and path.read_bytes() == src.read_bytes()
    assert calls == [(tk.TWENTY_B_HUB_REPO, "tokenizer.json")]
    tok = load_tokenizer("20B", download=True)  # now from the cache, no second download
    assert len(calls) == 1 and list(tok.encode("Hello world")) == list(ours_20b.encode("Hello world"))

    def failing(repo, filename, **kw):
        raise OSError("Connection refused\nmore details")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    path.unlink()
    with pytest.raises(RwkvkitError, match=r"could not download the 20B tokenizer from .*: Connection refused$"):
        tk.find_20b(download=True)
    assert not path.exists()
