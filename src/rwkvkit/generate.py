"""Text generation: prompt through the parallel form, then RNN steps.

    import rwkvkit
    model = rwkvkit.load(rwkvkit.SHIPPED_MODEL, dtype="float32")
    tok = rwkvkit.load_tokenizer("bytes")
    print(rwkvkit.generate(model, tok, "ROMEO:", max_tokens=200, temperature=0.8, seed=0))

- :func:`generate` returns the text (a list of texts for a list of prompts);
- :func:`stream` yields the text piece by piece while it is produced;
- :func:`complete` returns :class:`Completion` records (text, token ids, why
  it stopped, and optionally the final state);
- :func:`prefill` runs a prompt prefix once and returns its state, to be passed
  as ``state=`` to many continuations;
- :class:`ChatFormat` renders chat turns (``rwkvkit chat``), and
  :func:`chat_format_for` picks the World/G1 format for World-vocabulary models.

Every generation works the same way: only ``model(tokens, state)``,
``model.new_state`` / ``model.check_state`` and the state's batch operations
(:class:`~rwkvkit.state.StateBase`) are used, so an RWKV-4 :class:`~rwkvkit.state.State` and
an RWKV-5/6/7 :class:`~rwkvkit.state.MatrixState` go through the same code.

A prompt is processed in one parallel call (in chunks of ``chunk_len`` tokens)
that computes the output head only for its last position; each generated token
is then one RNN step.  A batch of prompts of different lengths gets one state
per row: rows of equal length are prefilled together, and the decoding steps
run the whole batch at once.  Every row has its own penalty state and its own
random generator (row i seeded with ``seed + i``), so a batch gives the same
tokens as its prompts run one by one.

Stop strings are never emitted, not even in part: text that could be the
start of a stop string is held back until it is known not to be one.  Stop
tokens (by default the tokenizer's end-of-text id) end a row without being
emitted.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch

from .errors import RwkvkitError
from .sampling import SamplingConfig, make_generators, penalty_weights, sample, update_penalty_state
from .state import StateBase
from .tokenizer import Tokenizer, check_vocab, is_world, load_tokenizer


# The model that ships inside the package: a small byte-level RWKV-4 trained on
# Tiny Shakespeare (docs/shipped-model.md says how).
SHIPPED_MODEL = Path(__file__).resolve().parent / "data"


@dataclass
class GenerationConfig(SamplingConfig):
    """Sampling settings plus when to stop."""

    # Most tokens to generate per prompt (stop tokens not counted).
    max_tokens: int = 200
    # Strings that end generation; the text stops right before the first one.
    stop: tuple[str, ...] = ()
    # Token ids that end generation (not emitted).  None: the tokenizer's
    # end-of-text id, if it has one.
    stop_tokens: tuple[int, ...] | None = None
    # Seed of the random draws (row i uses seed + i); None: a fresh random seed.
    seed: int | None = None
    # Prompt tokens per parallel call while prefilling (bounds memory).
    chunk_len: int = 1024

    @classmethod
    def from_kwargs(cls, **kw) -> "GenerationConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; expected some of {sorted(names)}")
        cfg = cls(**kw)
        if isinstance(cfg.stop, str):
            cfg.stop = (cfg.stop,)
        cfg.stop = tuple(cfg.stop)
        cfg.banned_tokens = tuple(int(t) for t in cfg.banned_tokens)
        bias = cfg.logit_bias.items() if isinstance(cfg.logit_bias, dict) else cfg.logit_bias
        cfg.logit_bias = tuple(sorted((int(t), float(b)) for t, b in bias))  # {id: bias} or pairs
        if cfg.stop_tokens is not None:
            cfg.stop_tokens = tuple(int(t) for t in cfg.stop_tokens)
        return cfg

    def validate(self, vocab_size: int | None = None) -> None:
        super().validate(vocab_size)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RwkvkitError(f"max_tokens must be an integer >= 0, got {self.max_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise RwkvkitError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if not isinstance(self.chunk_len, int) or self.chunk_len < 1:
            raise RwkvkitError(f"chunk_len must be a positive integer, got {self.chunk_len}")
        if vocab_size is not None and self.stop_tokens:
            for t in self.stop_tokens:
                if not 0 <= t < vocab_size:
                    raise RwkvkitError(f"stop token {t} is outside the vocabulary 0..{vocab_size - 1}")


@dataclass
class Completion:
    """What one prompt produced."""

    # The generated text (without any stop string).
    text: str
    # Generated token ids, in order (a stop token is not included).
    tokens: list[int]
    # "length" (max_tokens reached), "stop" (a stop string), "stop_token".
    finish_reason: str
    # Number of prompt tokens that were fed.
    prompt_tokens: int
    # The state after the prompt and every generated token (requested with
    # want_state=True; otherwise None); its layout is the model's generation's.
    state: StateBase | None = None


# ------------------------------------------------------------------ helpers
class _StopMatcher:
    """Holds back text that could still turn into a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        # Longest suffix of text that is a proper prefix of some stop string.
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _as_id_lists(prompts, tokenizer: Tokenizer | None) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise RwkvkitError("a text prompt needs a tokenizer")
            ids = tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise RwkvkitError("the prompt is empty: give at least one character (or token)")
        out.append(ids)
    return out


