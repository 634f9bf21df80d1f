"""RWKV-5/6 WKV on the CPU: the reference loop, the sub-chunked form ("torch") and the C++ scan ("cpu").

Prints seconds for the forward pass (no grad) and forward+backward (autograd)
of each backend, in one run on the same inputs, with the ratio torch / cpu
(or reference / torch without the cpu backend), and each fp32 backend's max
error against the float64 reference.  Inputs are RWKV-6-like: logw = -exp(d)
with d uniform over [-7, 1] (w from ~0.999 to ~0.07).  The load average is
printed before and after: on a shared machine, wall-clock numbers swing with it
(with 2 threads, a busy second core stalls every parallel region: the chunked
form's hundreds of small ops measured 40x slower so), hence ``--quiet``.

    .venv/bin/python benchmarks/bench_wkv6_cpu.py [--threads 2] [--B 1 --H 16 --T 128 512 2048]
    .venv/bin/python benchmarks/bench_wkv6_cpu.py --shapes prompt train --backends torch cpu --stat median --repeats 3 --quiet

``--train-step`` times instead one forward+backward of a whole RWKV-6 and
RWKV-5.2 model (the Tiny Shakespeare race's: 4 layers x 256, head size 64,
byte vocabulary, built as benchmarks/bench_train.py's ``maker("6")`` /
``maker("5")``) on a [16, 256] batch, with each WKV backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rwkvkit.ops.wkv6 import DEFAULT_CHUNK, DEFAULT_SUB_CHUNK, wkv6_chunked, wkv6_reference

# Named (B, T, H, N): a 0.1B-like prompt, and the Tiny Shakespeare race's training batch
# (4 layers x 256, head size 64, batch 16, ctx 256).
SHAPES = {"prompt": (1, 512, 16, 64), "train": (16, 256, 4, 64)}


def inputs(B, T, H, N, dtype=torch.float32, seed=0):
    """r, k, v ~ N(0, 1); logw = -exp(d), d ~ U[-7, 1]; u ~ N(0, 1); a random state."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    logw = -torch.exp(torch.rand(B, T, H, N, generator=g) * 8 - 7)
    xs = [rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N), logw, rn(H, N), rn(B, H, N, N)]
    return [x.to(dtype) for x in xs]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds() -> tuple[float, float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat, and this process's own."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return (sum(v) - v[3] - v[4]) / _TICK, sum(v) / _TICK, t.user + t.system


def _others_share(before, after) -> float:
    """Share of the machine's CPU time other processes used between two _cpu_seconds()."""
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(0.0, busy - own) / max(total, 1e-9)


def quiet(measure, max_share: float = 0.05, wait_s: float = 1800.0):
    """Run ``measure()`` when other processes use < 3% of the CPUs (checked over 2 s), and
    again until they used < max_share while it ran; returns (its result, that share)."""
    deadline = time.time() + wait_s
    while True:
        while time.time() < deadline:
            a = _cpu_seconds()
            time.sleep(2)
            if _others_share(a, _cpu_seconds()) < 0.03:
                break
        a = _cpu_seconds()
        result = measure()
        share = _others_share(a, _cpu_seconds())
        if share < max_share or time.time() >= deadline:
            return result, share


def timed(fn, args, backward: bool, repeats: int, clock=time.perf_counter, stat: str = "best") -> float:
    times = []
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
            times.append(elapsed)
    return min(times) if stat == "best" else statistics.median(times)


def train_step(backends, threads: int, repeats: int, stat: str, wait: bool = False) -> None:
    """Forward+backward of the race's RWKV-6 and RWKV-5.2 on a [16, 256] batch, per WKV backend."""
    import torch.nn.functional as F

    from rwkvkit import models
    from rwkvkit.init import init_weights
    from rwkvkit.train import TrainConfig
    from rwkvkit.train.loop import model_config

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 256), generator=g)
    y = torch.randint(0, 256, (16, 256), generator=g)
    print(f"{threads} torch threads; forward+backward of a [16, 256] batch, 4 layers x 256, head size 64; "
          f"{stat} of {repeats} after a warm-up; wall-clock seconds; load average {_load()}\n")
    for gen in ("6", "5"):
        ranks = dict(d_mix=8, d_decay=16) if gen == "6" else {}  # as bench_train.py's maker()
        m = models.build(model_config(TrainConfig(generation=gen, n_layer=4, n_embd=256, head_size=64, **ranks), 256))
        init_weights(m, seed=0)
        row = []
        for backend in backends:
            m.wkv_backend = backend

            def steps():
                times = []
                for i in range(repeats + 1):  # the first one warms up
                    m.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    logits, _ = m(x)
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
                    if i > 0:
                        times.append(time.perf_counter() - start)
                return min(times) if stat == "best" else statistics.median(times)

            if wait:
                t, share = quiet(steps)
                row.append(f"{backend} {t:.3f} s (others: {share:.0%} of the CPUs)")
            else:
                row.append(f"{backend} {steps():.3f} s")
        print(f"RWKV-{'6' if gen == '6' else '5.2'}: " + ", ".join(row), flush=True)
    print(f"\nload average after: {_load()}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="named shapes instead of --B/--H/--N/--T")
    p.add_argument("--backends", nargs="+", choices=("reference", "torch", "cpu"), default=["reference", "torch", "cpu"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stat", choices=("best", "median"), default="best", help="of the timed repeats")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--sub", type=int, default=DEFAULT_SUB_CHUNK)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of this thread (with --threads 1, robust on a loaded machine)")
    p.add_argument("--no-reference", action="store_true", help="same as leaving 'reference' out of --backends")
    p.add_argument("--train-step", action="store_true", help="time whole RWKV-6 / RWKV-5.2 training steps instead")
    p.add_argument("--quiet", action="store_true",
                   help="Linux, shared machines: start each measurement when other processes leave the CPUs idle, "
                        "and repeat it until they used < 5%% of them meanwhile (printed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.train_step:
        return train_step([b for b in args.backends if b != "reference"], args.threads, args.repeats, args.stat, args.quiet)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread: use --threads 1")
    names = [b for b in args.backends if not (args.no_reference and b == "reference")]
    fns = {
        "reference": wkv6_reference,
        "torch": lambda *a: wkv6_chunked(*a, chunk_size=args.chunk, sub_chunk=args.sub),
    }
    isa = ""
    if "cpu" in names:
        from rwkvkit.ops.wkv6 import cpu

        impl = cpu.get_implementation()
        if impl is None:
            raise SystemExit("the C++ WKV-6 kernel could not be built (see the warning)")
        fns["cpu"] = impl
        isa = f", C++ kernel family {cpu.plan(args.N if not args.shapes else SHAPES[args.shapes[0]][3])[0]}"
    shapes = [SHAPES[s] for s in args.shapes] if args.shapes else [(args.B, T, args.H, args.N) for T in args.T]
    print(f"{os.cpu_count()} logical cores, {args.threads} torch threads, torch {torch.__version__}{isa}")
    print(f"float32, torch = chunk {args.chunk} / sub-chunk {args.sub}; {args.stat} of {args.repeats} after a warm-up; "
          f"{args.clock}-clock seconds; load average {_load()}\n")
    a, b = ("torch", "cpu") if {"torch", "cpu"} <= set(names) else ("reference", "torch")
    ratio = {a, b} <= set(names)
    header = f"{'B':>3} {'T':>6} {'H':>3} {'N':>4} {'pass':>8} " + " ".join(f"{n:>10}" for n in names)
    header += f" {a[:5] + '/' + b:>11}" if ratio else ""
    print(header + "  fp32 err vs fp64 (max|y|)")
    print("-" * (len(header) + 27))
    for B, T, H, N in shapes:
        x = inputs(B, T, H, N)
        with torch.no_grad():
            y64, _ = wkv6_reference(*[t.double() for t in x])
            errs = []
            for n in names:
                if n != "reference":
                    y32, _ = fns[n](*x)
                    errs.append(f"{n} {(y32.double() - y64).abs().max().item():.1e}")
        err = ", ".join(errs) + f" ({y64.abs().max().item():.0f})"
        for backward in (False, True):
            t, others = {}, []
            for n in names:
                run = lambda: timed(fns[n], x, backward, args.repeats, clock, args.stat)  # noqa: E731
                if args.quiet:
                    t[n], share = quiet(run)
                    others.append(f"{share:.0%}")
                else:
                    t[n] = run()
            row = f"{B:>3} {T:>6} {H:>3} {N:>4} {'fwd+bwd' if backward else 'fwd':>8} "
            row += " ".join(f"{t[n]:10.4f}" for n in names)
            row += f" {t[a] / t[b]:10.1f}x" if ratio else ""
            row += f"  (others: {'/'.join(others)} of the CPUs)" if args.quiet else ""
            print(row + ("  " + err if not backward else ""), flush=True)
    print(f"\nload average after: {_load()}")


if __name__ == "__main__":
    main()
