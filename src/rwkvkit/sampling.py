"""Sampling: pure functions on logits.

Everything here works on float32 logits shaped [B, V] (one row per sequence)
and returns new tensors; nothing keeps hidden state.  The order of operations
is that of the ``rwkv`` package's ``PIPELINE`` (spec section 6), so that the
two agree wherever the result is deterministic:

1. banned tokens get logit -inf;
2. presence / frequency penalties: every token seen so far loses
   ``presence + count * frequency``, where ``count`` decays by
   ``penalty_decay`` at every step (:func:`apply_penalties`,
   :func:`update_penalty_state`);
3. probabilities at temperature 1; the kept set is chosen there: top-p (the
   smallest set of most likely tokens whose mass reaches ``top_p``, ties at the
   cut kept), then top-k, then min-p (tokens at least ``min_p`` times the most
   likely one; not in the ``rwkv`` package);
4. temperature is applied to the kept tokens only (p ** (1 / T), renormalised);
5. one draw per row from a seeded ``torch.Generator``.

Deliberate differences from the ``rwkv`` package (tests/test_sampling.py checks
both the shared semantics and these):

- ``top_p = 1.0`` keeps every token here.  In the package the fp32 cumulative
  sum usually ends just below 1.0, the search for "first index >= top_p" finds
  nothing and falls back to index 0, so ``top_p = 1.0`` silently becomes greedy
  decoding.  ``rwkv_top_p_quirk=True`` reproduces that behaviour; the same fix
  applies to any top_p that the rounded cumulative sum never reaches.
- ``temperature = 0`` is arg-max of the (penalised) logits, the lowest id
  winning a tie; the package keeps every tied token and draws among them.
- Draws come from ``torch.multinomial`` with a caller-seeded generator (one
  per row), not from numpy's global random state, so a seed reproduces a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import RwkvkitError

# The `rwkv` package does not add frequency for tokens whose text is one of
# these characters (a Python substring test, so also "" and runs like "12"):
# spaces, tabs and digits are registered for the presence penalty only.
PENALTY_FREE_TEXT = " \t0123456789"


@dataclass
class SamplingConfig:
    """How to pick the next token.  Defaults: plain sampling at temperature 1
    with no truncation and no penalties."""

    # 0 = greedy (arg-max, deterministic); otherwise the kept probabilities
    # are raised to 1 / temperature.
    temperature: float = 1.0
    # Nucleus sampling; 1.0 keeps everything (see rwkv_top_p_quirk).
    top_p: float = 1.0
    # Keep the k most likely tokens; 0 = off.
    top_k: int = 0
    # Keep tokens with probability >= min_p * (largest probability); 0 = off.
    min_p: float = 0.0
    # Subtracted once from the logit of every token generated before.
    presence_penalty: float = 0.0
    # Subtracted per (decayed) occurrence of a token generated before.
    frequency_penalty: float = 0.0
    # Occurrence counts are multiplied by this at every step (the `rwkv`
    # package's alpha_decay).
    penalty_decay: float = 0.996
    # Ids that are never produced.
    banned_tokens: tuple[int, ...] = field(default_factory=tuple)
    # (id, bias) pairs added to the logits before everything else (OpenAI's
    # logit_bias: -100 all but bans a token, +100 all but forces it).
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # Reproduce the `rwkv` package's top_p = 1.0 -> greedy collapse.
    rwkv_top_p_quirk: bool = False

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`RwkvkitError` naming the first out-of-range field."""
        if not self.temperature >= 0:
            raise RwkvkitError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise RwkvkitError(f"top_p must be in [0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RwkvkitError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RwkvkitError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.penalty_decay <= 1:
            raise RwkvkitError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value != value or abs(value) == float("inf"):
                raise RwkvkitError(f"{name} must be a finite number, got {value}")
        for t, b in self.logit_bias:
            if not -100 <= b <= 100:
                raise RwkvkitError(f"logit_bias of token {t} must be in [-100, 100], got {b}")
        if vocab_size is not None:
            for t in self.banned_tokens:
                if not 0 <= int(t) < vocab_size:
                    raise RwkvkitError(f"banned token {t} is outside the vocabulary 0..{vocab_size - 1}")
            for t, _ in self.logit_bias:
                if not 0 <= int(t) < vocab_size:
                    raise RwkvkitError(f"logit_bias token {t} is outside the vocabulary 0..{vocab_size - 1}")

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


# ------------------------------------------------------------------ logits
def ban_tokens(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """logits [B, V] with the ``banned`` ids set to -inf (a copy)."""
    if not len(banned):
        return logits
    out = logits.clone()
    out[..., list(banned)] = float("-inf")
    return out


def add_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """logits [B, V] plus ``bias`` ((id, value) pairs) on those ids (a copy)."""
    if not len(bias):
        return logits
    ids = torch.tensor([int(t) for t, _ in bias], device=logits.device)
    vals = torch.tensor([float(b) for _, b in bias], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[..., ids] += vals
    return out


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """``logits - seen * presence - counts * frequency`` (all [B, V]).

    ``seen`` marks every token generated so far: as in the ``rwkv`` package the
    presence penalty applies as soon as a token has an entry, even one whose
    count stayed 0 (spaces and digits).
    """
    if presence == 0 and frequency == 0:
        return logits
    return logits - seen.to(logits.dtype) * presence - counts.to(logits.dtype) * frequency


def update_penalty_state(
    counts: torch.Tensor,
    seen: torch.Tensor,
    tokens: torch.Tensor,
    decay: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Register the tokens [B] just generated: every count decays first, then
    each row's token gains ``weights[token]`` (1, or 0 for penalty-free
    tokens; see :func:`penalty_weights`).  Returns new (counts, seen)."""
    rows = torch.arange(tokens.shape[0], device=counts.device)
    add = torch.ones(tokens.shape[0], dtype=counts.dtype, device=counts.device)
    if weights is not None:
        add = weights.to(counts.device, counts.dtype)[tokens]
    counts = counts * decay
    counts[rows, tokens] += add
    seen = seen.clone()
    seen[rows, tokens] = True
    return counts, seen


def penalty_weights(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] float: 0 for tokens whose text is a substring of " \\t0123456789"
    (they never gain frequency in the ``rwkv`` package), 1 for the rest."""
    w = torch.ones(vocab_size)
    if tokenizer is None:
        return w
    free = {PENALTY_FREE_TEXT[i:j] for i in range(len(PENALTY_FREE_TEXT) + 1) for j in range(i, len(PENALTY_FREE_TEXT) + 1)}
    free_bytes = {s.encode() for s in free}
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        try:
            b = tokenizer.token_bytes(i)
        except Exception:
            continue
        if b in free_bytes:
            w[i] = 0.0
    return w


# ------------------------------------------------------------------- probs
def kept_mask(
    probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, rwkv_top_p_quirk: bool = False
) -> torch.Tensor:
    """Which tokens survive truncation, chosen on probabilities at temperature 1.

    probs [B, V] -> bool [B, V].  Top-p keeps every token at least as likely as
    the one where the sorted cumulative sum first reaches ``top_p`` (ties at
    the cut survive, as in the ``rwkv`` package).
    """
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_p < 1.0 or rwkv_top_p_quirk:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        if rwkv_top_p_quirk and probs.device.type == "cpu" and probs.dtype == torch.float32:
            # The package sums in float32 with numpy, one element after the
            # other; torch.cumsum rounds differently, and the quirk lives in
            # that rounding.
            import numpy as np

            cum = torch.from_numpy(np.cumsum(sorted_probs.numpy(), axis=-1))
        else:
            cum = torch.cumsum(sorted_probs, dim=-1)
        reached = cum >= top_p
        # First index where the mass reaches top_p (argmax of a bool row gives
        # the first True; 0 when there is none, which is the package's quirk).
        idx = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)
        if not rwkv_top_p_quirk:
            # Rounding kept the sum below top_p: keep everything.
            idx = torch.where(reached.any(dim=-1, keepdim=True), idx, torch.full_like(idx, probs.shape[-1] - 1))
        cutoff = sorted_probs.gather(-1, idx)
        keep &= probs >= cutoff
    if 0 < top_k < probs.shape[-1]:
        top = torch.topk(probs, top_k, dim=-1).indices
        k_mask = torch.zeros_like(keep)
        k_mask.scatter_(-1, top, True)
        keep &= k_mask
    if min_p > 0:
        keep &= probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return keep


def final_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a draw uses: [B, V] probabilities after truncation and
    temperature (one-hot on the arg-max for temperature 0)."""
    logits = logits.float()
    if cfg.temperature == 0:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return out
    probs = torch.softmax(logits, dim=-1)
    keep = kept_mask(probs, cfg.top_p, cfg.top_k, cfg.min_p, cfg.rwkv_top_p_quirk)
    # p ** (1/T) over the kept set == softmax(logits / T) restricted to it.
    scaled = torch.where(keep, logits / cfg.temperature, torch.full_like(logits, float("-inf")))
    return torch.softmax(scaled, dim=-1)


def make_generators(seed: int, n: int, device: "torch.device | str" = "cpu") -> list[torch.Generator]:
    """One generator per row, row i seeded with ``seed + i``: a batch row gives
    the same tokens as the same prompt run alone with seed ``seed + i``."""
    return [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(n)]


def sample(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generators: "Sequence[torch.Generator] | torch.Generator | None" = None,
    *,
    counts: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] (or [V]).

    ``counts``/``seen`` [B, V] are the penalty state (see
    :func:`update_penalty_state`); ``generators`` one per row, or one shared.
    Returns a LongTensor [B] (a 0-d tensor for 1-D logits).
    """
    squeeze = logits.dim() == 1
    if squeeze:
        logits = logits[None]
    logits = ban_tokens(add_logit_bias(logits.float(), cfg.logit_bias), cfg.banned_tokens)
    if counts is not None and seen is not None:
        logits = apply_penalties(logits, counts, seen, cfg.presence_penalty, cfg.frequency_penalty)
    if cfg.temperature == 0:
        out = logits.argmax(dim=-1)
    else:
        probs = final_probs(logits, cfg)
        if generators is None or isinstance(generators, torch.Generator):
            out = torch.multinomial(probs, 1, generator=generators)[:, 0]
        else:
            if len(generators) != probs.shape[0]:
                raise ValueError(f"sample: {len(generators)} generators for {probs.shape[0]} rows")
            out = torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0] for p, g in zip(probs, generators)])
    return out[0] if squeeze else out


__all__ = [
    "SamplingConfig",
    "ban_tokens",
    "add_logit_bias",
    "apply_penalties",
    "update_penalty_state",
    "penalty_weights",
    "kept_mask",
    "final_probs",
    "make_generators",
    "sample",
    "PENALTY_FREE_TEXT",
]
