"""rwkv.cpp dequantisation speed: rwkvkit's decoder against gguf-py's, side by side.

    .venv/bin/python benchmarks/dequantize.py [--rows 2048 --cols 4096]

Prints elements per second for each ggml type and the ratio (gguf time /
rwkvkit time; > 1 means rwkvkit is faster), after checking both decode the
same blocks to identical floats.  Needs the test extra (gguf).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    from gguf import GGMLQuantizationType, quants

    from rwkvkit import rwkvcpp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}; matrix {args.rows} x {args.cols}")
    print(f"{'type':6} {'rwkvkit Melem/s':>16} {'gguf Melem/s':>13} {'ratio':>6}")
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        qtype = GGMLQuantizationType[name]
        q = quants.quantize(x, qtype)
        ours = theirs = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            a = rwkvcpp.dequantize(q.reshape(-1), name, x.size)
            ours = min(ours, time.perf_counter() - t)
            t = time.perf_counter()
            b = quants.dequantize(q, qtype)
            theirs = min(theirs, time.perf_counter() - t)
        assert np.array_equal(a.reshape(x.shape), b), name
        print(f"{name:6} {x.size / ours / 1e6:16.0f} {x.size / theirs / 1e6:13.0f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
