"""``rwkvkit bench``: the paper's inference claim measured on this machine.

RWKV generates with a constant-size state, so every token costs the same
time and memory; a Transformer with a KV cache attends over everything so far,
so its time per token and its cache grow with the length (paper section 7,
figure 7).  This module times both on the same shape: an RWKV model (RWKV-4,
or RWKV-7 with ``generation="7"``, built through :func:`rwkvkit.models.build`
and :func:`rwkvkit.init.random_state_dict`) and transformers' GPT-2 with the
same depth, width and vocabulary, random weights,
float32, greedy decoding from a one-token prompt, one forward call per token.
It records the time of every token, the process's resident memory after each
token, RWKV's state size and GPT-2's KV-cache size, and the time and peak
memory of prompts of growing length.  Each model runs in a fresh process
(``spawn``), so the memory figures are that model's own.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import RwkvkitError

# name -> (layers, width, vocabulary): the RWKV-4 Pile models (rwkv4 spec 9.1),
# the RWKV-7 World models (rwkv5-7 spec 10), and a toy shape for trying the
# command quickly.  Any shape runs with either generation.
SHAPES = {
    "tiny": (2, 64, 1000),
    "169m": (12, 768, 50277),
    "430m": (24, 1024, 50277),
    "1b5": (24, 2048, 50277),
    "3b": (32, 2560, 50277),
    "7b": (32, 4096, 50277),
    "0.1b": (12, 768, 65536),
    "0.4b": (24, 1024, 65536),
    "1.5b": (24, 2048, 65536),
    "2.9b": (32, 2560, 65536),
}
# Generations the bench builds with random weights, and each one's default shape.
GENERATIONS = {"4": "169m", "7": "0.1b"}
# RWKV-7 head size (every released model's).
V7_HEAD_SIZE = 64
WARMUP_TOKENS = 8


@dataclass
class BenchOptions:
    # None: the generation's default shape (169m for RWKV-4, 0.1b for RWKV-7).
    shape: str | None = None
    # RWKV generation of the random model ("4" or "7"; ignored with ``model``).
    generation: str = "4"
    model: str | None = None  # a checkpoint instead of random weights
    layers: int | None = None
    width: int | None = None
    vocab: int | None = None
    transformer: bool = True
    tokens: int = 4096
    prompt_lengths: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 4096])
    threads: int | None = None
    median_window: int = 64
    isolate: bool = True
    seed: int = 0
    out: str = "bench"
    plots: bool = True
    progress: bool = True


# ------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource

        # ru_maxrss is the peak (KiB on Linux, bytes on macOS): a fallback only.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """Highest resident memory seen while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ------------------------------------------------------------------ models
def resolve_shape(opts: BenchOptions) -> tuple[int, int, int]:
    gen = str(opts.generation)
    if gen not in GENERATIONS:
        raise RwkvkitError(f"unknown generation {opts.generation!r}: the bench builds RWKV-{' or RWKV-'.join(GENERATIONS)}")
    shape = opts.shape if opts.shape is not None else GENERATIONS[gen]
    if shape not in SHAPES:
        raise RwkvkitError(f"unknown shape {shape!r}: expected one of {', '.join(sorted(SHAPES))}")
    L, C, V = SHAPES[shape]
    L = opts.layers or L
    C = opts.width or C
    V = opts.vocab or V
    for name, v in (("layers", L), ("width", C), ("vocab", V)):
        if v < 1:
            raise RwkvkitError(f"--{name} must be positive, got {v}")
    if gen == "7" and C % V7_HEAD_SIZE:
        raise RwkvkitError(f"an RWKV-7 width must be a multiple of its {V7_HEAD_SIZE}-wide heads, got {C}")
    return L, C, V


def v7_lora_ranks(n_embd: int) -> dict[str, int]:
    """The LoRA ranks RWKV-LM's x070 trainer suggests for a width (multiples of
    32, at least 32): 64/64/32/128 at 768, the released 0.1B model's."""
    def r(x: float) -> int:
        return max(32, int(round(x / 32)) * 32)

    c = float(n_embd)
    return {"d_decay": r(1.8 * c**0.5), "d_aaa": r(1.8 * c**0.5), "d_mv": r(1.3 * c**0.5), "d_gate": r(0.6 * c**0.8)}


