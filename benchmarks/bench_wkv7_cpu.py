"""RWKV-7 WKV on the CPU: the backends side by side ("torch" = the chunked
WY/UT form, "cpu" = the compiled C++ scans, "reference" = the per-token loop).

Modes (all in one process, same inputs for every backend; seconds):

    shapes   the two shapes the backend choice is made on: a prompt (B=1,
             T=512, H=12, N=64, no grad) and a training batch (B=16, T=256,
             H=4, N=64, forward+backward), forward and forward+backward of
             each; median of --repeats runs after a warm-up.
    lengths  B=1, H=12, N=64 over --T (128 512 2048), best of --repeats, with
             the float32 error of each backend's y against the float64 loop.
    step     one training step (forward+backward of a [16, 256] batch, cross
             entropy) of the Tiny Shakespeare race's RWKV-7 (4 layers x 256,
             head size 64: what benchmarks/bench_train.py shakespeare builds),
             with each backend; median of --repeats.
    decode   wkv7_step (the handful of torch ops) against the cpu backend with
             T = 1, B=1, H=12, N=64, no grad: the per-token WKV of decoding.

    .venv/bin/python benchmarks/bench_wkv7_cpu.py [shapes|lengths|step|decode ...] [--threads 2] [--repeats 3]

The load average is printed before and after: on a shared machine the
numbers are only as good as it was quiet.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from rwkvkit.ops.wkv7 import DEFAULT_CHUNK, wkv7, wkv7_chunked, wkv7_reference, wkv7_step


def inputs(B, T, H, N, dtype=torch.float32, seed=0):
    """Model-like inputs: a = -kappa_hat, b = kappa_hat*alpha, logw within the clamp."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kappa = torch.nn.functional.normalize(rn(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g)
    logw = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N) * 2)
    xs = [rn(B, T, H, N), logw, rn(B, T, H, N), rn(B, T, H, N), -kappa, kappa * alpha, rn(B, H, N, N)]
    return [x.to(dtype) for x in xs]


def backend_fn(name: str, chunk: int = DEFAULT_CHUNK):
    if name == "reference":
        return wkv7_reference
    if name == "torch":
        return lambda *a: wkv7_chunked(*a, chunk_size=chunk)
    return lambda *a: wkv7(*a, backend=name)


def run_once(fn, args, backward: bool) -> float:
    leaves = [a.detach().clone().requires_grad_(backward) for a in args]
    start = time.perf_counter()
    if backward:
        y, s = fn(*leaves)
        (y.sum() + s.sum()).backward()
    else:
        with torch.no_grad():
            fn(*leaves)
    return time.perf_counter() - start


def timings(fn, args, backward: bool, repeats: int) -> list[float]:
    first = run_once(fn, args, backward)  # warm-up (and the cpu kernel's build or cache load)
    if first > 5:
        return [first]  # the loop at long T: one run says enough
    return [run_once(fn, args, backward) for _ in range(repeats)]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def isa_note() -> str:
    from rwkvkit.ops.wkv7 import cpu

    if cpu.load_extension() is None:
        return "cpu backend: not built"
    return f"cpu backend: {cpu.ISA_NAMES[cpu.get_isa()]} kernels"


SHAPES = {"prompt": (1, 512, 12, 64), "train": (16, 256, 4, 64)}


def cmd_shapes(args) -> None:
    names = args.backends.split(",")
    print(f"median of {args.repeats} after a warm-up; seconds; ratio = torch / cpu\n")
    print(f"{'shape':>22} {'pass':>8} " + " ".join(f"{n:>10}" for n in names) + f" {'ratio':>7}")
    for label, shape in SHAPES.items():
        x = inputs(*shape)
        for backward in (False, True):
            med = {n: statistics.median(timings(backend_fn(n), x, backward, args.repeats)) for n in names}
            ratio = f"{med['torch'] / med['cpu']:6.1f}x" if {"torch", "cpu"} <= med.keys() else ""
            print(f"{label + ' ' + 'x'.join(map(str, shape)):>22} {'fwd+bwd' if backward else 'fwd':>8} "
                  + " ".join(f"{med[n]:10.4f}" for n in names) + f" {ratio:>7}", flush=True)


