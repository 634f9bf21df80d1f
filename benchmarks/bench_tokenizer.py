"""Tokenizer throughput, measured side by side in one run.

Encodes the same text with the `rwkv` package's World tokenizer
(rwkv.rwkv_tokenizer.TRIE_TOKENIZER) and with rwkvkit's World tokenizer (the
pyrwkv-tokenizer fast path, and the pure-Python fallback), checks that the ids
are identical, and prints MB/s and the ratio to the `rwkv` package (target: at
least 5x).  Also times decoding and token-by-token streaming, and the 20B
tokenizer when its file is given.

    python benchmarks/bench_tokenizer.py                   # ../shared/data texts if present
    python benchmarks/bench_tokenizer.py --text FILE [--tokenizer-20b 20B_tokenizer.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _default_text() -> str:
    parts = []
    for name in ("tinyshakespeare.txt", "enwik8_small.txt"):
        if (SHARED / name).is_file():
            parts.append((SHARED / name).read_text(encoding="utf-8"))
    if not parts:
        rnd = random.Random(0)
        words = ["the", "king", "of", "RWKV", "ça", "你好", "🙂", "and", "12345", "\n"]
        parts.append(" ".join(rnd.choice(words) for _ in range(300_000)))
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text file to encode (default: shared corpora)")
    ap.add_argument("--tokenizer-20b", type=Path, default=SHARED / "tokenizers" / "20B_tokenizer.json")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    args = ap.parse_args()

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkvkit.tokenizer import WorldTokenizer, load_tokenizer

    text = args.text.read_text(encoding="utf-8") if args.text else _default_text()
    mb = len(text.encode("utf-8")) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; text: {mb:.2f} MB")

    t0 = time.perf_counter()
    ref = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    ref_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = load_tokenizer("world")
    fast_load = time.perf_counter() - t0
    slow = WorldTokenizer(use_fast=False)
    slow.encode_bytes(b"warm up the trie")

    want = ref.encode(text)
    assert fast.encode(text) == want, "rwkvkit World ids differ from the rwkv package's"
    small = text[:200_000]
    assert slow.encode(small) == ref.encode(small), "Python-path ids differ from the rwkv package's"

    t_ref = _best(lambda: ref.encode(text), args.repeat)
    t_fast = _best(lambda: fast.encode(text), args.repeat)
    t_slow = _best(lambda: slow.encode(text), 1)
    print(f"\nWorld encode ({len(want):,} tokens, ids identical)     MB/s   vs rwkv")
    print(f"  rwkv package TRIE_TOKENIZER            {mb / t_ref:8.2f}   1.00x   (load {ref_load:.2f} s)")
    print(f"  rwkvkit world [{fast.backend}]     {mb / t_fast:8.2f}   {t_ref / t_fast:5.2f}x   (load {fast_load:.2f} s)")
    print(f"  rwkvkit world [python fallback]        {mb / t_slow:8.2f}   {t_ref / t_slow:5.2f}x")

    t_dref = _best(lambda: ref.decode(want), args.repeat)
    t_dec = _best(lambda: fast.decode(want), args.repeat)

    def streaming():
        d = fast.stream_decoder()
        for i in want:
            d.push(i)
        d.flush()

    t_stream = _best(streaming, 1)
    print("\nWorld decode                                 MB/s")
    print(f"  rwkv package decode                    {mb / t_dref:8.2f}")
    print(f"  rwkvkit decode                         {mb / t_dec:8.2f}")
    print(f"  rwkvkit streaming, one token at a time {mb / t_stream:8.2f}")

    if args.tokenizer_20b and args.tokenizer_20b.is_file():
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(args.tokenizer_20b))
        ours = load_tokenizer(args.tokenizer_20b)
        piece = text[:500_000]
        pmb = len(piece.encode("utf-8")) / 1e6
        ids = hf.encode(piece).ids
        t_hf = _best(lambda: hf.decode(ids), args.repeat)
        t_ours = _best(lambda: ours.decode(ids), args.repeat)
        t_enc = _best(lambda: ours.encode(piece), 1)
        print(f"\n20B ({pmb:.2f} MB)                               MB/s")
        print(f"  encode (tokenizers, through rwkvkit)   {pmb / t_enc:8.2f}")
        print(f"  decode tokenizers                      {pmb / t_hf:8.2f}")
        print(f"  decode rwkvkit byte table              {pmb / t_ours:8.2f}")


if __name__ == "__main__":
    main()
