"""Log-likelihood of token sequences under an RWKV model: the primitive that
perplexity, LAMBADA and the lm-evaluation-harness adapter are built on.

Two shapes of work:

- :func:`stream_nll`: one long sequence (a whole file), run in windows with
  the RNN state carried from each window to the next, so the cost is linear
  and the memory constant however long the text is.  The result equals one
  pass over the whole sequence (the model's split-sequence invariant).
- :func:`score_continuations`: many short (context, continuation) pairs,
  batched.  Rows are right-padded; RWKV is causal, so padding after a row's
  last real token never changes that row's logits.  The part of the batch
  before the first scored position of any row is run without the output
  head (``logits="none"``), which saves most of the head's work and memory
  on long contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RwkvkitError


@dataclass
class NLL:
    """Totals of a scored token stream."""

    # Sum of -log p(token) over the scored tokens, in nats.
    nll: float
    # Tokens scored (predicted), i.e. the stream's length minus the first token
    # unless a start token was prepended.
    tokens: int
    # UTF-8 bytes the scored tokens stand for (None without a byte table).
    bytes: int | None
    # Windows (model calls) used.
    windows: int


def _as_chunks(tokens) -> Iterator[np.ndarray]:
    """Accept a 1-D array/memmap/list or an iterable of such chunks."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    if isinstance(tokens, np.ndarray) or (isinstance(tokens, Sequence) and (len(tokens) == 0 or not hasattr(tokens[0], "__len__"))):
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise RwkvkitError(f"tokens must be a 1-D sequence of ids, got shape {arr.shape}")
        # Slices of a memmap stay lazy: read window by window below.
        step = 1 << 20
        for s in range(0, len(arr), step):
            yield arr[s : s + step]
        return
    for chunk in tokens:
        yield np.asarray(chunk).reshape(-1)


@torch.no_grad()
def stream_nll(
    model,
    tokens: "Sequence[int] | np.ndarray | Iterable[Sequence[int]]",
    *,
    window: int = 1024,
    bos: int | None = None,
    byte_lengths: np.ndarray | None = None,
    progress=None,
) -> NLL:
    """Negative log-likelihood of a token stream, in windows of ``window``
    inputs with the state carried.

    ``tokens`` is a 1-D sequence (list, numpy array, memmap) or an iterable of
    1-D chunks (e.g. a text file tokenized piece by piece): only about one
    window is held at a time.  Every token after the first is scored; with
    ``bos`` (a start id, such as the end-of-text token) it is fed first and
    the first token is scored too.  ``byte_lengths`` [V] gives each id's
    length in bytes, for bits per byte.  ``progress`` is a tqdm-like object
    updated with the number of tokens scored.
    """
    if window < 1:
        raise RwkvkitError(f"window must be at least 1 token, got {window}")
    V = model.config.vocab_size
    device = model.device
    state = None
    nll = 0.0
    scored = 0
    nbytes = 0
    windows = 0
    buf = np.zeros(0, dtype=np.int64) if bos is None else np.array([bos], dtype=np.int64)

    def run(inp: np.ndarray, tgt: np.ndarray) -> None:
        nonlocal state, nll, scored, nbytes, windows
        x = torch.from_numpy(inp).to(device)[None]  # [1, T]
        y = torch.from_numpy(tgt).to(device)  # [T]
        logits, state = model(x, state, logits="all")  # [1, T, V]
        # Summed in float64 so a long file's total does not lose digits.
        nll += float(F.cross_entropy(logits[0], y, reduction="none").double().sum())
        scored += len(tgt)
        if byte_lengths is not None:
            nbytes += int(byte_lengths[tgt].sum())
        windows += 1
        if progress is not None:
            progress.update(len(tgt))

    for chunk in _as_chunks(tokens):
        if len(chunk) == 0:
            continue
        chunk = np.asarray(chunk, dtype=np.int64)
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0 or hi >= V:
            raise RwkvkitError(f"token id {lo if lo < 0 else hi} is out of range for this model's vocabulary of {V}")
        buf = np.concatenate([buf, chunk])
        # A window needs its inputs and one more token (the last target).
        while len(buf) > window:
            run(buf[:window], buf[1 : window + 1])
            buf = buf[window:]
    if len(buf) > 1:
        run(buf[:-1], buf[1:])
    if scored == 0:
        raise RwkvkitError("nothing to score: the text has fewer than 2 tokens (or 1 with a start token)")
    return NLL(nll=nll, tokens=scored, bytes=nbytes if byte_lengths is not None else None, windows=windows)


def byte_length_table(tokenizer, vocab_size: int) -> np.ndarray:
    """len(bytes) of every id (0 for special tokens and ids past the tokenizer)."""
    n = min(tokenizer.vocab_size, vocab_size)
    table = np.zeros(vocab_size, dtype=np.int64)
    for i in range(n):
        table[i] = len(tokenizer.token_bytes(i))
    return table


@dataclass
class Score:
    """Log-likelihood of one continuation given its context."""

    logprob: float  # sum of log p(continuation token) over its tokens, nats
    greedy: bool  # every continuation token is the arg-max at its position
    tokens: int  # continuation length in tokens


@torch.no_grad()
def score_continuations(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    chunk: int = 1024,
    progress=None,
) -> list[Score]:
    """log p(continuation | context) for each (context ids, continuation ids).

    Contexts must be non-empty (prepend a start token where the text has
    none).  Requests are run longest first in batches of ``batch_size``; the
    results come back in the order given.  Each row's prefix that precedes
    every scored position of the batch is run ``chunk`` tokens at a time
    without the head.
    """
    if batch_size < 1:
        raise RwkvkitError(f"batch size must be at least 1, got {batch_size}")
    V = model.config.vocab_size
    reqs = []
    for n, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx:
            raise RwkvkitError(f"request {n}: the context is empty; prepend a start token")
        if not cont:
            raise RwkvkitError(f"request {n}: the continuation is empty")
        bad = [t for t in ctx + cont if not 0 <= t < V]
        if bad:
            raise RwkvkitError(f"request {n}: token id {bad[0]} is out of range for this model's vocabulary of {V}")
        reqs.append((ctx, cont))
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    out: list[Score | None] = [None] * len(reqs)
    device = model.device
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        seqs = [reqs[i][0] + reqs[i][1][:-1] for i in rows]  # inputs; the last token is only a target
        first = [len(reqs[i][0]) - 1 for i in rows]  # position whose logits predict cont[0]
        T = max(len(s) for s in seqs)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s)] = torch.tensor(s)
        x = x.to(device)  # [B, T], right-padded with id 0
        m = min(first)
        state = None
        for s in range(0, m, chunk):
            _, state = model(x[:, s : min(s + chunk, m)], state, logits="none")
        logits, _ = model(x[:, m:], state, logits="all")  # [B, T - m, V]
        for j, i in enumerate(rows):
            cont = reqs[i][1]
            pos = torch.arange(len(cont), device=device) + (first[j] - m)
            lg = logits[j, pos]  # [n_cont, V]
            tgt = torch.tensor(cont, device=device)
            lp = torch.log_softmax(lg, dim=-1).gather(1, tgt[:, None])[:, 0]
            greedy = bool((lg.argmax(dim=-1) == tgt).all())
            out[i] = Score(logprob=float(lp.double().sum()), greedy=greedy, tokens=len(cont))
        if progress is not None:
            progress.update(len(rows))
    return out  # type: ignore[return-value]
