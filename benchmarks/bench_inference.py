"""CPU inference speed: rwkvkit (fp32, int8) vs the `rwkv` package vs HF, and the machine's ceilings.

One run measures, side by side on the same random weights
(rwkvkit.init.random_state_dict) and the same tokens, for each model shape:

  decode        tokens/s of the RNN step (batch 1, one token per call, state carried)
  prompt-all    tokens/s of a T-token prompt in one call, logits at every position
  prompt-last   the same with the head only at the last position (what generation needs)

for rwkvkit fp32, rwkvkit int8 (rwkvkit.quant), the `rwkv` pip package
(strategy "cpu fp32"; JIT as chosen by --pip-jit) and HF transformers'
RwkvForCausalLM (rescale_every=0, logits_to_keep=1 for prompt-last), and the
two physical ceilings measured in the same process:

  memory bandwidth  GB/s of reading a 512 MiB tensor (best of torch sum and torch mv); decode ceiling = GB/s /
                    bytes of weights read per token (every matrix once, plus
                    one embedding row)
  matmul rate       GFLOP/s of a large fp32 torch.mm; prompt ceiling = rate /
                    FLOPs per token (2 per weight of the blocks, plus the head
                    for prompt-all)

Every figure is the median of --repeats timed runs after a warm-up, timed with
time.perf_counter.  It also prints the int8 model's logit error against fp32
on the prompt.

    .venv/bin/python benchmarks/bench_inference.py                  # both shapes, 2 threads
    .venv/bin/python benchmarks/bench_inference.py --shape 169m --threads 2 --tokens 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # The published RWKV-4 169M (Pile) shape.
    "169m": dict(n_layer=12, n_embd=768, vocab_size=50277),
    # A smaller one, same vocabulary.
    "small": dict(n_layer=6, n_embd=512, vocab_size=50277),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--shape", choices=["169m", "small", "both"], default="both", help="model shape (default both)")
    p.add_argument("--tokens", type=int, default=512, help="prompt length T (default 512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per timed decode run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is printed (default 5)")
    p.add_argument("--prompt-repeats", type=int, default=3, help="timed prompt runs per figure (default 3)")
    p.add_argument("--pip-jit", choices=["0", "1"], default="1", help="RWKV_JIT_ON for the rwkv package (default 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pip", "hf", "int8", "ceilings"], help="leave these out")
    p.add_argument("--huge-pages", action="store_true", help="rwkvkit's decoder asks for 2 MiB pages (Linux; runtime.accelerate(model, huge_pages=True))")
    return p.parse_args(argv)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------- ceilings
def measure_bandwidth(torch, repeats: int) -> float:
    """GB/s of reading a 512 MiB fp32 tensor (larger than any cache here): the
    faster of torch's sum and torch's matrix-vector product over it (the second
    is the decode operation itself; it streams ~30% faster than sum here)."""
    x = torch.ones(128 * 1024 * 1024)
    v = torch.ones(4096)
    m = x.view(-1, 4096)
    t = min(median_time(lambda: x.sum(), repeats, warmup=2), median_time(lambda: torch.mv(m, v), repeats, warmup=2))
    return x.numel() * 4 / t / 1e9


def measure_matmul(torch, repeats: int) -> float:
    """GFLOP/s of a 2048^3 fp32 matrix multiply."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * n**3 / t / 1e9


def weight_counts(cfg) -> tuple[int, int]:
    """(weights of the blocks' matrices, weights of the head)."""
    C, A, F, V, L = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    return L * (4 * C * A + 2 * C * F + C * C), V * C


def decode_bytes(cfg, int8: bool) -> int:
    """Bytes read from memory per decoded token: every matrix once, one embedding row,
    the per-channel vectors and the state (read and written)."""
    blocks, head = weight_counts(cfg)
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    rows = L * (3 * A + C + cfg.dim_ffn + 2 * C) + cfg.vocab_size  # one scale per output row
    matrices = (blocks + head) * (1 if int8 else 4) + (rows * 4 if int8 else 0)
    vectors = (L * (4 * C + 2 * A + 5 * C) + 2 * C) * 4
    state = 2 * cfg.state_bytes_per_sequence
    return matrices + C * 4 + vectors + state


