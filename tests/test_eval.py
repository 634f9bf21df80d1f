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

from conftest import importorskip, shared_file
from util import hf_model, make_model, pip_model

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.errors import RwkvkitError
from rwkvkit.eval import lambada, perplexity, read_lambada, score_continuations, split_passage, stream_nll
from rwkvkit.eval.perplexity import text_pieces
from rwkvkit.tokenizer import load_tokenizer

BYTES_CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=256)


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
        perplexity(make_model(RWKV4Config(n_layer=1, n_embd=8, vocab_size=100))[0], shakespeare_slice, "bytes", progress=False)


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
LAMBADA_CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50277)


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


# ------------------------------------------------------ lm-evaluation-harness
LM_CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=256)


def _pip_logprob(pm, ctx: bytes, cont: bytes) -> float:
    out, _ = pm.forward(list(ctx + cont), None, full_output=True)
    lp = torch.log_softmax(out.double(), dim=-1)
    return float(sum(lp[len(ctx) - 1 + i, b] for i, b in enumerate(cont)))


def _pip_greedy(pm, ctx: bytes, n: int, stop: str) -> str:
    out, st = pm.forward(list(ctx), None)
    got = b""
    for _ in range(n):
        t = int(torch.argmax(out))
        got += bytes([t])
        if stop.encode() in got:
            break
        out, st = pm.forward([t], st)
    return got.decode("utf-8", errors="replace").split(stop)[0]


def _write_tasks(folder, data):
    for name, body in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in body["docs"]))
        (folder / f"{name}.yaml").write_text(body["yaml"].replace("DATA", str(folder / f"{name}.jsonl")))


# Runs lm_eval's CLI in a subprocess (imports lm_eval, datasets): ~20 s on an idle 2-core machine.
def test_lm_eval_cli_with_local_tasks(tmp_path):
    importorskip("lm_eval")
    model, sd = make_model(LM_CFG, seed=7)
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    pm = pip_model(sd, tmp_path, name="ref.pth")
    g = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    mc = []
    for n in range(6):
        choices = list(g.choice(words, 3, replace=False))
        mc.append({"question": f"Q{n}: which word comes next after {' '.join(g.choice(words, 4))}?", "choices": choices, "answer": int(g.integers(3))})
    texts = [{"text": " ".join(g.choice(words, int(g.integers(3, 9))))} for _ in range(4)]
    gen = [{"prompt": f"Say {w}:", "target": "?"} for w in words[:4]]
    # Half the generation targets are the reference model's own greedy output,
    # so exact_match must come out 0.5.
    for d in gen[:2]:
        d["target"] = _pip_greedy(pm, d["prompt"].encode(), 6, "\n")
    assert all(d["target"] for d in gen[:2])
    yaml_common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: DATA\ntest_split: test\n"
    _write_tasks(
        tmp_path,
        {
            "rk_mc": {
                "docs": mc,
                "yaml": "task: rk_mc\n" + yaml_common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
            },
            "rk_roll": {
                "docs": texts,
                "yaml": "task: rk_roll\n" + yaml_common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n",
            },
            "rk_gen": {
                "docs": gen,
                "yaml": "task: rk_gen\n" + yaml_common + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n",
            },
        },
    )
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "rwkvkit.lm_eval_adapter", "run", "--model", "rwkvkit",
        "--model_args", f"path={path},tokenizer=bytes", "--tasks", "rk_mc", "rk_roll", "rk_gen",
        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--batch_size", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list((tmp_path / "out").rglob("results_*.json"))
    assert found, proc.stdout[-2000:]
    res = json.loads(found[0].read_text())["results"]

    # multiple choice: lm_eval's context is the question, each continuation " " + choice.
    want_acc = np.mean(
        [int(np.argmax([_pip_logprob(pm, d["question"].encode(), (" " + c).encode()) for c in d["choices"]]) == d["answer"]) for d in mc]
    )
    assert res["rk_mc"]["acc,none"] == pytest.approx(want_acc)
    # rolling: the text after the newline prefix (bytes has no end-of-text id), all bytes scored.
    lls = [_pip_logprob(pm, b"\n", d["text"].encode()) for d in texts]
    nbytes = sum(len(d["text"].encode()) for d in texts)
    assert res["rk_roll"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-5)
    assert res["rk_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_lm_eval_adapter_requests_against_rwkv_package(tmp_path):
    """The adapter's three request types in process, on lm_eval's Instance
    objects, against the `rwkv` package."""
    importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from rwkvkit.lm_eval_adapter import RwkvkitLM

    model, sd = make_model(LM_CFG, seed=8)
    pm = pip_model(sd, tmp_path)
    lm = RwkvkitLM(model=model, tokenizer="bytes", batch_size=3)

    def inst(kind, args, i):
        return Instance(request_type=kind, doc={}, arguments=args, idx=i)

    pairs = [("The cat sat on the", " mat"), ("Trailing space ", "moves"), ("", "no context"), ("a", "b")]
    got = lm.loglikelihood([inst("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    want = [
        _pip_logprob(pm, b"The cat sat on the", b" mat"),
        _pip_logprob(pm, b"Trailing space", b" moves"),
        _pip_logprob(pm, b"\n", b"no context"),
        _pip_logprob(pm, b"a", b"b"),
    ]
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-5)
    text = "rolling text, long enough to span windows " * 30
    (roll,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (text,), 0)], disable_tqdm=True)
    assert roll == pytest.approx(_pip_logprob(pm, b"\n", text.encode()), rel=1e-5)
    (gen,) = lm.generate_until([inst("generate_until", ("Hello", {"until": ["\n"], "max_gen_toks": 10}), 0)], disable_tqdm=True)
    assert gen == _pip_greedy(pm, b"Hello", 10, "\n")