def bench_config(opts: BenchOptions):
    """The config of the random RWKV model the options describe."""
    L, C, V = resolve_shape(opts)
    if str(opts.generation) == "7":
        from ..models.rwkv7 import RWKV7Config

        return RWKV7Config(n_layer=L, n_embd=C, vocab_size=V, head_size=V7_HEAD_SIZE, **v7_lora_ranks(C))
    from ..models.rwkv4 import RWKV4Config

    return RWKV4Config(n_layer=L, n_embd=C, vocab_size=V)


def _build_rwkv(opts: BenchOptions):
    import torch

    if opts.model is not None:
        from ..checkpoint import load_user_model

        return load_user_model(opts.model, dtype="float32")
    from .. import models, runtime
    from ..init import random_state_dict

    cfg = bench_config(opts)
    sd = random_state_dict(cfg, seed=opts.seed)
    with torch.device("meta"):
        model = models.build(cfg)
    model.load_state_dict(sd, assign=True)
    return runtime.accelerate(model.eval())


def _rwkv_shape(opts: BenchOptions) -> tuple[int, int, int]:
    """(layers, width, vocabulary) of the RWKV side, without loading weights."""
    if opts.model is None:
        return resolve_shape(opts)
    from ..checkpoint import infer_config, read

    cfg = infer_config(read(opts.model, meta=True))
    return cfg.n_layer, cfg.n_embd, cfg.vocab_size


def _build_gpt2(L: int, C: int, V: int, positions: int, seed: int):
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise RwkvkitError('the Transformer side of the bench needs transformers: pip install "rwkvkit[hf]" (or --skip-transformer)') from None
    if C % 64:
        raise RwkvkitError(f"GPT-2 needs a width divisible by its 64-wide heads, got {C}")
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=V, n_positions=positions, n_embd=C, n_layer=L, n_head=C // 64, n_inner=4 * C, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).float().eval()


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values held by a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None:
                    total += t.numel() * t.element_size()
        return total
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)  # legacy tuples


# ----------------------------------------------------------- measurements
def _measure(kind: str, opts: BenchOptions) -> dict:
    """Generate and time, in this process; returns plain lists (picklable)."""
    import torch
    from tqdm.auto import tqdm

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rss0 = rss_bytes()
    if kind == "rwkv":
        model = _build_rwkv(opts)
        cfg = model.config
        L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
        params = model.num_parameters()
    else:
        # The shape only: building the RWKV weights here would leave freed
        # memory in this process and inflate the Transformer's RSS.
        L, C, V = _rwkv_shape(opts)
        positions = max([opts.tokens + WARMUP_TOKENS + 1] + list(opts.prompt_lengths))
        model = _build_gpt2(L, C, V, positions, opts.seed)
        params = sum(p.numel() for p in model.parameters())
    rss_model = rss_bytes()

    if kind != "rwkv":
        import inspect

        # transformers 5.x renamed past_key_values to cache.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(tok, past):
        """One token in, its successor (greedy) and the new state/cache out."""
        if kind == "rwkv":
            logits, past = model(tok, past, logits="last")
            return logits[:, -1].argmax(-1, keepdim=True), past
        out = model(input_ids=tok, use_cache=True, **{cache_arg: past})
        return out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, cache_arg)

    def prompt(ids):
        if kind == "rwkv":
            model(ids, None, logits="last")
        else:
            model(input_ids=ids, use_cache=True)

    def memo_bytes(past) -> int:
        return past.nbytes if kind == "rwkv" else kv_cache_bytes(past)

    times, rss, mem = [], [], []
    with torch.inference_mode():
        tok, past = torch.zeros(1, 1, dtype=torch.long), None
        for _ in range(WARMUP_TOKENS):  # builds kernels, allocator pools
            tok, past = step(tok, past)
        tok, past = torch.zeros(1, 1, dtype=torch.long), None
        bar = tqdm(total=opts.tokens, desc=f"generate {kind}", unit="tok", disable=not opts.progress, dynamic_ncols=True)
        for _ in range(opts.tokens):
            t0 = time.perf_counter()
            tok, past = step(tok, past)
            times.append(time.perf_counter() - t0)
            rss.append(rss_bytes())
            mem.append(memo_bytes(past))
            bar.update(1)
        bar.close()
        del past
        prompts = []
        g = torch.Generator().manual_seed(opts.seed)
        prompt(torch.zeros(1, 8, dtype=torch.long))  # warm-up of the parallel path
        for n in sorted(set(opts.prompt_lengths)):
            ids = torch.randint(0, V, (1, n), generator=g)
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                prompt(ids)
                dt = time.perf_counter() - t0
            prompts.append({"length": n, "seconds": dt, "tokens_per_second": n / dt, "peak_rss_increase": peak.peak - peak.start})
    return {
        "kind": kind,
        "name": f"RWKV-{model.config.generation}" if kind == "rwkv" else "GPT-2 (transformers)",
        "generation": model.config.generation if kind == "rwkv" else None,
        "parameters": params,
        "layers": L,
        "width": C,
        "vocab": V,
        "rss_start": rss0,
        "rss_after_load": rss_model,
        "times": times,
        "rss": rss,
        "state_bytes": mem,
        "prompts": prompts,
        "threads": torch.get_num_threads(),
    }