# ------------------------------------------------------------ implementations
class RwkvkitRunner:
    def __init__(self, torch, model):
        self.torch, self.model = torch, model

    def decode(self, tokens):
        state = None
        for t in tokens:
            _, state = self.model(self.torch.tensor([[t]]), state)

    def prompt(self, tokens, last: bool):
        logits, _ = self.model(self.torch.tensor([tokens]), logits="last" if last else "all")
        return logits[0]


class PipRunner:
    def __init__(self, torch, sd, tmp: Path):
        from rwkv.model import RWKV as PipRWKV

        path = tmp / "pip.pth"
        torch.save(sd, path)
        self.model = PipRWKV(model=str(path), strategy="cpu fp32", verbose=False)
        path.unlink()

    def decode(self, tokens):
        state = None
        for t in tokens:
            _, state = self.model.forward([t], state)

    def prompt(self, tokens, last: bool):
        out, _ = self.model.forward(list(tokens), None, full_output=not last)
        return out


class HFRunner:
    def __init__(self, torch, sd, cfg):
        from transformers import RwkvConfig, RwkvForCausalLM

        from rwkvkit.checkpoint import official_to_hf

        hcfg = RwkvConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            attention_hidden_size=cfg.dim_att,
            intermediate_size=cfg.dim_ffn,
            rescale_every=0,
            context_length=4096,
        )
        with torch.device("meta"):
            model = RwkvForCausalLM(hcfg)
        model.load_state_dict({official_to_hf(k): v for k, v in sd.items()}, strict=True, assign=True)
        self.model = model.eval()
        self.torch = torch

    def decode(self, tokens):
        state = None
        for t in tokens:
            out = self.model(self.torch.tensor([[t]]), state=state, use_cache=True)
            state = out.state

    def prompt(self, tokens, last: bool):
        out = self.model(self.torch.tensor([tokens]), use_cache=True, logits_to_keep=1 if last else 0)
        return out.logits[0]


