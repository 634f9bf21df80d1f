"""CPU inference speed: rwkvkit (fp32, bf16, fp16, int8) vs the `rwkv` package vs HF, and the machine's ceilings.

One run measures, side by side on the same random weights
(rwkvkit.init.random_state_dict) and the same tokens, for each model shape:

  decode        tokens/s of the RNN step (batch 1, one token per call, state carried)
  prompt-all    tokens/s of a T-token prompt in one call, logits at every position
  prompt-last   the same with the head only at the last position (what generation needs)

for rwkvkit fp32, rwkvkit bf16 and fp16 (the same weights rounded, as
rwkvkit.load keeps an official bf16 file: the fused decoder reads 2 bytes per
weight, prompts run PyTorch's parallel form in that dtype), rwkvkit int8
(rwkvkit.quant), the `rwkv` pip package
(strategy "cpu fp32"; JIT as chosen by --pip-jit) and HF transformers'
RwkvForCausalLM (rescale_every=0, logits_to_keep=1 for prompt-last), and the
two physical ceilings measured in the same process:

  memory bandwidth  GB/s of reading a 512 MiB tensor (best of torch sum and torch mv); decode ceiling = GB/s /
                    bytes of weights read per token (every matrix once, plus
                    one embedding row): rows "ceiling fp32", "ceiling 2-byte"
                    (bf16/fp16 matrices, LoRAs included) and "ceiling int8"
  matmul rate       GFLOP/s of a large fp32 torch.mm; prompt ceiling = rate /
                    FLOPs per token (2 per weight of the blocks, plus the head
                    for prompt-all)

Every figure is the median of --repeats timed runs after a warm-up, timed with
time.perf_counter.  It also prints the int8, bf16 and fp16 models' logit
errors against fp32 on the prompt (the parallel form; the fused decoder's
half-precision accuracy is stated in tests/test_half_decode.py).

    .venv/bin/python benchmarks/bench_inference.py                  # both shapes, 2 threads
    .venv/bin/python benchmarks/bench_inference.py --shape 169m --threads 2 --tokens 512
    .venv/bin/python benchmarks/bench_inference.py --generation 7 --shape 0.1b --threads 2

With --generation 7 the shapes are RWKV-7's ("0.1b": 12 x 768, "0.4b": 24 x
1024, vocabulary 65536, LoRA ranks 64/64/32/128 for w/a/v/g), the `rwkv`
package runs its RWKV_x070 (RWKV_V7_ON=1 must be set before it is imported,
and switches the whole process, so it runs in a child process of this script
with the same weights, tokens, threads and timing), and there is no HF row.
--generation 6 and 5 (5.2: per-channel decay, gate) take the same two
layouts (head size 64; RWKV-6 with the x060 trainer's LoRA ranks 32 for the
token shift and 64 for the decay) and the same structure: the `rwkv` package
("cpu fp32") in its own process, no HF row.

    .venv/bin/python benchmarks/bench_inference.py --generation 6 --shape 0.4b --threads 2
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
# RWKV-7 (World vocabulary; LoRA ranks of the released 0.1B/0.4B files).
_LORA7 = dict(d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
SHAPES7 = {
    "0.1b": dict(n_layer=12, n_embd=768, vocab_size=65536, **_LORA7),
    "0.4b": dict(n_layer=24, n_embd=1024, vocab_size=65536, **_LORA7),
}
# RWKV-5.2 and RWKV-6 in the same two layouts (World vocabulary, head size 64;
# RWKV-6 with the x060 trainer's LoRA ranks: 32 for the token shift, 64 for the decay).
SHAPES5 = {name: dict(n_layer=s["n_layer"], n_embd=s["n_embd"], vocab_size=65536) for name, s in SHAPES7.items()}
SHAPES6 = {name: dict(s, d_mix=32, d_decay=64) for name, s in SHAPES5.items()}
SHAPES_BY_GEN = {"4": SHAPES, "5": SHAPES5, "6": SHAPES6, "7": SHAPES7}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--generation", choices=["4", "5", "6", "7"], default="4",
                   help="RWKV generation (default 4; 5 means 5.2)")
    p.add_argument("--shape", choices=["169m", "small", "0.1b", "0.4b", "both"], default="both",
                   help="model shape: 169m/small (generation 4), 0.1b/0.4b (generations 5, 6, 7); default both of the generation's")
    p.add_argument("--tokens", type=int, default=512, help="prompt length T (default 512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per timed decode run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is printed (default 5)")
    p.add_argument("--prompt-repeats", type=int, default=3, help="timed prompt runs per figure (default 3)")
    p.add_argument("--pip-jit", choices=["0", "1"], default="1", help="RWKV_JIT_ON for the rwkv package (default 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pip", "hf", "int8", "half", "ceilings"], help="leave these out")
    p.add_argument("--huge-pages", action="store_true", help="rwkvkit's decoder asks for 2 MiB pages (Linux; runtime.accelerate(model, huge_pages=True))")
    p.add_argument("--pip-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pip_worker is None:
        shapes = SHAPES_BY_GEN[args.generation]
        if args.shape != "both" and args.shape not in shapes:
            p.error(f"--shape {args.shape} is not a generation-{args.generation} shape (choose from {', '.join(shapes)})")
    return args


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


def weight_counts7(cfg) -> tuple[int, int, int]:
    """RWKV-7: (weights of the blocks' projection matrices, of the LoRAs a decode step reads, of the head).
    Layer 0 reads no value-residual LoRA."""
    C, F, V, L = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    lora = L * C * 2 * (cfg.d_decay + cfg.d_aaa + cfg.d_mv + cfg.d_gate) - 2 * C * cfg.d_mv
    return L * (4 * C * C + 2 * C * F), lora, V * C


def decode_bytes7(cfg, int8: bool, wbytes: int | None = None) -> int:
    """RWKV-7 bytes per decoded token: the matrices (projections and head int8
    with one fp32 scale per row under int8, or ``wbytes`` bytes per weight; the
    LoRAs are 2 bytes a weight in a half model, else fp32: int8 quantises only
    the projections), one embedding row, the per-channel vectors and the state
    (read and written)."""
    blocks, lora, head = weight_counts7(cfg)
    C, L = cfg.n_embd, cfg.n_layer
    rows = L * (5 * C + cfg.dim_ffn) + cfg.vocab_size
    wb = wbytes or (1 if int8 else 4)
    matrices = (blocks + head) * wb + (rows * 4 if int8 else 0) + lora * (2 if wbytes == 2 else 4)
    vectors = (L * 19 * C + 2 * C) * 4
    return matrices + C * 4 + vectors + 2 * cfg.state_bytes_per_sequence


def weight_counts56(cfg) -> tuple[int, int, int]:
    """RWKV-5.x / 6: (weights of the blocks' projection matrices, of the LoRAs (RWKV-6), of the head)."""
    C, A, F, V, L = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    n_proj = 4 if cfg.generation == "6" or cfg.gate else 3  # r, k, v (, gate)
    lora = L * (2 * C * 5 * cfg.d_mix + C * cfg.d_decay + cfg.d_decay * A) if cfg.generation == "6" else 0
    return L * ((n_proj + 1) * C * A + 2 * C * F + C * C), lora, V * C


def decode_bytes56(cfg, int8: bool, wbytes: int | None = None) -> int:
    """RWKV-5.x / 6 bytes per decoded token, as decode_bytes7 counts them:
    matrices (RWKV-6's LoRAs 2 bytes a weight in a half model, else fp32),
    int8 row scales, one embedding row, the per-channel vectors and the state
    (read and written)."""
    blocks, lora, head = weight_counts56(cfg)
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    n_proj = 4 if cfg.generation == "6" or cfg.gate else 3
    rows = L * (n_proj * A + C + cfg.dim_ffn + 2 * C) + cfg.vocab_size
    wb = wbytes or (1 if int8 else 4)
    matrices = (blocks + head) * wb + (rows * 4 if int8 else 0) + lora * (2 if wbytes == 2 else 4)
    vectors = (L * (12 * C + 4 * A) + 2 * C) * 4
    return matrices + C * 4 + vectors + 2 * cfg.state_bytes_per_sequence


def decode_bytes(cfg, int8: bool, wbytes: int | None = None) -> int:
    """Bytes read from memory per decoded token: every matrix once (``wbytes``
    bytes per weight if given), one embedding row, the per-channel vectors and
    the state (read and written)."""
    blocks, head = weight_counts(cfg)
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    rows = L * (3 * A + C + cfg.dim_ffn + 2 * C) + cfg.vocab_size  # one scale per output row
    matrices = (blocks + head) * (wbytes or (1 if int8 else 4)) + (rows * 4 if int8 else 0)
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


class PipChildRunner:
    """The `rwkv` package ("cpu fp32") in a child process (see pip_worker):
    constructed with the checkpoint, run() times everything at once.  RWKV-7
    needs RWKV_V7_ON=1 before the package is imported, which switches the
    whole process; RWKV-5/6 run there too, so every generation's package row
    is timed the same way."""

    def __init__(self, torch, sd, tmp: Path, generation: str):
        self.torch, self.tmp, self.generation = torch, tmp, generation
        self.path = tmp / "pip.pth"
        torch.save(sd, self.path)

    def run(self, args, prompt, steps) -> tuple[dict, object]:
        import subprocess

        job, out = self.tmp / "pip-job.pt", self.tmp / "pip-out.pt"
        self.torch.save({"path": str(self.path), "threads": args.threads, "prompt": prompt, "steps": steps,
                         "repeats": args.repeats, "prompt_repeats": args.prompt_repeats}, job)
        env = dict(os.environ, RWKV_JIT_ON=args.pip_jit, RWKV_CUDA_ON="0")
        env.pop("RWKV_V7_ON", None)
        if self.generation == "7":
            env["RWKV_V7_ON"] = "1"
        proc = subprocess.run([sys.executable, __file__, "--pip-worker", str(job), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the rwkv package's RWKV-{self.generation} run failed:\n{proc.stderr[-3000:]}")
        res = self.torch.load(out)
        self.path.unlink()
        return res["rates"], res["logits"]


def pip_worker(job_path: str, out_path: str) -> None:
    """Child process: the environment (RWKV_V7_ON for RWKV-7) is set before rwkv.model is imported."""
    import torch

    job = torch.load(job_path)
    torch.set_num_threads(job["threads"])
    from rwkv.model import RWKV as PipRWKV

    # RWKV_x070 takes no `verbose`; the RWKV-4/5/6 class prints its load unless told not to.
    quiet = {} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}
    model = PipRWKV(model=job["path"].removesuffix(".pth"), strategy="cpu fp32", **quiet)
    prompt, steps = job["prompt"], job["steps"]

    def decode(tokens):
        state = None
        for t in tokens:
            _, state = model.forward([t], state)

    rates, box = {}, {}
    with torch.no_grad():
        decode(steps[:4])  # warm-up (JIT profiling)
        rates["decode"] = len(steps) / median_time(lambda: decode(steps), job["repeats"], warmup=0)
        for mode, last in (("prompt-all", False), ("prompt-last", True)):
            def run():
                box[mode] = model.forward(list(prompt), None, full_output=not last)[0]

            rates[mode] = len(prompt) / median_time(run, job["prompt_repeats"], warmup=1)
    torch.save({"rates": rates, "logits": box["prompt-all"].float().reshape(len(prompt), -1)}, out_path)


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


def add_half_runners(torch, runners, cls, cfg, sd, args) -> None:
    """rwkvkit bf16 and fp16: the same weights rounded, as rwkvkit.load keeps a half file."""
    from rwkvkit import runtime

    if "half" in args.skip:
        return
    for label, dtype in (("rwkvkit bf16", torch.bfloat16), ("rwkvkit fp16", torch.float16)):
        m = cls(cfg)
        m.load_state_dict(sd)
        m = runtime.accelerate(m.to(dtype).eval(), huge_pages=args.huge_pages)
        print(f"   {label}: decode {m.decode_kernel}; prompts {m.prompt_matmul}")
        runners[label] = RwkvkitRunner(torch, m)


HALF_PAIRS = [("rwkvkit bf16 / rwkvkit fp32", "rwkvkit bf16", "rwkvkit fp32"),
              ("rwkvkit fp16 / rwkvkit fp32", "rwkvkit fp16", "rwkvkit fp32"),
              ("rwkvkit bf16 / 2-byte ceiling", "rwkvkit bf16", "ceiling 2-byte"),
              ("rwkvkit fp16 / 2-byte ceiling", "rwkvkit fp16", "ceiling 2-byte")]


def print_logit_errors(outputs, tokens: int) -> None:
    for label in ("rwkvkit int8", "rwkvkit bf16", "rwkvkit fp16"):
        if label not in outputs:
            continue
        ref, got = outputs["rwkvkit fp32"], outputs[label]
        d = (ref - got).abs()
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        print(f"   {label.split()[1]} vs fp32 logits over the {tokens}-token prompt: max |diff| {d.max().item():.4f}, "
              f"mean |diff| {d.mean().item():.5f} (logit std {ref.std().item():.3f}), top-1 agreement {100 * top1:.1f}%")


# ----------------------------------------------------------------- measuring
def matrix_generation(gen: str):
    """(model class, config, weight counts (blocks, LoRAs, head), bytes per decoded token, title, WKV backend)
    of the generations with a matrix state."""
    if gen == "7":
        from rwkvkit.models.rwkv7 import RWKV7, RWKV7Config
        from rwkvkit.ops.wkv7 import resolve_backend

        cfg = RWKV7Config
        title = lambda c: f"LoRA ranks w/a/v/g {c.d_decay}/{c.d_aaa}/{c.d_mv}/{c.d_gate}"  # noqa: E731
        return RWKV7, cfg, weight_counts7, decode_bytes7, title, ("WKV-7", resolve_backend("auto"))
    from rwkvkit.ops.wkv6 import resolve_backend

    if gen == "6":
        from rwkvkit.models.rwkv6 import RWKV6 as cls, RWKV6Config as cfg

        title = lambda c: f"LoRA ranks token-shift/decay {c.d_mix}/{c.d_decay}"  # noqa: E731
    else:
        from rwkvkit.models.rwkv5 import RWKV5 as cls, RWKV5Config as cfg

        title = lambda c: "RWKV-5.2 (per-channel decay, gate)"  # noqa: E731
    return cls, cfg, weight_counts56, decode_bytes56, title, ("WKV-6", resolve_backend("auto"))


def bench_shape_matrix(torch, name: str, args, tmp: Path, ceilings: dict | None) -> None:
    """RWKV-5.2, -6 or -7 (args.generation): rwkvkit's rows, the `rwkv` package in its own process, ceilings."""
    from rwkvkit import runtime
    from rwkvkit.init import random_state_dict
    from rwkvkit.runtime import infer_cpu

    gen = args.generation
    cls, config_cls, counts, decode_bytes_of, title, (wkv, backend) = matrix_generation(gen)
    cfg = config_cls(**SHAPES_BY_GEN[gen][name])
    sd = random_state_dict(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=g).tolist()
    steps = torch.randint(0, cfg.vocab_size, (args.decode_tokens,), generator=g).tolist()

    runners: dict[str, object] = {}
    fp32 = cls(cfg)
    fp32.load_state_dict(sd)
    runners["rwkvkit fp32"] = RwkvkitRunner(torch, runtime.accelerate(fp32.eval(), huge_pages=args.huge_pages))
    print(f"   rwkvkit fp32: decode {fp32.decode_kernel}")
    add_half_runners(torch, runners, cls, cfg, sd, args)
    if "int8" not in args.skip:
        int8 = cls(cfg)
        int8.load_state_dict(sd)
        runners["rwkvkit int8"] = RwkvkitRunner(torch, runtime.accelerate(runtime.quantize_int8(int8.eval()), huge_pages=args.huge_pages))
    pip = PipChildRunner(torch, sd, tmp, gen) if "pip" not in args.skip else None
    del sd

    blocks, lora, head = counts(cfg)
    print(f"\n== RWKV-{cfg.generation} shape {name}: {cfg.n_layer} layers, {cfg.n_embd} wide, head size {cfg.head_size}, "
          f"vocab {cfg.vocab_size}, {title(cfg)}, {cfg.num_params / 1e6:.1f}M parameters; "
          f"prompt T={args.tokens}, decode {args.decode_tokens} tokens/run")
    print(f"   weights read per decoded token: fp32 {decode_bytes_of(cfg, False) / 1e6:.0f} MB, int8 {decode_bytes_of(cfg, True) / 1e6:.0f} MB; "
          f"{wkv} backend for prompts: {backend}; "
          f"fused decoder: {'yes' if infer_cpu.load_extension() is not None else 'NO (plain PyTorch step)'}")

    rows: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for label, r in runners.items():
            res = {}
            r.decode(steps[:4])  # warm-up (plan building, extension build)
            res["decode"] = args.decode_tokens / median_time(lambda: r.decode(steps), args.repeats, warmup=0)
            for mode, last in (("prompt-all", False), ("prompt-last", True)):
                box = {}

                def run():
                    box["out"] = r.prompt(prompt, last)

                res[mode] = args.tokens / median_time(run, args.prompt_repeats, warmup=1)
                if not last:
                    outputs[label] = box["out"].float().reshape(args.tokens, -1)
            rows[label] = res
            print(f"   {label:<14} decode {res['decode']:8.1f}   prompt-all {res['prompt-all']:8.1f}   "
                  f"prompt-last {res['prompt-last']:8.1f} tok/s", flush=True)
    if pip is not None:
        rows["rwkv pkg"], outputs["rwkv pkg"] = pip.run(args, prompt, steps)
        res = rows["rwkv pkg"]
        print(f"   {'rwkv pkg':<14} decode {res['decode']:8.1f}   prompt-all {res['prompt-all']:8.1f}   "
              f"prompt-last {res['prompt-last']:8.1f} tok/s   (cpu fp32, own process)", flush=True)

    if ceilings is not None:
        # Re-measured right after this shape's runs: the machine's bandwidth moves.
        bw = max(ceilings["bandwidth"], measure_bandwidth(torch, args.repeats))
        rate = ceilings["matmul"]
        print(f"   bandwidth for this shape's ceilings: {bw:.1f} GB/s (best of the start and a re-measure now)")
        rows["ceiling fp32"] = {
            "decode": bw * 1e9 / decode_bytes_of(cfg, int8=False),
            "prompt-all": rate * 1e9 / (2 * (blocks + lora + head)),
            "prompt-last": rate * 1e9 / (2 * (blocks + lora)),
        }
        rows["ceiling 2-byte"] = {"decode": bw * 1e9 / decode_bytes_of(cfg, int8=False, wbytes=2)}
        rows["ceiling int8"] = {"decode": bw * 1e9 / decode_bytes_of(cfg, int8=True)}
    print_tables(torch, rows, outputs, args)


def print_tables(torch, rows, outputs, args) -> None:
    cols = ("decode", "prompt-all", "prompt-last")
    print(f"\n   {'tokens/s':<16}" + "".join(f"{c:>14}" for c in cols))
    for label, res in rows.items():
        print(f"   {label:<16}" + "".join(f"{res[c]:14.1f}" if c in res else f"{'':>14}" for c in cols))
    print(f"\n   {'ratio':<28}" + "".join(f"{c:>14}" for c in cols))
    pairs = [("rwkvkit fp32 / rwkv pkg", "rwkvkit fp32", "rwkv pkg"), ("rwkvkit fp32 / HF", "rwkvkit fp32", "HF"),
             ("rwkvkit fp32 / ceiling", "rwkvkit fp32", "ceiling fp32"),
             ("rwkvkit int8 / rwkv pkg", "rwkvkit int8", "rwkv pkg"),
             ("rwkvkit int8 / int8 ceiling", "rwkvkit int8", "ceiling int8"),
             ("rwkvkit int8 / rwkvkit fp32", "rwkvkit int8", "rwkvkit fp32"), *HALF_PAIRS]
    for text, a, b in pairs:
        if a in rows and b in rows:
            ra, rb = rows[a], rows[b]
            print(f"   {text:<28}" + "".join(f"{ra[c] / rb[c]:14.2f}" if c in ra and c in rb else f"{'':>14}" for c in cols))
    print()
    print_logit_errors(outputs, args.tokens)
    for other in ("rwkv pkg", "HF"):
        if other in outputs:
            diff = (outputs["rwkvkit fp32"] - outputs[other]).abs().max().item()
            print(f"   rwkvkit fp32 vs {other} logits: max |diff| {diff:.2e}")


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
    add_half_runners(torch, runners, RWKV, cfg, sd, args)
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
        rows["ceiling 2-byte"] = {"decode": bw * 1e9 / decode_bytes(cfg, int8=False, wbytes=2)}
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
             ("rwkvkit int8 / rwkvkit fp32", "rwkvkit int8", "rwkvkit fp32"), *HALF_PAIRS]
    del ours
    for text, a, b in pairs:
        if a in rows and b in rows:
            ra, rb = rows[a], rows[b]
            print(f"   {text:<28}" + "".join(f"{ra[c] / rb[c]:14.2f}" if c in ra and c in rb else f"{'':>14}" for c in cols))

    print()
    print_logit_errors(outputs, args.tokens)
    for other in ("rwkv pkg", "HF"):
        if other in outputs:
            diff = (outputs["rwkvkit fp32"] - outputs[other]).abs().max().item()
            print(f"   rwkvkit fp32 vs {other} logits: max |diff| {diff:.2e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.pip_worker is not None:
        return pip_worker(*args.pip_worker)
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
    table = SHAPES_BY_GEN[args.generation]
    shapes = list(table) if args.shape == "both" else [args.shape]
    bench = bench_shape if args.generation == "4" else bench_shape_matrix
    if args.generation != "4":
        args.skip = [*args.skip, "hf"]  # transformers' RWKV is RWKV-4 only
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            bench(torch, name, args, Path(tmp), ceilings)
    if ceilings is not None:
        bw2, mm2 = measure_bandwidth(torch, args.repeats), measure_matmul(torch, args.repeats)
        print(f"\nceilings re-measured at the end: {bw2:.1f} GB/s, {mm2:.1f} GFLOP/s (a large change means a noisy machine)")
    print(f"load average at end: {load_avg()}")


if __name__ == "__main__":
    sys.exit(main())
