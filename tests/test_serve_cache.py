"""The prefix state cache on its own: longest-prefix lookup, byte bound, LRU order."""

from __future__ import annotations

import torch

from rwkvkit.serve.cache import PrefixCache, prefix_hashes
from rwkvkit.state import State


def _state(value: float) -> State:
    st = State.zeros(2, 1, 8)
    return State(*(t + value for t in st.tensors()))


def _entry_bytes(n_ids: int, with_logits: bool) -> int:
    return _state(0).nbytes + (16 * 4 if with_logits else 0) + 8 * n_ids


def test_prefix_hashes_are_per_prefix():
    h = prefix_hashes([5, 6, 7])
    assert len(h) == 4 and h[0] == 0
    assert prefix_hashes([5, 6]) == h[:3]
    assert prefix_hashes([5, 7])[2] != h[2]


def test_longest_usable_prefix_wins():
    cache = PrefixCache(10**6)
    cache.put([1, 2], _state(1), None)
    cache.put([1, 2, 3, 4], _state(2), torch.full((16,), 2.0))
    cache.put([1, 2, 3, 4, 5, 6], _state(3), None)  # a mid-prompt snapshot: no logits
    n, e = cache.lookup([1, 2, 3, 4, 5, 6, 7])
    assert n == 6 and float(e.state.att_x[0, 0, 0]) == 3
    # The whole prompt cached without logits cannot serve it (the next token
    # needs them): the longest prefix with a usable entry is taken instead.
    n, e = cache.lookup([1, 2, 3, 4, 5, 6])
    assert n == 4 and float(e.logits[0]) == 2
    n, e = cache.lookup([1, 2, 3, 4])
    assert n == 4 and e.logits is not None
    assert cache.lookup([1, 9, 9]) == (0, None)
    assert cache.lookup([2, 1]) == (0, None)
    s = cache.stats()
    assert s["lookups"] == 5 and s["hits"] == 3 and s["hit_tokens"] == 14
    assert abs(s["hit_rate"] - 3 / 5) < 1e-12


def test_entries_are_copies():
    cache = PrefixCache(10**6)
    st = _state(1)
    cache.put([1], st, torch.zeros(16))
    st.att_x.fill_(7)
    assert float(cache.lookup([1])[1].state.att_x[0, 0, 0]) == 1


def test_byte_bound_evicts_least_recently_used():
    one = _entry_bytes(3, True)
    cache = PrefixCache(3 * one)
    for i in range(3):
        cache.put([i, i, i], _state(i), torch.zeros(16))
    assert cache.bytes == 3 * one and len(cache) == 3
    assert cache.lookup([0, 0, 0, 9])[0] == 3  # entry 0 is now the most recently used
    cache.put([3, 3, 3], _state(3), torch.zeros(16))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.lookup([1, 1, 1, 9]) == (0, None)  # entry 1 was the least recently used
    assert cache.lookup([0, 0, 0, 9])[0] == 3
    assert cache.lookup([2, 2, 2, 9])[0] == 3
    assert cache.stats()["evictions"] == 1
    # Too big for the whole cache: not stored, nothing evicted.
    small = PrefixCache(one - 1)
    small.put([1, 1, 1], _state(1), torch.zeros(16))
    assert len(small) == 0 and small.bytes == 0
    # Disabled.
    off = PrefixCache(0)
    off.put([1], _state(1), None)
    assert off.lookup([1, 2]) == (0, None)