# ----------------------------------------------------------------- measuring
def bench_shape(torch, name: str, args, tmp: Path, ceilings: dict | None) -> None:
    from rwkvkit import ops, runtime
    from rwkvkit.init import random_state_dict
    from rwkvkit.models.rwkv4 import RWKV, RWKV4Config
    from rwkvkit.runtime import infer_cpu

    cfg = RWKV4Config(**SHAPES[name])
    sd = random_state_dict(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=g).tolist()
    steps = torch.randint(0, cfg.vocab_size, (args.decode_tokens,), generator=g).tolist()

    runners: dict[str, object] = {}
    fp32 = RWKV(cfg)
    fp32.load_state_dict(sd)
    runners["rwkvkit fp32"] = RwkvkitRunner(torch, runtime.accelerate(fp32.eval(), huge_pages=args.huge_pages))
    if "int8" not in args.skip:
        int8 = RWKV(cfg)
        int8.load_state_dict(sd)
        runners["rwkvkit int8"] = RwkvkitRunner(torch, runtime.accelerate(runtime.quantize_int8(int8.eval()), huge_pages=args.huge_pages))
    if "pip" not in args.skip:
        runners["rwkv pkg"] = PipRunner(torch, sd, tmp)
    if "hf" not in args.skip:
        runners["HF"] = HFRunner(torch, sd, cfg)

    blocks, head = weight_counts(cfg)
    print(f"\n== shape {name}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
          f"{cfg.num_params / 1e6:.1f}M parameters; prompt T={args.tokens}, decode {args.decode_tokens} tokens/run")
    print(f"   WKV backend for prompts: {ops.resolve_backend('auto', torch.device('cpu'))}; "
          f"fused decoder: {'yes' if infer_cpu.load_extension() is not None else 'NO (plain PyTorch step)'}")

    rows: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for label, r in runners.items():
            res = {}
            n = args.decode_tokens
            r.decode(steps[:4])  # warm-up (JIT profiling, plan building, extension builds)
            t = median_time(lambda: r.decode(steps), args.repeats, warmup=0)
            res["decode"] = n / t
            for mode, last in (("prompt-all", False), ("prompt-last", True)):
                box = {}

                def run():
                    box["out"] = r.prompt(prompt, last)

                t = median_time(run, args.prompt_repeats, warmup=1)
                res[mode] = args.tokens / t
                if not last:
                    outputs[label] = box["out"].float().reshape(args.tokens, -1)
            rows[label] = res
            print(f"   {label:<14} decode {res['decode']:8.1f}   prompt-all {res['prompt-all']:8.1f}   "
                  f"prompt-last {res['prompt-last']:8.1f} tok/s", flush=True)

    if ceilings is not None:
        bw, rate = ceilings["bandwidth"], ceilings["matmul"]
        rows["ceiling fp32"] = {
            "decode": bw * 1e9 / decode_bytes(cfg, int8=False),
            "prompt-all": rate * 1e9 / (2 * (blocks + head)),
            "prompt-last": rate * 1e9 / (2 * blocks),
        }
        rows["ceiling int8"] = {"decode": bw * 1e9 / decode_bytes(cfg, int8=True)}

    cols = ("decode", "prompt-all", "prompt-last")
    print(f"\n   {'tokens/s':<16}" + "".join(f"{c:>14}" for c in cols))
    for label, res in rows.items():
        print(f"   {label:<16}" + "".join(f"{res[c]:14.1f}" if c in res else f"{'':>14}" for c in cols))

    print(f"\n   {'ratio':<28}" + "".join(f"{c:>14}" for c in cols))
    ours = rows["rwkvkit fp32"]
    pairs = [("rwkvkit fp32 / rwkv pkg", "rwkvkit fp32", "rwkv pkg"), ("rwkvkit fp32 / HF", "rwkvkit fp32", "HF"),
             ("rwkvkit fp32 / ceiling", "rwkvkit fp32", "ceiling fp32"),
             ("rwkvkit int8 / rwkv pkg", "rwkvkit int8", "rwkv pkg"),
             ("rwkvkit int8 / int8 ceiling", "rwkvkit int8", "ceiling int8"),
             ("rwkvkit int8 / rwkvkit fp32", "rwkvkit int8", "rwkvkit fp32")]
    del ours
    for text, a, b in pairs:
        if a in rows and b in rows:
            ra, rb = rows[a], rows[b]
            print(f"   {text:<28}" + "".join(f"{ra[c] / rb[c]:14.2f}" if c in ra and c in rb else f"{'':>14}" for c in cols))

    if "rwkvkit int8" in outputs:
        ref, got = outputs["rwkvkit fp32"], outputs["rwkvkit int8"]
        d = (ref - got).abs()
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        print(f"\n   int8 vs fp32 logits over the {args.tokens}-token prompt: max |diff| {d.max().item():.4f}, "
              f"mean |diff| {d.mean().item():.5f} (logit std {ref.std().item():.3f}), top-1 agreement {100 * top1:.1f}%")
    for other in ("rwkv pkg", "HF"):
        if other in outputs:
            diff = (outputs["rwkvkit fp32"] - outputs[other]).abs().max().item()
            print(f"   rwkvkit fp32 vs {other} logits: max |diff| {diff:.2e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    # The rwkv package reads these when it is imported.
    os.environ["RWKV_JIT_ON"] = args.pip_jit
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch

    torch.set_num_threads(args.threads)
    versions = [f"torch {torch.__version__}"]
    for mod in ("rwkv", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod)}")
        except Exception:
            pass
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores visible, {args.threads} threads; {', '.join(versions)}; "
          f"rwkv package RWKV_JIT_ON={args.pip_jit}; rwkvkit huge pages {'on' if args.huge_pages else 'off'}")
    print(f"load average at start: {load_avg()}")
    ceilings = None
    if "ceilings" not in args.skip:
        bw = measure_bandwidth(torch, args.repeats)
        mm = measure_matmul(torch, args.repeats)
        ceilings = {"bandwidth": bw, "matmul": mm}
        print(f"memory bandwidth {bw:.1f} GB/s (best of sum and mv over a 512 MiB tensor); fp32 matmul {mm:.1f} GFLOP/s (2048^3 torch.mm)")
    shapes = ["169m", "small"] if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            bench_shape(torch, name, args, Path(tmp), ceilings)
    if ceilings is not None:
        bw2, mm2 = measure_bandwidth(torch, args.repeats), measure_matmul(torch, args.repeats)
        print(f"\nceilings re-measured at the end: {bw2:.1f} GB/s, {mm2:.1f} GFLOP/s (a large change means a noisy machine)")
    print(f"load average at end: {load_avg()}")


if __name__ == "__main__":
    sys.exit(main())
