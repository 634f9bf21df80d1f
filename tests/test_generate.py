"""Generation against the `rwkv` package (greedy decoding, and its PIPELINE
with penalties), batched == one by one, state reuse, stop strings/tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import shared_file
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.errors import RwkvkitError
from rwkvkit.generate import _StopMatcher, complete, generate, prefill, stream
from rwkvkit.tokenizer import load_tokenizer
from util import make_model, pip_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Generation is hundreds of tiny ops; a second thread only adds
    # synchronisation (and on a busy machine, waiting for the other core).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def byte_model():
    model, _ = make_model(RWKV4Config(n_layer=2, n_embd=32, vocab_size=256), seed=1)
    return model


def test_greedy_equals_rwkv_package_for_64_tokens(tmp_path):
    cfg = RWKV4Config(n_layer=3, n_embd=48, vocab_size=97)
    model, sd = make_model(cfg, seed=5)
    pm = pip_model(sd, tmp_path)
    from rwkv.utils import PIPELINE

    prompt = torch.randint(0, 97, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = complete(model, None, [prompt], max_tokens=64, temperature=0, stop_tokens=())[0]
    out, state = pm.forward(prompt, None)
    theirs = []
    for _ in range(64):
        tok = PIPELINE.sample_logits(None, out, temperature=0)  # the package's greedy choice
        theirs.append(tok)
        out, state = pm.forward([tok], state)
    assert len(set(theirs)) > 5  # a real sequence, not one repeated token
    assert ours.tokens == theirs
    assert ours.finish_reason == "length"


class _Recorder:
    """Wraps the package's model to see which tokens its PIPELINE feeds."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def forward(self, tokens, state):
        self.fed.append(list(tokens))
        return self.model.forward(tokens, state)


def test_greedy_with_penalties_and_bans_equals_rwkv_pipeline(tmp_path):
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    path = shared_file("tokenizers/20B_tokenizer.json")
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50277)
    model, sd = make_model(cfg, seed=2)
    rec = _Recorder(pip_model(sd, tmp_path))
    pipe = PIPELINE(rec, str(path))
    ctx = "\nThe quick brown fox jumps over the lazy dog. 12 34"
    tok = load_tokenizer(path)
    # Besides 13 and 15, ban the tokens that are not UTF-8 on their own (byte
    # pieces of a longer character): then any sequence of tokens decodes
    # without U+FFFD, and the pipeline, which holds back such text, must give
    # exactly our text whatever this random model prefers.
    partial = []
    for i in range(cfg.vocab_size):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(i)
    assert 100 < len(partial) < 1000
    banned = [13, 15] + partial
    args = PIPELINE_ARGS(temperature=0, alpha_frequency=0.6, alpha_presence=0.4, alpha_decay=0.9, token_ban=banned, token_stop=[])
    text = pipe.generate(ctx, token_count=48, args=args)
    pip_tokens = [f[0] for f in rec.fed[1:]]  # every sampled token but the last is fed back

    opts = dict(max_tokens=48, temperature=0, stop_tokens=(), banned_tokens=tuple(banned))
    ours = complete(model, tok, ctx, presence_penalty=0.4, frequency_penalty=0.6, penalty_decay=0.9, **opts)[0]
    assert ours.tokens[:-1] == pip_tokens
    assert len(text) > 40 and "\ufffd" not in ours.text
    assert ours.text == text
    # The penalties matter on this model: without them the greedy path differs.
    plain = complete(model, tok, ctx, **opts)[0]
    assert plain.tokens != ours.tokens


def test_prefill_is_one_parallel_call(byte_model, monkeypatch):
    calls = []
    real = type(byte_model).forward

    def spy(self, tokens, state=None, *, logits="all"):
        calls.append((tuple(tokens.shape), logits))
        return real(self, tokens, state, logits=logits)

    monkeypatch.setattr(type(byte_model), "forward", spy)
    complete(byte_model, "bytes", "ROMEO: speak", max_tokens=3, temperature=0)
    assert calls[0] == ((1, 12), "last")
    assert all(shape == (1, 1) for shape, _ in calls[1:])


