"""Paired decode timings of builds of the fused C++ decoder (a benchmark, not a test).

The machine's memory bandwidth drifts by up to 2x within minutes, so two
kernel builds timed minutes apart cannot be compared.  This script builds
each variant of ``src/rwkvkit/runtime/csrc/infer_cpu.cpp`` (the file of a
git revision, and/or the current file with ``-D`` knobs such as ``RK_KR``,
``RK_CH``, ``RK_PF_DIST``, ``RK_PF_HINT``), then alternates them token run by
token run on the same model and reports each one's median tokens/s and its
paired ratio to the first variant (median of run-by-run ratios, and how many
runs it won).  It also reads 512 MiB with 1-16 concurrent streams per thread,
the measurement behind the decoder's row-stream layout.

    python benchmarks/bench_decode_kernels.py --generation 7 --shape 0.1b \\
        --variant old=rev:2b606a3 --variant new=cur --dtypes fp32,bf16,int8
    python benchmarks/bench_decode_kernels.py --variant kr8=cur \\
        --variant kr4=cur:-DRK_KR=4 --variant ch4=cur:-DRK_CH=4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = "src/rwkvkit/runtime/csrc"
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

STREAM_PROBE = r"""
#include <ATen/Parallel.h>
#include <omp.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
template <int S>
__attribute__((target("avx512f"))) double read_s(const float* f, int64_t n) {
  double tot = 0;
  const int nt = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt) reduction(+ : tot)
  {
    const int64_t per = n / omp_get_num_threads(), seg = per / S;
    const float* base = f + omp_get_thread_num() * per;
    __m512 a[S];
    for (int s = 0; s < S; ++s) a[s] = _mm512_setzero_ps();
    for (int64_t i = 0; i + 16 <= seg; i += 16)
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) a[s] = _mm512_add_ps(a[s], _mm512_loadu_ps(base + s * seg + i));
    __m512 z = _mm512_setzero_ps();
    for (int s = 0; s < S; ++s) z = _mm512_add_ps(z, a[s]);
    tot += _mm512_reduce_add_ps(z);
  }
  return tot;
}
double read_streams(int64_t p, int64_t n, int64_t s) {
  const float* f = reinterpret_cast<const float*>(p);
  switch (s) { case 1: return read_s<1>(f, n); case 2: return read_s<2>(f, n); case 4: return read_s<4>(f, n);
    case 8: return read_s<8>(f, n); default: return read_s<16>(f, n); }
}
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SOURCE:FLAGS",
                   help="cur[:FLAGS] (the working tree) or rev:<git revision>[:FLAGS]; FLAGS comma-separated -D options. "
                        "Default: head=rev:HEAD and cur=cur (the committed file against the working tree)")
    p.add_argument("--generation", choices=["4", "5", "6", "7"], default="7")
    p.add_argument("--shape", default="0.1b", help="a shape of bench_inference.py for the generation (default 0.1b)")
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="comma-separated of fp32, bf16, fp16, int8")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--runs", type=int, default=10, help="alternations (default 10)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per timed run (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-streams", action="store_true", help="skip the stream-count read probe")
    return p.parse_args(argv)


def variant_source(spec: str, tmp: Path, name: str) -> tuple[Path, list[str]]:
    """'cur[:FLAGS]' or 'rev:<revision>[:FLAGS]' -> (source file, -D flags)."""
    parts = spec.split(":")
    if parts[0] == "cur" and len(parts) <= 2:
        path, flags = ROOT / CSRC / "infer_cpu.cpp", parts[1:]
    elif parts[0] == "rev" and 2 <= len(parts) <= 3 and parts[1]:
        d = tmp / name
        d.mkdir()
        for f in ("infer_cpu.cpp", "step56.h"):
            out = subprocess.run(["git", "-C", str(ROOT), "show", f"{parts[1]}:{CSRC}/{f}"], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"--variant {name}: git cannot show {CSRC}/{f} at {parts[1]}: {out.stderr.strip()}")
            (d / f).write_text(out.stdout)
        path, flags = d / "infer_cpu.cpp", parts[2:]
    else:
        raise SystemExit(f"--variant {name}={spec}: expected cur[:FLAGS] or rev:<revision>[:FLAGS]")
    return path, [f for f in ",".join(flags).split(",") if f]


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_inference as bi
    from rwkvkit import runtime
    from rwkvkit.init import random_state_dict
    from rwkvkit.runtime import infer_cpu

    torch.set_num_threads(args.threads)
    specs = args.variant or ["head=rev:HEAD", "cur=cur"]
    tmp = Path(tempfile.mkdtemp(prefix="rwkvkit-kernels-"))
    mods = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        path, flags = variant_source(rest, tmp, name)
        tag = "".join(c if c.isalnum() else "_" for c in name)
        print(f"building {name}: {rest} -> {path} {' '.join(flags)}", flush=True)
        mods[name] = cpp_extension.load(name=f"rwkvkit_kernel_variant_{tag}", sources=[str(path)],
                                        extra_cflags=CFLAGS + flags, extra_ldflags=["-fopenmp"])
    infer_cpu.load_extension()

    print(f"CPU: {bi.cpu_name()}, {args.threads} threads; load average {bi.load_avg()}")
    if not args.no_streams:
        probe = cpp_extension.load_inline("rwkvkit_stream_probe", cpp_sources=[STREAM_PROBE],
                                          functions=["read_streams"], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
        big = torch.ones(128 * 1024 * 1024)
        m4096, v4096 = big.view(-1, 4096), torch.ones(4096)
        res: dict[str, list[float]] = {}
        for _ in range(6):
            for label, fn in [("torch.mv 4096 wide", lambda: torch.mv(m4096, v4096))] + [
                    (f"{s} stream(s)/thread", lambda s=s: probe.read_streams(big.data_ptr(), big.numel(), s)) for s in (1, 2, 4, 8, 16)]:
                fn()
                t = time.perf_counter()
                fn()
                res.setdefault(label, []).append(big.numel() * 4 / (time.perf_counter() - t) / 1e9)
        ref = res["torch.mv 4096 wide"]
        print("reading 512 MiB (6 alternations): GB/s median, paired ratio to torch.mv")
        for label, vals in res.items():
            print(f"   {label:<22} {statistics.median(vals):6.1f}   {statistics.median([a / b for a, b in zip(vals, ref)]):.3f}")
        del big, m4096

    if args.generation == "4":
        from rwkvkit.models.rwkv4 import RWKV as cls, RWKV4Config as config_cls
    else:
        cls, config_cls, *_ = bi.matrix_generation(args.generation)
    shapes = bi.SHAPES_BY_GEN[args.generation]
    if args.shape not in shapes:
        raise SystemExit(f"--shape {args.shape}: generation {args.generation} has {', '.join(shapes)}")
    cfg = config_cls(**shapes[args.shape])
    sd = random_state_dict(cfg, seed=0)
    models = {}
    for dt in args.dtypes.split(","):
        m = cls(cfg)
        m.load_state_dict(sd)
        m = m.eval()
        if dt == "int8":
            m = runtime.quantize_int8(m)
        elif dt in ("bf16", "fp16"):
            m = m.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dt])
        elif dt != "fp32":
            raise SystemExit(f"--dtypes: unknown {dt!r} (fp32, bf16, fp16, int8)")
        models[dt] = runtime.accelerate(m)
    del sd
    steps = list(range(100, 100 + args.tokens))

    def decode(m):
        state = None
        with torch.no_grad():
            for t in steps:
                _, state = m(torch.full((args.batch, 1), t), state)

    print(f"\nRWKV-{args.generation} {args.shape}, batch {args.batch}, {args.tokens} tokens per run, {args.runs} alternations")
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):
        for dt, m in models.items():
            for name, mod in mods.items():
                infer_cpu._ext = mod
                m._decode_plan = None
                decode(m)  # plan and warm-up
                t = time.perf_counter()
                decode(m)
                rates.setdefault((dt, name), []).append(len(steps) * args.batch / (time.perf_counter() - t))
    first = next(iter(mods))
    for dt in models:
        base = rates[(dt, first)]
        for name in mods:
            vals = rates[(dt, name)]
            ratios = [a / b for a, b in zip(vals, base)]
            print(f"   {dt:5s} {name:<12} {statistics.median(vals):8.1f} tok/s [{min(vals):.1f}-{max(vals):.1f}]   "
                  f"paired ratio to {first}: {statistics.median(ratios):.3f} (faster in {sum(r > 1 for r in ratios)}/{len(ratios)})")
    print(f"load average at end {bi.load_avg()}")


if __name__ == "__main__":
    main()
