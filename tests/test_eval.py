"""Evaluation: perplexity with the state carried across windows, LAMBADA,
the lm-evaluation-harness adapter and the bench verb, each checked against an
independent implementation (HF transformers, the `rwkv` package, the
`tokenizers` library)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, shared_file
from util import hf_model, make_model, pip_model

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.eval import lambada, perplexity, read_lambada, score_continuations, split_passage, stream_nll
from rwkvkit.eval.perplexity import text_pieces
from rwkvkit.tokenizer import ByteTokenizer, load_tokenizer

BYTES_CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=256)


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    # These models are tiny: a second thread only adds synchronisation, which
    # on a loaded 2-core machine costs up to 100x (measured).
    torch.set_num_threads(1)
    yield


class _HFReference:
    """transformers' RwkvForCausalLM on the same random weights, built once."""

    def __init__(self, cfg, seed):
        self.model, self.sd = make_model(cfg, seed=seed)
        self.hf = hf_model(self.sd, cfg)

    def nll(self, ids: list[int]) -> float:
        """Total -log p over ids[1:], from ONE call over the whole sequence."""
        with torch.no_grad():
            logits = self.hf(torch.tensor([ids])).logits[0].double()
        return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


@pytest.fixture(scope="module")
def ref():
    return _HFReference(BYTES_CFG, seed=3)


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory):
    text = shared_file("tinyshakespeare.txt").read_bytes()[:1201]
    path = tmp_path_factory.mktemp("ppl") / "slice.txt"
    path.write_bytes(text)
    return path


@pytest.mark.parametrize("window", [1, 7, 256, 5000])
def test_ppl_windows_equal_one_hf_pass(ref, shakespeare_slice, tmp_path, window):
    ids = list(shakespeare_slice.read_bytes())
    if window == 1:
        ids = ids[:150]  # one RNN step per token: keep it short
        shakespeare_slice = tmp_path / "short.txt"
        shakespeare_slice.write_bytes(bytes(ids))
    want = ref.nll(ids)
    res = perplexity(ref.model, shakespeare_slice, "bytes", window=window, progress=False)
    assert res.tokens == len(ids) - 1 == res.bytes
    assert res.windows == math.ceil((len(ids) - 1) / window)
    assert res.nll == pytest.approx(want, rel=2e-6)
    assert res.ppl == pytest.approx(math.exp(want / (len(ids) - 1)), rel=2e-6)
    assert res.bits_per_byte == pytest.approx(want / math.log(2) / (len(ids) - 1), rel=2e-6)


def test_ppl_bos_scores_first_token(ref, shakespeare_slice):
    ids = list(shakespeare_slice.read_bytes())[:400]
    res = stream_nll(ref.model, ids, window=64, bos=10)
    assert res.tokens == len(ids)
    assert res.nll == pytest.approx(ref.nll([10] + ids), rel=2e-6)


def test_ppl_token_file_from_prepare(ref, tmp_path, shakespeare_slice):
    from rwkvkit.train.data import load_tokens, prepare

    prepare([shakespeare_slice], tmp_path / "tok", tokenizer="bytes", val_fraction=0.3, progress=False)
    for given, split in ((tmp_path / "tok", "val"), (tmp_path / "tok" / "train.bin", "train"), (tmp_path / "tok" / "meta.json", "val")):
        ids = np.asarray(load_tokens(tmp_path / "tok", split).tokens).tolist()
        res = perplexity(ref.model, given, window=333, progress=False)
        assert res.tokens == len(ids) - 1
        assert res.nll == pytest.approx(ref.nll(ids), rel=2e-6)


def test_ppl_limit_and_errors(ref, tmp_path, shakespeare_slice):
    ids = list(shakespeare_slice.read_bytes())[:120]
    res = perplexity(ref.model, shakespeare_slice, "bytes", window=50, limit_tokens=120, progress=False)
    assert res.tokens == 119
    assert res.nll == pytest.approx(ref.nll(ids), rel=2e-6)
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(RwkvkitError, match="fewer than 2 tokens"):
        perplexity(ref.model, one, "bytes", progress=False)
    with pytest.raises(RwkvkitError, match="does not exist"):
        perplexity(ref.model, tmp_path / "missing.txt", "bytes", progress=False)
    with pytest.raises(RwkvkitError, match="window"):
        perplexity(ref.model, shakespeare_slice, "bytes", window=0, progress=False)
    with pytest.raises(RwkvkitError, match="vocabulary"):  # a bytes tokenizer for a 100-id model
        perplexity(make_model(ModelConfig(n_layer=1, n_embd=8, vocab_size=100))[0], shakespeare_slice, "bytes", progress=False)