def _start_states(model, state: "StateBase | None", n: int) -> StateBase:
    if state is None:
        return model.new_state(n)
    if not isinstance(state, StateBase):
        raise RwkvkitError(f"state must be an rwkvkit state (State or MatrixState), got {type(state).__name__}")
    model.check_state(state)
    state = state.to(model.device)
    if state.batch_size == n:
        return state
    if state.batch_size == 1:
        return state.expand(n)
    raise RwkvkitError(f"the state holds {state.batch_size} sequences but there are {n} prompts (give 1 or {n})")


@torch.no_grad()
def _prefill(model, ids: list[list[int]], state: StateBase, chunk_len: int) -> tuple[torch.Tensor, StateBase]:
    """Run every row's prompt from its state; returns last logits [B, V] and states.

    Rows are grouped by length so each group is one parallel call per chunk
    (no padding, which would corrupt the recurrent state).
    """
    groups: dict[int, list[int]] = {}
    for row, t in enumerate(ids):
        groups.setdefault(len(t), []).append(row)
    logits: list[torch.Tensor | None] = [None] * len(ids)
    rows_out: list[StateBase | None] = [None] * len(ids)
    for length, rows in groups.items():
        toks = torch.tensor([ids[r] for r in rows], dtype=torch.long, device=model.device)  # [b, T]
        st = state.select(rows)
        out = None
        for s in range(0, length, chunk_len):
            last = s + chunk_len >= length
            out, st = model(toks[:, s : s + chunk_len], st, logits="last" if last else "none")
        for j, r in enumerate(rows):
            logits[r] = out[j, -1]
            rows_out[r] = st.select(j)
    return torch.stack(logits), StateBase.concat(rows_out)


def _resolve_tokenizer(model, tokenizer) -> Tokenizer | None:
    if tokenizer is None:
        return None
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, model.config.vocab_size)
    return tok