def _run_isolated(kind: str, opts: BenchOptions) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_measure, kind, opts).result()


# ---------------------------------------------------------------- analysis
def median_at(times: list[float], k: int, window: int) -> float:
    """Median time of the ``window`` tokens ending at token ``k`` (1-based)."""
    lo = max(0, k - window)
    return statistics.median(times[lo:k])


def table_rows(n: int) -> list[int]:
    rows = [k for k in (64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768) if k <= n]
    if not rows or rows[-1] != n:
        rows.append(n)
    return rows


def summarize(results: list[dict], opts: BenchOptions) -> dict:
    n = opts.tokens
    W = opts.median_window
    rows = []
    for k in table_rows(n):
        row = {"token": k}
        for r in results:
            kk = r["kind"]
            row[f"{kk}_ms_per_token"] = 1e3 * median_at(r["times"], k, W)
            row[f"{kk}_cumulative_s"] = sum(r["times"][:k])
            row[f"{kk}_rss_mb"] = r["rss"][k - 1] / 2**20
            row[f"{kk}_state_bytes"] = r["state_bytes"][k - 1]
        rows.append(row)
    out = {"rows": rows}
    ref = 256 if n >= 256 else table_rows(n)[0]
    for r in results:
        kk = r["kind"]
        out[f"{kk}_per_token_ratio_{n}_vs_{ref}"] = median_at(r["times"], n, W) / median_at(r["times"], ref, W)
    if len(results) == 2:
        a, b = results
        out[f"cumulative_ratio_gpt2_over_rwkv_at_{n}"] = sum(b["times"]) / sum(a["times"])
    return out


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def format_table(summary: dict, results: list[dict]) -> str:
    kinds = [r["kind"] for r in results]
    head = ["token"]
    for k in kinds:
        head += [f"{k} ms/tok", f"{k} cum s", f"{k} RSS MB", "state B" if k == "rwkv" else "KV cache B"]
    lines = [" | ".join(f"{h:>12}" for h in head)]
    for row in summary["rows"]:
        cells = [f"{row['token']:>12}"]
        for k in kinds:
            cells += [
                f"{row[f'{k}_ms_per_token']:>12.2f}",
                f"{row[f'{k}_cumulative_s']:>12.2f}",
                f"{row[f'{k}_rss_mb']:>12.1f}",
                f"{row[f'{k}_state_bytes']:>12,d}",
            ]
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("prompt length | " + " | ".join(f"{k} s, tok/s, peak +MB" for k in kinds))
    by_len = {}
    for r in results:
        for p in r["prompts"]:
            by_len.setdefault(p["length"], {})[r["kind"]] = p
    for n in sorted(by_len):
        cells = [f"{n:>13}"]
        for k in kinds:
            p = by_len[n].get(k)
            cells.append(f"{p['seconds']:8.3f}, {p['tokens_per_second']:9.0f}, {p['peak_rss_increase'] / 2**20:8.1f}" if p else "-")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------- plots
def _rolling_median(xs: list[float], w: int) -> list[float]:
    return [statistics.median(xs[max(0, i + 1 - w) : i + 1]) for i in range(len(xs))]


