"""Prefix state cache: the state after a token prefix, reused by later prompts.

An RWKV state has a fixed size whatever the context length (a few vectors per
layer for RWKV-4, plus a matrix per head for RWKV-5/6/7), so the state after a
system prompt or an earlier turn of a conversation can be kept.  A prompt that starts with a cached prefix is prefilled from that state
and only its remaining tokens go through the model.

Entries are keyed by their token ids; lookup finds the longest cached prefix
of a prompt.  Memory is bounded in bytes (``state.nbytes`` of any generation's state, plus,
where kept, the last position's logits) with least-recently-used eviction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..state import StateBase

# Polynomial hash of token prefixes, modulo a Mersenne prime: every prefix's
# hash comes from one pass over the prompt, so looking up all cached lengths
# costs O(prompt + entries), not O(prompt * entries).  A hash match is then
# confirmed by comparing the ids.
_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(ids: Sequence[int]) -> list[int]:
    """h[n] = hash of ids[:n] for n = 0..len(ids)."""
    out = [0] * (len(ids) + 1)
    h = 0
    for i, t in enumerate(ids):
        h = (h * _BASE + int(t) + 1) % _MOD
        out[i + 1] = h
    return out


@dataclass
class CacheEntry:
    ids: tuple[int, ...]
    # Batch-1 state after ids.
    state: StateBase
    # Logits [V] after the last id (None for a mid-prompt snapshot, which can
    # only serve prompts longer than it).
    logits: torch.Tensor | None
    nbytes: int


class PrefixCache:
    """Bounded LRU map from token prefixes to (state, last logits).  Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple[int, int], CacheEntry]" = OrderedDict()
        self._lengths: dict[int, int] = {}  # prefix length -> number of entries of that length
        self._lock = threading.Lock()
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, CacheEntry | None]:
        """(length, entry) of the longest cached prefix of ``ids`` that can
        continue it: shorter than ``ids``, or all of it with logits.  (0, None)
        on a miss.  Updates the hit statistics."""
        n = len(ids)
        with self._lock:
            self.lookups += 1
            self.prompt_tokens += n
            if self.max_bytes <= 0 or not self._entries:
                return 0, None
            hashes = prefix_hashes(ids)
            for length in sorted(self._lengths, reverse=True):
                if length > n:
                    continue
                entry = self._entries.get((length, hashes[length]))
                if entry is None or entry.ids != tuple(ids[:length]):
                    continue
                if length == n and entry.logits is None:
                    continue
                self._entries.move_to_end((length, hashes[length]))
                self.hits += 1
                self.hit_tokens += length
                return length, entry
            return 0, None

    def put(self, ids: Sequence[int], state: StateBase, logits: torch.Tensor | None) -> None:
        """Keep a copy of ``state`` (batch 1) and ``logits`` [V] for ``ids``."""
        if self.max_bytes <= 0 or not ids:
            return
        ids = tuple(int(t) for t in ids)
        key = (len(ids), prefix_hashes(ids)[-1])
        # Copies: the caller's tensors are often views into a whole batch.
        state = state.clone()
        logits = logits.detach().clone() if logits is not None else None
        nbytes = state.nbytes + (logits.numel() * logits.element_size() if logits is not None else 0) + 8 * len(ids)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
                if old.ids == ids and old.logits is not None and logits is None:
                    logits, nbytes = old.logits, old.nbytes  # keep the richer entry
            entry = CacheEntry(ids, state, logits, nbytes)
            self._entries[key] = entry
            self._lengths[len(ids)] = self._lengths.get(len(ids), 0) + 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._entries:
                _, victim = self._entries.popitem(last=False)
                self._forget(victim)
                self.evictions += 1

    def _forget(self, entry: CacheEntry) -> None:
        self.bytes -= entry.nbytes
        n = len(entry.ids)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "lookups": self.lookups,
                "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "prompt_tokens": self.prompt_tokens,
                "hit_tokens": self.hit_tokens,
                "token_hit_rate": self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "evictions": self.evictions,
            }