class _Run:
    """One generation over a batch; :meth:`events` yields (row, text piece)."""

    def __init__(self, model, tokenizer, prompts, cfg: GenerationConfig, state, want_state: bool):
        self.model = model
        self.tok = _resolve_tokenizer(model, tokenizer)
        V = model.config.vocab_size
        cfg.validate(V)
        self.cfg = cfg
        self.ids = _as_id_lists(prompts, self.tok)
        self.n = len(self.ids)
        if self.n == 0:
            raise RwkvkitError("no prompts given")
        self.start_state = _start_states(model, state, self.n)
        self.want_state = want_state
        stops = cfg.stop_tokens
        if stops is None:
            stops = (self.tok.eos_id,) if self.tok is not None and self.tok.eos_id is not None else ()
        self.stop_tokens = set(stops)
        banned = set(cfg.banned_tokens)
        if self.tok is not None and self.tok.vocab_size < V:
            # Output rows past the tokenizer's ids are padding: never produce them.
            banned.update(range(self.tok.vocab_size, V))
        self.sampling = SamplingConfig(
            **{f.name: getattr(cfg, f.name) for f in fields(SamplingConfig) if f.name != "banned_tokens"},
            banned_tokens=tuple(sorted(banned)),
        )
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(62)
        self.generators = make_generators(seed, self.n, model.device)
        self.results: list[Completion | None] = [None] * self.n

    @torch.no_grad()
    def events(self) -> Iterator[tuple[int, str]]:
        model, cfg, n = self.model, self.cfg, self.n
        V = model.config.vocab_size
        logits, state = _prefill(model, self.ids, self.start_state, cfg.chunk_len)
        decoders = [self.tok.stream_decoder() if self.tok is not None else None for _ in range(n)]
        matchers = [_StopMatcher(cfg.stop) for _ in range(n)]
        texts = [[] for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        penalties = self.sampling.uses_penalties
        weights = penalty_weights(self.tok, V).to(model.device) if penalties else None
        counts = torch.zeros(n, V, device=model.device) if penalties else None
        seen = torch.zeros(n, V, dtype=torch.bool, device=model.device) if penalties else None

        def finish(row: int, reason: str, final_state: StateBase | None) -> Iterator[tuple[int, str]]:
            tail = ""
            if decoders[row] is not None and reason != "stop":
                piece, hit = matchers[row].feed(decoders[row].flush())
                tail = piece if hit else piece + matchers[row].flush()
                if hit:
                    reason = "stop"
            if tail:
                texts[row].append(tail)
                yield row, tail
            self.results[row] = Completion(
                text="".join(texts[row]),
                tokens=tokens[row],
                finish_reason=reason,
                prompt_tokens=len(self.ids[row]),
                state=final_state if self.want_state else None,
            )

        active = list(range(n))  # rows still generating, in batch order
        if cfg.max_tokens == 0:
            for j, row in enumerate(active):
                yield from finish(row, "length", state.select(j))
            return
        while active:
            rows_t = torch.tensor(active, device=model.device)
            toks = sample(
                logits,
                self.sampling,
                [self.generators[r] for r in active],
                counts=counts[rows_t] if penalties else None,
                seen=seen[rows_t] if penalties else None,
            )
            toks_list = toks.tolist()
            keep: list[int] = []  # positions in `active` that go on
            feed_done: list[tuple[int, str]] = []  # (position, reason) that finish after being fed
            for j, (row, t) in enumerate(zip(active, toks_list)):
                if t in self.stop_tokens:
                    yield from finish(row, "stop_token", state.select(j))
                    continue
                tokens[row].append(t)
                hit = False
                if decoders[row] is not None:
                    piece, hit = matchers[row].feed(decoders[row].push(t))
                    if piece:
                        texts[row].append(piece)
                        yield row, piece
                if hit:
                    feed_done.append((j, "stop"))
                elif len(tokens[row]) >= cfg.max_tokens:
                    feed_done.append((j, "length"))
                else:
                    keep.append(j)
            if penalties:
                # Rows that go on (or finish) register their token.
                new_c, new_s = update_penalty_state(counts[rows_t], seen[rows_t], toks, cfg.penalty_decay, weights)
                counts[rows_t], seen[rows_t] = new_c, new_s
            fed = keep + ([j for j, _ in feed_done] if self.want_state else [])
            if fed:
                fed_sorted = sorted(fed)
                step_in = torch.tensor([[toks_list[j]] for j in fed_sorted], device=model.device)  # [b, 1]
                out, new_state = model(step_in, state.select(fed_sorted), logits="last" if keep else "none")
                pos = {j: i for i, j in enumerate(fed_sorted)}
            for j, reason in feed_done:
                final = new_state.select(pos[j]) if self.want_state else None
                yield from finish(active[j], reason, final)
            if not keep:
                break
            idx = [pos[j] for j in keep]
            logits = out[idx, -1]
            state = new_state.select(idx)
            active = [active[j] for j in keep]


# -------------------------------------------------------------- public API
def complete(
    model,
    tokenizer,
    prompts: "str | Sequence[str] | Sequence[Sequence[int]]",
    *,
    state: StateBase | None = None,
    want_state: bool = False,
    **options,
) -> list[Completion]:
    """Generate for one prompt or a batch; returns one :class:`Completion` per prompt.

    ``prompts``: a string, a list of strings, or token-id lists (then
    ``tokenizer`` may be None: no text, no stop strings).  ``state``: a state
    to continue from, batch 1 (shared by every prompt) or one row per prompt.
    ``options``: the fields of :class:`GenerationConfig` (max_tokens,
    temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty,
    penalty_decay, banned_tokens, stop, stop_tokens, seed, chunk_len,
    rwkv_top_p_quirk).
    """
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        prompts = [prompts]
    run = _Run(model, tokenizer, list(prompts), GenerationConfig.from_kwargs(**options), state, want_state)
    for _ in run.events():
        pass
    return run.results  # type: ignore[return-value]


def generate(model, tokenizer, prompt: "str | Sequence[str]", *, state: StateBase | None = None, **options) -> "str | list[str]":
    """The generated text for ``prompt`` (a list of texts for a list of prompts).

    Options as in :func:`complete`; ``temperature=0`` is greedy decoding.
    """
    results = complete(model, tokenizer, prompt, state=state, **options)
    return results[0].text if isinstance(prompt, str) else [r.text for r in results]


class TextStream:
    """Iterator over the text pieces of one prompt's generation.

    After the loop ends, :attr:`result` holds the :class:`Completion`.
    """

    def __init__(self, run: _Run):
        self._run = run
        self._events = run.events()
        self.result: Completion | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        for _row, piece in self._events:
            return piece
        self.result = self._run.results[0]
        raise StopIteration


def stream(model, tokenizer, prompt: str, *, state: StateBase | None = None, want_state: bool = False, **options) -> TextStream:
    """Yield the generated text of one prompt piece by piece (options as in
    :func:`complete`); ``.result`` has the Completion once it is exhausted."""
    if not isinstance(prompt, str) and not (len(prompt) and isinstance(prompt[0], int)):
        raise RwkvkitError("stream takes one prompt (use complete() for a batch)")
    run = _Run(model, tokenizer, [prompt], GenerationConfig.from_kwargs(**options), state, want_state)
    return TextStream(run)


@torch.no_grad()
def prefill(model, tokenizer, text: "str | Sequence[int]", state: StateBase | None = None, chunk_len: int = 1024) -> StateBase:
    """The state after reading ``text`` (from ``state``, or an empty context).

    Compute a long shared prefix once and pass the result as ``state=`` to many
    continuations; the state is never modified by them.
    """
    tok = _resolve_tokenizer(model, tokenizer)
    ids = _as_id_lists([text], tok)[0]
    st = _start_states(model, state, 1)
    toks = torch.tensor([ids], dtype=torch.long, device=model.device)
    for s in range(0, len(ids), chunk_len):
        _, st = model(toks[:, s : s + chunk_len], st, logits="none")
    return st


# -------------------------------------------------------------- chat format
_BLANK_LINES = re.compile(r"\n{2,}")


@dataclass
class ChatFormat:
    """How ``rwkvkit chat`` turns a conversation into text.

    ``style="world"``: the format of the RWKV World and G1 models (rwkv5-7
    spec 9)::

        System: {system}\n\nUser: {message}\n\nAssistant:{" <think" for G1 think}

    Message and system text is stripped, and runs of two or more newlines in it
    become one, because "\n\n" ends a turn; the reply ends at "\n\n".

    ``style="plain"``: rwkvkit's format for other models (the shipped Tiny
    Shakespeare model, Pile models): ``{user}: {message}\n\n{bot}:`` with the
    message as typed, and the system text read as it is, without a name.
    """

    user: str = "User"
    bot: str = "Assistant"
    style: str = "world"
    # G1 "think" models: open a reasoning block after the assistant's name.
    think: bool = False
    system_name: str = "System"

    STYLES: ClassVar[tuple[str, ...]] = ("world", "plain")
    # Generation stops (without printing it) at the end of the reply.
    stop: ClassVar[tuple[str, ...]] = ("\n\n",)

    def __post_init__(self) -> None:
        if self.style not in self.STYLES:
            raise RwkvkitError(f"chat format must be one of {', '.join(self.STYLES)}, got {self.style!r}")
        if not self.user.strip() or not self.bot.strip():
            raise RwkvkitError("the user's and the bot's names must be non-empty")

    def clean(self, text: str) -> str:
        """Message text as the format wants it (World: stripped, blank lines collapsed)."""
        if self.style == "plain":
            return text
        return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())

    def cue(self) -> str:
        """What precedes the model's reply: ``"Assistant:"`` (+ ``" <think"``)."""
        return f"{self.bot}:" + (" <think" if self.think else "")

    def system_text(self, text: str) -> str:
        """The text read once before the conversation."""
        if self.style == "plain":
            return text
        return f"{self.system_name}: {self.clean(text)}\n\n"

    def turn(self, message: str) -> str:
        """One user turn followed by the cue for the model's reply."""
        return f"{self.user}: {self.clean(message)}\n\n{self.cue()}"

    def prompt(self, messages: "Sequence[tuple[str, str]]", system: str | None = None) -> str:
        """A whole conversation as one prompt: ``messages`` are (role, text)
        with role "user" or "assistant"; ends with the cue for the next reply."""
        out = [self.system_text(system)] if system else []
        for role, text in messages:
            if role == "user":
                out.append(f"{self.user}: {self.clean(text)}\n\n")
            elif role == "assistant":
                out.append(f"{self.bot}: {self.clean(text)}\n\n")
            else:
                raise RwkvkitError(f"chat role must be 'user' or 'assistant', got {role!r}")
        out.append(self.cue())
        return "".join(out)


def chat_format_for(model, tokenizer=None, **fields_) -> ChatFormat:
    """The default chat format of ``model``: "world" for World-vocabulary models
    (a vocabulary of 65536, or the World tokenizer), "plain" otherwise."""
    world = model.config.vocab_size == 65536 or is_world(tokenizer)
    return ChatFormat(style="world" if world else "plain", **fields_)


def load_shipped_model(dtype: "str | torch.dtype" = "float32", device=None):
    """The small Tiny Shakespeare model shipped with rwkvkit (byte tokenizer)."""
    from .checkpoint import load

    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        raise RwkvkitError(f"the shipped model is missing from {SHIPPED_MODEL} (a broken installation?)")
    return load(SHIPPED_MODEL, dtype=dtype, device=device)


__all__ = [
    "GenerationConfig",
    "Completion",
    "ChatFormat",
    "chat_format_for",
    "TextStream",
    "generate",
    "complete",
    "stream",
    "prefill",
    "load_shipped_model",
    "SHIPPED_MODEL",
]