def draw(results: list[dict], opts: BenchOptions, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RwkvkitError('the plots need matplotlib: pip install matplotlib (or pass --no-plots)') from None
    from ..io_utils import atomic_path

    colors = {"rwkv": "tab:blue", "gpt2": "tab:red"}
    label = {r["kind"]: f"{r['name']} ({r['parameters'] / 1e6:.0f}M params)" for r in results}
    shape = f"{results[0]['layers']} layers, width {results[0]['width']}, vocab {results[0]['vocab']}, fp32, CPU x{results[0]['threads']} threads"
    paths = []

    def save(fig, name):
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    xs = list(range(1, opts.tokens + 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        cum, s = [], 0.0
        for t in r["times"]:
            s += t
            cum.append(s)
        ax.plot(xs, cum, color=colors[r["kind"]], label=label[r["kind"]])
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("cumulative time (s)")
    ax.set_title(f"Generation time\n{shape}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "bench_cumulative.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ms = [1e3 * t for t in r["times"]]
        ax.plot(xs, ms, color=colors[r["kind"]], alpha=0.15, linewidth=0.5)
        ax.plot(xs, _rolling_median(ms, opts.median_window), color=colors[r["kind"]], label=f"{label[r['kind']]}, median of {opts.median_window}")
    ax.set_xlabel("token position")
    ax.set_ylabel("time per token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Time per generated token\n{shape}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "bench_per_token.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in results:
        a1.plot(xs, [b / 2**20 for b in r["rss"]], color=colors[r["kind"]], label=label[r["kind"]])
        what = "state" if r["kind"] == "rwkv" else "KV cache"
        a2.plot(xs, [b / 2**20 for b in r["state_bytes"]], color=colors[r["kind"]], label=f"{r['name']} {what}")
    a1.set_xlabel("tokens generated")
    a1.set_ylabel("process resident memory (MiB)")
    a1.set_title("Process memory (each model in its own process)" if opts.isolate else "Process memory (both models in one process)", fontsize=10)
    a2.set_xlabel("tokens generated")
    a2.set_ylabel("MiB")
    a2.set_title("RWKV state vs Transformer KV cache", fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    save(fig, "bench_memory.png")

    if any(r["prompts"] for r in results):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for r in results:
            ns = [p["length"] for p in r["prompts"]]
            a1.plot(ns, [p["tokens_per_second"] for p in r["prompts"]], "o-", color=colors[r["kind"]], label=label[r["kind"]])
            a2.plot(ns, [p["peak_rss_increase"] / 2**20 for p in r["prompts"]], "o-", color=colors[r["kind"]], label=label[r["kind"]])
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("prompt length (tokens)")
            a.grid(alpha=0.3)
            a.legend()
        a1.set_ylabel("prompt tokens per second")
        a1.set_title("Prompt processing speed", fontsize=10)
        a2.set_ylabel("peak extra memory during the prompt (MiB)")
        a2.set_title("Prompt processing memory", fontsize=10)
        save(fig, "bench_prompt.png")
    return paths


# -------------------------------------------------------------------- run
def run(opts: BenchOptions) -> dict:
    """Measure, print the table, write bench.json and the plots; returns the report."""
    if opts.tokens < 1:
        raise RwkvkitError(f"--tokens must be at least 1, got {opts.tokens}")
    if opts.median_window < 1:
        raise RwkvkitError(f"--median-window must be at least 1, got {opts.median_window}")
    if any(n < 1 for n in opts.prompt_lengths):
        raise RwkvkitError(f"prompt lengths must be positive, got {opts.prompt_lengths}")
    if opts.threads is not None and opts.threads < 1:
        raise RwkvkitError(f"--threads must be at least 1, got {opts.threads}")
    if opts.model is not None and not Path(opts.model).exists():
        raise RwkvkitError(f"--model '{opts.model}' does not exist")
    if opts.model is None:
        L, C, V = resolve_shape(opts)
        if opts.transformer and C % 64:
            raise RwkvkitError(f"GPT-2 needs a width divisible by its 64-wide heads, got {C} (or pass --skip-transformer)")
    if opts.plots:
        try:
            import matplotlib  # noqa: F401  (fail before minutes of measuring)
        except ImportError:
            raise RwkvkitError("the plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    out = Path(opts.out)
    measure = _run_isolated if opts.isolate else _measure
    results = [measure("rwkv", opts)]
    if opts.transformer:
        results.append(measure("gpt2", opts))
    summary = summarize(results, opts)
    report = {"options": asdict(opts), "machine": machine(), "summary": summary, "results": results}
    from ..io_utils import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "bench.json") as tmp:
        tmp.write_text(json.dumps(report) + "\n")
    print(format_table(summary, results))
    print()
    for k, v in summary.items():
        if k != "rows":
            print(f"{k}: {v:.3f}")
    print(f"raw data: {out / 'bench.json'}")
    if opts.plots:
        for p in draw(results, opts, out):
            print(f"plot: {p}")
    return report