@pytest.mark.parametrize("sampled", [False, True])
def test_batch_equals_one_by_one(byte_model, sampled):
    prompts = ["To be, or not", "ROMEO: hi", "a", "To be, or not", "KING"]
    opts = dict(max_tokens=40, stop=["\n\n", "th"])
    if sampled:
        opts.update(temperature=0.9, top_p=0.95, top_k=50, presence_penalty=0.3, frequency_penalty=0.3, seed=11)
    else:
        opts.update(temperature=0)
    batch = complete(byte_model, "bytes", prompts, want_state=True, **opts)
    for i, p in enumerate(prompts):
        one_opts = dict(opts, seed=opts["seed"] + i) if sampled else opts
        one = complete(byte_model, "bytes", p, want_state=True, **one_opts)[0]
        assert batch[i].tokens == one.tokens, i
        assert batch[i].text == one.text and batch[i].finish_reason == one.finish_reason
        assert batch[i].state.allclose(one.state, rtol=1e-5, atol=1e-5)
    if sampled:
        # Same prompt, different rows: different seeds, different text.
        assert batch[0].tokens != batch[3].tokens


def test_saved_state_is_reused_for_many_continuations(byte_model):
    tok = load_tokenizer("bytes")
    prefix = "First Citizen:\nBefore we proceed any further, hear me speak."
    st = prefill(byte_model, tok, prefix)
    snapshot = st.clone()
    conts = ["\n\nAll:", "\nSecond", " Speak"]
    for c in conts:
        reused = complete(byte_model, tok, c, state=st, max_tokens=30, temperature=0)[0]
        whole = complete(byte_model, tok, prefix + c, max_tokens=30, temperature=0)[0]
        assert reused.tokens == whole.tokens
    assert st.allclose(snapshot, rtol=0, atol=0)  # never modified
    # One batch-1 prefix state shared by a batch of continuations.
    batch = complete(byte_model, tok, conts, state=st, max_tokens=30, temperature=0)
    assert [b.tokens for b in batch] == [complete(byte_model, tok, c, state=st, max_tokens=30, temperature=0)[0].tokens for c in conts]


def test_final_state_has_seen_every_generated_token(byte_model):
    r = complete(byte_model, "bytes", "Hello", max_tokens=17, temperature=0.8, seed=3, want_state=True)[0]
    ids = list(b"Hello") + r.tokens
    with torch.no_grad():
        _, want = byte_model(torch.tensor([ids]))
    assert r.state.allclose(want, rtol=1e-5, atol=1e-5)


def test_stop_matcher_holds_back_possible_stops():
    m = _StopMatcher(["abc", "xyz"])
    assert m.feed("1a") == ("1", False)
    assert m.feed("b") == ("", False)
    assert m.feed("d") == ("abd", False)  # not a stop after all: released
    assert m.feed("xy") == ("", False)
    assert m.feed("z!") == ("", True)
    m = _StopMatcher(["\n\n"])
    assert m.feed("one\n") == ("one", False)
    assert m.flush() == "\n"


def test_stop_string_and_stop_token(byte_model):
    free = complete(byte_model, "bytes", "ROMEO:", max_tokens=80, temperature=0)[0]
    text = free.text
    stop = text[30:33]
    cut = text.find(stop)
    s = stream(byte_model, "bytes", "ROMEO:", max_tokens=80, temperature=0, stop=[stop])
    pieces = list(s)
    assert "".join(pieces) == text[:cut] == s.result.text
    assert s.result.finish_reason == "stop"
    assert all(stop not in p for p in pieces)
    t = free.tokens[25]
    k = free.tokens.index(t)
    r = complete(byte_model, "bytes", "ROMEO:", max_tokens=80, temperature=0, stop_tokens=(t,))[0]
    assert r.tokens == free.tokens[:k] and r.finish_reason == "stop_token"


def test_generate_returns_text(byte_model):
    a = generate(byte_model, "bytes", "KING:", max_tokens=20, temperature=0)
    b = generate(byte_model, "bytes", ["KING:"], max_tokens=20, temperature=0)
    assert isinstance(a, str) and b == [a]
    assert generate(byte_model, "bytes", "KING:", max_tokens=0) == ""


def test_bad_input_is_refused_before_any_text(byte_model):
    with pytest.raises(RwkvkitError, match="prompt is empty"):
        complete(byte_model, "bytes", "", max_tokens=5)
    with pytest.raises(RwkvkitError, match="not the model's tokenizer"):
        stream(byte_model, "world", "hello")  # raises on creation, before iterating
    with pytest.raises(RwkvkitError, match="max_tokens"):
        complete(byte_model, "bytes", "x", max_tokens=-1)
    with pytest.raises(RwkvkitError, match="stop strings"):
        complete(byte_model, "bytes", "x", stop=[""])
    with pytest.raises(RwkvkitError, match="3 prompts"):
        complete(byte_model, "bytes", ["a", "b", "c"], state=byte_model.new_state(2))
    with pytest.raises(RwkvkitError, match="needs a tokenizer"):
        complete(byte_model, None, "text")