# --------------------------------------------------------------- the verbs
def _cli(args, capsys):
    from rwkvkit.cli import main

    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_eval_ppl_and_lambada(tmp_path, capsys, ref, shakespeare_slice):
    path = tmp_path / "m.pth"
    torch.save(ref.sd, path)
    rc, out, err = _cli(["eval", "-m", str(path), "--task", "ppl", "--data", str(shakespeare_slice), "--window", "100", "--json", "-", "--no-progress"], capsys)
    assert rc == 0, err
    got = json.loads(out)
    ids = list(shakespeare_slice.read_bytes())
    assert got["tokens"] == len(ids) - 1 and got["windows"] == math.ceil((len(ids) - 1) / 100)
    assert got["nll"] == pytest.approx(ref.nll(ids), rel=2e-6)
    assert got["bits_per_byte"] == pytest.approx(got["nll"] / math.log(2) / got["bytes"])

    lam = tmp_path / "lam.jsonl"
    lam.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one two three", "a b", "hello there world", "x y z"]))
    rc, out, err = _cli(["eval", "-m", str(path), "--task", "lambada", "--data", str(lam), "--limit", "3", "--json", str(tmp_path / "l.json"), "--per-sample", "--no-progress"], capsys)
    assert rc == 0, err
    assert "3 passages" in out
    got = json.loads((tmp_path / "l.json").read_text())
    assert got["samples"] == 3 and got["pad_id"] == 10 and len(got["logprobs"]) == 3
    want = [ref.nll([10] + list(b"one two") + list(b" three")) - ref.nll([10] + list(b"one two"))]
    assert -got["logprobs"][0] == pytest.approx(want[0], rel=1e-5)

    for bad, msg in (
        (["--task", "ppl"], "needs --data"),
        (["--task", "ppl", "--data", str(tmp_path / "nope.txt")], "does not exist"),
        (["--task", "ppl", "--data", str(shakespeare_slice), "--window", "0"], "--window"),
    ):
        rc, out, err = _cli(["eval", "-m", str(path), *bad], capsys)
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1, err


def test_cli_bench_tiny(tmp_path, capsys):
    importorskip("matplotlib")
    rc, out, err = _cli(
        ["bench", "--shape", "tiny", "--tokens", "40", "--prompt-lengths", "4,16", "--median-window", "8", "--in-process", "--threads", "1", "--out", str(tmp_path), "--no-progress"],
        capsys,
    )
    assert rc == 0, err
    rep = json.loads((tmp_path / "bench.json").read_text())
    rwkv, gpt = rep["results"]
    L, C, V = 2, 64, 1000
    assert rwkv["parameters"] == RWKV4Config(n_layer=L, n_embd=C, vocab_size=V).num_params
    # The RWKV state is the same size after every token: L x (2C + 3C) fp32.
    assert set(rwkv["state_bytes"]) == {RWKV4Config(n_layer=L, n_embd=C, vocab_size=V).state_bytes_per_sequence} == {L * 5 * C * 4}
    # GPT-2's cache holds a key and a value per layer for every token so far.
    assert gpt["state_bytes"] == [2 * L * k * C * 4 for k in range(1, 41)]
    assert len(rwkv["times"]) == len(gpt["times"]) == 40 and min(rwkv["times"] + gpt["times"]) > 0
    assert [p["length"] for p in rwkv["prompts"]] == [4, 16]
    rows = rep["summary"]["rows"]
    assert rows[-1]["token"] == 40 and rows[-1]["gpt2_cumulative_s"] == pytest.approx(sum(gpt["times"]))
    for name in ("bench_cumulative.png", "bench_per_token.png", "bench_memory.png", "bench_prompt.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {tmp_path / name}" in out
    assert "cumulative_ratio_gpt2_over_rwkv_at_40" in out

    rc, out, err = _cli(["bench", "--shape", "tiny", "--width", "65", "--tokens", "4"], capsys)
    assert rc == 1 and "divisible by" in err
    rc, out, err = _cli(["bench", "--shape", "tiny", "--tokens", "0"], capsys)
    assert rc == 1 and "--tokens" in err


def test_eval_help_names_the_adapter_command(capsys):
    """`rwkvkit eval --help` names the lm-eval command that works (the one
    docs/eval.md gives), not `lm_eval --model rwkvkit`, which lm_eval cannot
    resolve without importing the adapter."""
    from conftest import REPO
    from rwkvkit import cli

    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "`lm_eval --model rwkvkit" not in out
    assert "python -m rwkvkit.lm_eval_adapter --model rwkvkit --model_args path=" in out
    assert "python -m rwkvkit.lm_eval_adapter --model rwkvkit --model_args path=" in (REPO / "docs" / "eval.md").read_text()
