"""WKV on the CPU: forward and forward+backward time of each implementation.

Compares, side by side in one run on the same inputs:
  reference  rwkvkit.ops.reference.wkv_reference (the spec, a Python loop)
  hf-loop    transformers' rwkv_linear_attention_cpu (HF's CPU path, a Python loop)
  torch      rwkvkit.ops.chunked.wkv_chunked (chunked PyTorch)
  cpu-ext    rwkvkit.ops.cpu.wkv_cpu (the C++ extension)
and prints best-of-N seconds with ratios to the C++ extension.

    .venv/bin/python benchmarks/bench_wkv_cpu.py [--threads 2] [--repeats 3] [--T 128 512 2048]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench_inference import cpu_name  # the same machine line in both reports (stdlib-only import)
from rwkvkit.ops import cpu
from rwkvkit.ops.chunked import DEFAULT_CHUNK, wkv_chunked
from rwkvkit.ops.reference import wkv_reference


def hf_loop():
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    def run(w, u, k, v, state=None):
        # HF takes the raw time_decay and applies -exp itself.
        time_decay = torch.log(-w)
        y, st = rwkv_linear_attention_cpu(time_decay, u, k, v, return_state=True)
        return y, tuple(st)

    return run


def timed(fn, args, backward: bool, repeats: int) -> float:
    best = float("inf")
    runs = repeats + 1  # the first run warms up
    i = 0
    while i < runs:
        i += 1
        leaves = [a.detach().clone().requires_grad_(backward) for a in args]
        start = time.perf_counter()
        if backward:
            y, (aa, bb, pp) = fn(*leaves)
            (y.sum() + aa.sum() + bb.sum()).backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        elapsed = time.perf_counter() - start
        if i == 1 and elapsed > 5:
            return elapsed  # the Python loops at long T: warm-up is noise next to this
        if i > 1:
            best = min(best, elapsed)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--C", type=int, default=512)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="chunk size of the torch backend")
    p.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    ext = cpu.get_implementation()
    print(f"C++ extension: {'ready' if ext else 'NOT AVAILABLE'} after {time.perf_counter() - start:.1f} s "
          f"(build or cache load: {cpu.build_seconds():.1f} s; AVX2 kernels: {cpu.uses_avx2()})")
    print(f"{cpu_name()}, {os.cpu_count()} logical cores, {args.threads} torch threads, torch {torch.__version__}")
    print(f"B={args.B} C={args.C}, float32, best of {args.repeats} after a warm-up; seconds (ratio to cpu-ext)\n")

    impls = {
        "reference": wkv_reference,
        "hf-loop": hf_loop(),
        "torch": lambda w, u, k, v, s=None: wkv_chunked(w, u, k, v, s, chunk_size=args.chunk),
        "cpu-ext": ext,
    }
    impls = {k: v for k, v in impls.items() if v is not None and k not in args.skip}
    header = f"{'T':>6} {'pass':>9} " + " ".join(f"{name:>18}" for name in impls)
    print(header)
    print("-" * len(header))
    g = torch.Generator().manual_seed(0)
    for T in args.T:
        C = args.C
        w = -torch.exp(torch.linspace(-6, 3, C))
        u = torch.randn(C, generator=g)
        k = torch.randn(args.B, T, C, generator=g) * 2
        v = torch.randn(args.B, T, C, generator=g)
        for backward in (False, True):
            times = {n: timed(f, (w, u, k, v), backward, args.repeats) for n, f in impls.items()}
            base = times.get("cpu-ext")
            cells = []
            for n in impls:
                ratio = f" ({times[n] / base:5.1f}x)" if base else ""
                cells.append(f"{times[n]:9.4f}{ratio:>9}")
            print(f"{T:>6} {'fwd+bwd' if backward else 'fwd':>9} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