def cmd_lengths(args) -> None:
    names = args.backends.split(",")
    print(f"B={args.B} H={args.H} N={args.N}, float32, chunk {args.chunk}, best of {args.repeats} after a warm-up; seconds\n")
    print(f"{'T':>6} {'pass':>8} " + " ".join(f"{n:>10}" for n in names) + "   fp32 max err of y (max|y|)")
    for T in args.T:
        x = inputs(args.B, T, args.H, args.N)
        with torch.no_grad():
            y64, _ = wkv7_reference(*[t.double() for t in x])
            errs = {n: (backend_fn(n, args.chunk)(*x)[0].double() - y64).abs().max().item() for n in names}
        err = " ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" ({y64.abs().max().item():.0f})"
        for backward in (False, True):
            best = {n: min(timings(backend_fn(n, args.chunk), x, backward, args.repeats)) for n in names}
            print(f"{T:>6} {'fwd+bwd' if backward else 'fwd':>8} " + " ".join(f"{best[n]:10.4f}" for n in names)
                  + (f"   {err}" if not backward else ""), flush=True)


def race_model(backend: str):
    """The RWKV-7 of benchmarks/bench_train.py shakespeare (maker("7"))."""
    from rwkvkit import models
    from rwkvkit.init import init_weights
    from rwkvkit.train import TrainConfig
    from rwkvkit.train.loop import model_config

    mc = model_config(TrainConfig(generation="7", n_layer=4, n_embd=256, head_size=64), 256)
    m = models.build(mc)
    init_weights(m, seed=0)
    m.wkv_backend = backend
    return m


def cmd_step(args) -> None:
    import torch.nn.functional as F

    names = args.backends.split(",")
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 256, (16, 257), generator=g)
    xs, ys = tok[:, :-1], tok[:, 1:]
    print(f"RWKV-7 4 layers x 256, head size 64, batch [16, 256], forward+backward, median of {args.repeats} "
          "after a warm-up; seconds\n")
    results = {}
    for n in names:
        m = race_model(n)
        ts = []
        for i in range(args.repeats + 1):
            m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logits, _ = m(xs)
            F.cross_entropy(logits.reshape(-1, 256), ys.reshape(-1)).backward()
            if i:
                ts.append(time.perf_counter() - start)
        results[n] = statistics.median(ts)
        print(f"{n:>10}: {results[n]:.3f} s/step  (runs: {', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    if {"torch", "cpu"} <= results.keys():
        print(f"\ntorch / cpu: {results['torch'] / results['cpu']:.2f}x")


def cmd_decode(args) -> None:
    B, H, N = 1, 12, 64
    x = inputs(B, 1, H, N)
    step_args = [t[:, 0] for t in x[:6]] + [x[6]]
    fns = {"wkv7_step": lambda: wkv7_step(*step_args), "cpu T=1": lambda: wkv7(*x, backend="cpu")}
    print(f"B={B} H={H} N={N}, one token, no grad; median of 200 calls after 20; microseconds\n")
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(20):
                fn()
            ts = []
            for _ in range(200):
                start = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - start)
            print(f"{name:>10}: {statistics.median(ts) * 1e6:8.1f} us", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="shapes", choices=["shapes", "lengths", "step", "decode"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default=None, help="comma-separated (default: torch,cpu; lengths: reference,torch,cpu)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    args = p.parse_args()
    if args.backends is None:
        args.backends = "reference,torch,cpu" if args.mode == "lengths" else "torch,cpu"
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} logical cores, {args.threads} torch threads, torch {torch.__version__}; {isa_note()}")
    print(f"before: {load()}")
    {"shapes": cmd_shapes, "lengths": cmd_lengths, "step": cmd_step, "decode": cmd_decode}[args.mode](args)
    print(f"\nafter: {load()}")


if __name__ == "__main__":
    main()
