"""RWKV-5/6 WKV on the CPU: the reference loop against the sub-chunked form.

Prints best-of-N seconds for the forward pass (no grad) and forward+backward
(autograd) of both, in one run on the same inputs, with the ratio
reference / chunked, and the float32 chunked form's max error against the
float64 reference.  Inputs are RWKV-6-like: logw = -exp(d) with d uniform
over [-7, 1] (w from ~0.999 to ~0.07), so the stable sub-chunked path is
exercised with decays of every size a trained model produces.

    .venv/bin/python benchmarks/bench_wkv6_cpu.py [--threads 2] [--T 128 512 2048] [--chunk 32 --sub 16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rwkvkit.ops.wkv6 import DEFAULT_CHUNK, DEFAULT_SUB_CHUNK, wkv6_chunked, wkv6_reference


def inputs(B, T, H, N, dtype=torch.float32, seed=0):
    """r, k, v ~ N(0, 1); logw = -exp(d), d ~ U[-7, 1]; u ~ N(0, 1); a random state."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    logw = -torch.exp(torch.rand(B, T, H, N, generator=g) * 8 - 7)
    xs = [rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N), logw, rn(H, N), rn(B, H, N, N)]
    return [x.to(dtype) for x in xs]


def timed(fn, args, backward: bool, repeats: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        leaves = [a.detach().clone().requires_grad_(backward) for a in args]
        start = clock()
        if backward:
            y, s = fn(*leaves)
            (y.sum() + s.sum()).backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        elapsed = clock() - start
        if i == 0 and elapsed > 5:
            return elapsed  # the loop at long T: warm-up is noise next to this
        if i > 0:
            best = min(best, elapsed)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--sub", type=int, default=DEFAULT_SUB_CHUNK)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of this thread (with --threads 1, robust on a loaded machine)")
    p.add_argument("--no-reference", action="store_true", help="time the chunked form only (tuning)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread: use --threads 1")
    print(f"{os.cpu_count()} logical cores, {args.threads} torch threads, torch {torch.__version__}")
    print(f"B={args.B} H={args.H} N={args.N}, float32, chunk {args.chunk}, sub-chunk {args.sub}, "
          f"best of {args.repeats} after a warm-up; {args.clock}-clock seconds\n")
    chunked = lambda *a: wkv6_chunked(*a, chunk_size=args.chunk, sub_chunk=args.sub)  # noqa: E731
    header = f"{'T':>6} {'pass':>8} {'reference':>10} {'chunked':>10} {'ratio':>7}"
    print(header + f" {'fp32 err (max|y|)':>22}")
    print("-" * (len(header) + 23))
    for T in args.T:
        x = inputs(args.B, T, args.H, args.N)
        with torch.no_grad():
            y64, _ = wkv6_reference(*[t.double() for t in x])
            y32, _ = chunked(*x)
        err = f"{(y32.double() - y64).abs().max().item():.2e} ({y64.abs().max().item():.0f})"
        for backward in (False, True):
            t_ref = float("nan") if args.no_reference else timed(wkv6_reference, x, backward, args.repeats, clock)
            t_chk = timed(chunked, x, backward, args.repeats, clock)
            print(f"{T:>6} {'fwd+bwd' if backward else 'fwd':>8} {t_ref:10.4f} {t_chk:10.4f} {t_ref / t_chk:6.1f}x"
                  + (f" {err:>22}" if not backward else ""), flush=True)


if __name__ == "__main__":
    main()