@pytest.mark.parametrize("name", ["20B", "world"])
def test_text_pieces_tokenize_like_the_whole_file(name, tmp_path):
    """Tokenizing piece by piece (small pieces, many cuts) gives the ids of
    tokenizing the whole text at once."""
    file = "20B_tokenizer.json" if name == "20B" else "rwkv_vocab_v20230424.txt"
    tok = load_tokenizer(shared_file(f"tokenizers/{file}"))
    whole = tok.encode
    for corpus in ("tinyshakespeare.txt", "enwik8_small.txt"):
        data = shared_file(corpus).read_bytes()[:25000]
        data = data[: len(data.decode("utf-8", errors="ignore").encode("utf-8"))]
        path = tmp_path / corpus
        path.write_bytes(data)
        pieces = list(text_pieces(path, chunk=1024))
        assert b"".join(pieces) == data and len(pieces) > 10
        got = [i for p in pieces for i in tok.encode(p.decode("utf-8"))]
        assert got == whole(data.decode("utf-8")), corpus


# ---------------------------------------------------------------- LAMBADA
LAMBADA_CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=50277)


def _pip_lambada(pm, tok, texts, pad=187):
    """The RWKV authors' procedure (ChatRWKV v2/benchmark.py, spec 12), on the
    `rwkv` package: one full_output forward per passage, softmax, log of the
    target tokens' probabilities, greedy check."""
    logprobs, correct = [], []
    for text in texts:
        ctx, tgt = text.rsplit(" ", 1)
        src = [pad] + tok.encode(ctx)
        dst = tok.encode(" " + tgt)
        out, _ = pm.forward(src + dst, None, full_output=True)
        lp, ok = 0.0, True
        for i in range(len(dst)):
            probs = F.softmax(out[len(src) - 1 + i].float(), dim=-1)
            lp += math.log(probs[dst[i]])
            if int(torch.argmax(probs)) != dst[i]:
                ok = False
        logprobs.append(lp)
        correct.append(ok)
    return logprobs, correct


@pytest.fixture(scope="module")
def lambada_setup(tmp_path_factory):
    from tokenizers import Tokenizer

    hf_tok = Tokenizer.from_file(str(shared_file("tokenizers/20B_tokenizer.json")))

    class _Ref:
        def encode(self, text):
            return hf_tok.encode(text, add_special_tokens=False).ids

        def decode(self, ids):
            return hf_tok.decode(ids)

    tok = _Ref()
    texts = read_lambada(shared_file("lambada_test.jsonl"), limit=40)
    model, sd = make_model(LAMBADA_CFG, seed=5)
    pm = pip_model(sd, tmp_path_factory.mktemp("lambada"))
    return tok, texts, model, pm


def test_lambada_matches_rwkv_package(lambada_setup):
    ref_tok, texts, model, pm = lambada_setup
    tok = load_tokenizer(shared_file("tokenizers/20B_tokenizer.json"))
    # Make some passages "correct": replace the last word by the reference
    # model's greedy next token when that token is a space and one word, so
    # the accuracy is tested on more than zeros.
    forced = 0
    for n in range(0, 10):
        ctx = texts[n].rsplit(" ", 1)[0]
        out, _ = pm.forward([187] + ref_tok.encode(ctx), None)
        nxt = int(torch.argmax(out))
        word = ref_tok.decode([nxt])
        if word.startswith(" ") and len(word) > 1 and not any(c.isspace() for c in word[1:]) and ref_tok.encode(word) == [nxt]:
            texts[n] = ctx + word
            forced += 1
    assert forced >= 3
    want_lp, want_ok = _pip_lambada(pm, ref_tok, texts)
    want_ppl = math.exp(-sum(want_lp) / len(want_lp))
    for bs in (7,):
        res = lambada(model, tok, texts, batch_size=bs, progress=False)
        assert res.samples == 40 and res.pad_id == 187
        assert res.ppl == pytest.approx(want_ppl, rel=1e-4)
        assert res.logprobs == pytest.approx(want_lp, rel=1e-4, abs=1e-4)
        assert res.correct == want_ok
        assert res.accuracy == sum(want_ok) / 40 >= forced / 40


def test_score_continuations_matches_one_pass_and_order():
    model, sd = make_model(BYTES_CFG, seed=6)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for n in range(9):
        ctx = torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        reqs.append((ctx, cont))
    got = score_continuations(model, reqs, batch_size=4, chunk=5)
    hf = hf_model(sd, BYTES_CFG)
    for (ctx, cont), s in zip(reqs, got):
        with torch.no_grad():
            lg = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].double().log_softmax(-1)
        want = float(lg.gather(1, torch.tensor(cont)[:, None]).sum())
        assert s.logprob == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert s.greedy == bool((lg.argmax(-1) == torch.tensor(cont)).all())
    with pytest.raises(RwkvkitError, match="context is empty"):
        score_continuations(model, [([], [1])])
    with pytest.raises(RwkvkitError, match="out of range"):
        score_continuations(model, [([1], [300])])


def test_split_passage_and_bad_lambada_file(tmp_path):
    assert split_passage("a b  c") == ("a b ", " c")
    with pytest.raises(RwkvkitError, match="no space"):
        split_passage("word")
    bad = tmp_path / "l.jsonl"
    bad.write_text('{"text": "a b"}\n{"txt": 1}\n')
    with pytest.raises(RwkvkitError, match=":2: expected"):
        read_lambada(bad)
