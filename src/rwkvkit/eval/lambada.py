"""LAMBADA, scored the way the RWKV authors' own scripts do.

Each passage is split at its last space: the context is what comes before,
the target is a space and the last word.  The model reads a prefix token, the
context and the target.  The prefix is the one the model family's own script
uses: the end-of-text token 0 for World-vocabulary models (RWKV-7's LAMBADA
script reads ``[0] + encode(context)``, rwkv5-7 spec 9), the tokenizer's
newline otherwise (id 187 for the 20B tokenizer of the RWKV-4 Pile models,
rwkv4 spec 12).  The target's log-probability is the sum over its tokens, and a
passage is correct when every target token is the arg-max.  Reported:
``ppl = exp(-mean target log-probability)`` (per target *word*) and accuracy.
Passages are scored in batches (:func:`~rwkvkit.eval.scoring.score_continuations`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import RwkvkitError
from ..io_utils import jsonl_field
from .scoring import score_continuations

# Where `rwkvkit eval --task lambada` looks when no --data is given.
DEFAULT_NAMES = ("lambada_test.jsonl",)
DEFAULT_FOLDERS = (".", "data", "../shared/data")


@dataclass
class LambadaResult:
    """What ``rwkvkit eval --task lambada`` reports."""

    task: str
    data: str
    samples: int
    ppl: float  # exp(-mean over passages of the target log-probability)
    accuracy: float  # passages whose every target token is the arg-max
    pad_id: int
    seconds: float
    logprobs: list[float] = field(default_factory=list, repr=False)
    correct: list[bool] = field(default_factory=list, repr=False)

    def to_dict(self, per_sample: bool = False) -> dict:
        d = asdict(self)
        if not per_sample:
            d.pop("logprobs")
            d.pop("correct")
        return d

    def summary(self) -> str:
        return (
            f"{self.data}: {self.samples} passages: ppl {self.ppl:.4f}, accuracy {100 * self.accuracy:.2f}% "
            f"({self.seconds:.1f} s)"
        )


def read_lambada(path: "str | os.PathLike", limit: int | None = None) -> list[str]:
    """The ``text`` of every line of a LAMBADA jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise RwkvkitError(f"LAMBADA file '{path}' does not exist")
    texts = []
    for text, _ in jsonl_field(path, "text"):
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise RwkvkitError(f"LAMBADA file '{path}' holds no passages")
    return texts


def find_lambada() -> Path:
    for folder in DEFAULT_FOLDERS:
        for name in DEFAULT_NAMES:
            p = Path(folder) / name
            if p.is_file():
                return p
    raise RwkvkitError(
        "no LAMBADA file given: pass --data lambada_test.jsonl (one {\"text\": ...} per line; "
        "the file of the RWKV papers is misc/lambada_test.jsonl in BlinkDL/ChatRWKV)"
    )


def split_passage(text: str, where: str = "passage") -> tuple[str, str]:
    """(context, target): the target is ``" " + last word`` (spec 12)."""
    if " " not in text:
        raise RwkvkitError(f"{where} has no space, so no last word to predict: {text[:60]!r}")
    ctx, tgt = text.rsplit(" ", 1)
    return ctx, " " + tgt


# The prefix of the RWKV-7 LAMBADA script for World-vocabulary models: end-of-text.
WORLD_PREFIX = 0


def default_pad_id(tokenizer) -> int:
    """The token read before every context: 0 (end-of-text) for the World
    vocabulary, as the RWKV-7 authors' script does; else the newline token,
    as the RWKV-4 papers' script does (187 for the 20B tokenizer)."""
    from ..tokenizer import is_world

    if is_world(tokenizer):
        return WORLD_PREFIX
    ids = tokenizer.encode("\n")
    if len(ids) != 1:
        raise RwkvkitError(f"tokenizer '{tokenizer.name}' has no single newline token; pass --pad-token ID")
    return ids[0]


def lambada(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    pad_id: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    data: str = "",
) -> LambadaResult:
    """Score LAMBADA passages ``texts`` (see the module docstring)."""
    if not texts:
        raise RwkvkitError("no LAMBADA passages to score")
    pad = default_pad_id(tokenizer) if pad_id is None else int(pad_id)
    if not 0 <= pad < model.config.vocab_size:
        raise RwkvkitError(f"pad token {pad} is out of range for this model's vocabulary of {model.config.vocab_size}")
    requests = []
    for n, text in enumerate(texts):
        ctx, tgt = split_passage(text, where=f"passage {n + 1}")
        requests.append(([pad] + tokenizer.encode(ctx), tokenizer.encode(tgt)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(requests), unit="passage", desc="lambada", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        scores = score_continuations(model, requests, batch_size=batch_size, progress=bar)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    logprobs = [s.logprob for s in scores]
    correct = [s.greedy for s in scores]
    return LambadaResult(
        task="lambada",
        data=data,
        samples=len(scores),
        ppl=math.exp(-sum(logprobs) / len(logprobs)),
        accuracy=sum(correct) / len(correct),
        pad_id=pad,
        seconds=dt,
        logprobs=logprobs,
        correct=correct,
    )
