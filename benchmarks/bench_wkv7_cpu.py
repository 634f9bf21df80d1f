"""RWKV-7 WKV on the CPU: the reference loop against the chunked WY/UT form.

Prints best-of-N seconds for the forward pass (no grad) and forward+backward
(autograd) of both, in one run on the same inputs, with the ratio
reference / chunked, and the float32 chunked form's max error against the
float64 reference.

    .venv/bin/python benchmarks/bench_wkv7_cpu.py [--threads 2] [--T 128 512 2048] [--chunk 32]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from rwkvkit.ops.wkv7 import DEFAULT_CHUNK, wkv7_chunked, wkv7_reference


def inputs(B, T, H, N, dtype=torch.float32, seed=0):
    """Model-like inputs: a = -kappa_hat, b = kappa_hat*alpha, logw within the clamp."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kappa = torch.nn.functional.normalize(rn(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g)
    logw = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N) * 2)
    xs = [rn(B, T, H, N), logw, rn(B, T, H, N), rn(B, T, H, N), -kappa, kappa * alpha, rn(B, H, N, N)]
    return [x.to(dtype) for x in xs]


def timed(fn, args, backward: bool, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        leaves = [a.detach().clone().requires_grad_(backward) for a in args]
        start = time.perf_counter()
        if backward:
            y, s = fn(*leaves)
            (y.sum() + s.sum()).backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        elapsed = time.perf_counter() - start
        if i == 0 and elapsed > 5:
            return elapsed  # the loop at long T: warm-up is noise next to this
        if i > 0:
            best = min(best, elapsed)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} logical cores, {args.threads} torch threads, torch {torch.__version__}")
    print(f"B={args.B} H={args.H} N={args.N}, float32, chunk {args.chunk}, best of {args.repeats} after a warm-up; seconds\n")
    chunked = lambda *a: wkv7_chunked(*a, chunk_size=args.chunk)  # noqa: E731
    header = f"{'T':>6} {'pass':>8} {'reference':>10} {'chunked':>10} {'ratio':>7}"
    print(header + f" {'fp32 err (max|y|)':>22}")
    print("-" * (len(header) + 23))
    for T in args.T:
        x = inputs(args.B, T, args.H, args.N)
        with torch.no_grad():
            y64, _ = wkv7_reference(*[t.double() for t in x])
            y32, _ = chunked(*x)
        err = f"{(y32.double() - y64).abs().max().item():.2e} ({y64.abs().max().item():.0f})"
        for backward in (False, True):
            t_ref = timed(wkv7_reference, x, backward, args.repeats)
            t_chk = timed(chunked, x, backward, args.repeats)
            print(f"{T:>6} {'fwd+bwd' if backward else 'fwd':>8} {t_ref:10.4f} {t_chk:10.4f} {t_ref / t_chk:6.1f}x"
                  + (f" {err:>22}" if not backward else ""), flush=True)


if __name__ == "__main__":
    main()
