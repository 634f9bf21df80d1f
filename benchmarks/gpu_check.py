"""GPU benchmark of rwkvkit: the CUDA WKV kernel, training and decoding.

Run on a machine with an NVIDIA GPU (``benchmarks/gpu_check.sh`` runs the
``cuda`` tests first, then this):

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu_results.txt

Sections, each independent (a failing one prints its error and the rest run):

1. environment and the kernel's build time;
2. WKV forward+backward, CUDA kernel vs the chunked PyTorch backend on the same
   GPU, B=8, C=2048, T in (1024, 8192);
3. training tokens/s of the 169M shape (12 layers, 768 wide, vocab 50277,
   random weights), fwd+bwd+AdamW under bf16 autocast, per WKV backend;
4. RNN decode tokens/s of the same shape in bf16: the eager step and the
   CUDA-graph step (rwkvkit.runtime.cuda_graph), each with the fused WKV step kernel
   and with the element-wise PyTorch step, batch 1 and 32;
5. ``rwkvkit.load(path, device="cuda", dtype=torch.bfloat16)`` of a saved
   checkpoint, logits against the fp32 CPU model.

Everything is measured side by side in one run; ratios are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

OUT_FILE: str | None = None


def say(msg: str = "") -> None:
    """Print, and append to --out at once (a run killed by a timeout keeps what it printed)."""
    print(msg, flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as f:
            f.write(msg + "\n")


def cuda_time(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return times[len(times) // 2]


def section(name):
    def wrap(fn):
        def run(*a, **k):
            say(f"\n== {name} ==")
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception:
                say(f"FAILED: {name}")
                for line in traceback.format_exc().rstrip().splitlines():
                    say("  " + line)
            finally:
                torch.cuda.empty_cache()
                say(f"({name}: {time.perf_counter() - t0:.1f} s wall)")

        return run

    return wrap


@section("environment")
def env():
    from rwkvkit.ops import cuda as wkv_cuda

    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    p = torch.cuda.get_device_properties(0)
    say(f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    say(f"nvcc: {wkv_cuda.find_nvcc()}")
    t0 = time.perf_counter()
    fn = wkv_cuda.get_implementation()
    say(f"CUDA WKV kernel available: {fn is not None}; first get_implementation() (build or cache load) {time.perf_counter() - t0:.2f} s")


def _wkv_inputs(B, T, C, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = -torch.exp(torch.randn(C, device="cuda", generator=g) - 1)
    u = torch.randn(C, device="cuda", generator=g) * 0.5
    k = (torch.randn(B, T, C, device="cuda", generator=g) * 2).to(dtype)
    v = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
    return w, u, k, v


@section("WKV forward+backward: CUDA kernel vs chunked PyTorch (same GPU)")
def wkv_bench(Ts=(1024, 8192)):
    from rwkvkit.ops.chunked import wkv_chunked
    from rwkvkit.ops.cuda import wkv_cuda

    B, C = 8, 2048
    say(f"B={B}, C={C}; times are medians of 3 after 1 warm-up; fwd+bwd = forward then backward of sum(y * g)")
    for T in Ts:
        results = {}
        for name, fn, dtype in (
            ("cuda fp32", wkv_cuda, torch.float32),
            ("cuda bf16", wkv_cuda, torch.bfloat16),
            ("torch (chunked) fp32", wkv_chunked, torch.float32),
        ):
            try:
                w, u, k, v = _wkv_inputs(B, T, C, dtype)
                gy = torch.randn(B, T, C, device="cuda")
                leaves = [x.requires_grad_(True) for x in (w, u, k, v)]

                def fwd():
                    with torch.no_grad():
                        fn(*leaves, None)

                def fwd_bwd():
                    y, _ = fn(*leaves, None)
                    torch.autograd.backward(y, gy)

                tf = cuda_time(fwd)
                torch.cuda.reset_peak_memory_stats()
                tfb = cuda_time(fwd_bwd)
                peak = torch.cuda.max_memory_allocated() / 2**30
                results[name] = tfb
                say(f"T={T:5d} {name:22s} fwd {tf * 1e3:9.2f} ms   fwd+bwd {tfb * 1e3:9.2f} ms   peak {peak:6.2f} GiB")
            except Exception as e:  # e.g. out of memory for the chunked path
                say(f"T={T:5d} {name:22s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            torch.cuda.empty_cache()
        base = results.get("torch (chunked) fp32")
        for name in ("cuda fp32", "cuda bf16"):
            if base and name in results:
                say(f"T={T:5d} speed-up fwd+bwd {name} vs torch (chunked) fp32: {base / results[name]:.1f}x")


def _model_169m(dtype=torch.float32):
    from rwkvkit.models.rwkv4 import RWKV4Config
    from rwkvkit.init import random_state_dict
    from rwkvkit.model import RWKV

    cfg = RWKV4Config(n_layer=12, n_embd=768, vocab_size=50277)
    model = RWKV(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=0))
    return model.to(device="cuda", dtype=dtype), cfg


@section("training tokens/s, 169M shape, bf16 autocast, fwd+bwd+AdamW")
def train_bench(B=8, T=1024, steps=6):
    res = {}
    for backend in ("cuda", "torch"):
        try:
            model, cfg = _model_169m(torch.float32)
            model.train()
            model.wkv_backend = backend
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits, _ = model(tokens[:, :-1])
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            torch.cuda.reset_peak_memory_stats()
            t = cuda_time(step, warmup=2, reps=steps)
            peak = torch.cuda.max_memory_allocated() / 2**30
            res[backend] = B * T / t
            say(f"wkv backend {backend:6s}: {t * 1e3:8.1f} ms/step, {B * T / t:10.0f} tokens/s (B={B}, T={T}), peak {peak:.1f} GiB")
        except Exception as e:
            say(f"wkv backend {backend}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        torch.cuda.empty_cache()
    if len(res) == 2:
        say(f"training speed-up, cuda kernel vs torch backend: {res['cuda'] / res['torch']:.2f}x")


@section("RNN decode tokens/s, 169M shape, bf16")
def decode_bench(n_tokens=200):
    """Greedy decoding, one token per step, after a 16-token prompt.

    Variants: eager model call per token, and the CUDA-graph step; each with the
    WKV step as one fused kernel (the default on a GPU) and as element-wise
    PyTorch ops (ops.wkv_step_torch), to show what each fusion buys.
    """
    import rwkvkit.ops as ops
    from rwkvkit.runtime.cuda_graph import CudaGraphDecoder

    fused_step = ops.wkv_step
    model, cfg = _model_169m(torch.bfloat16)
    model.eval()
    say(f"{n_tokens} greedy steps after a 16-token prompt; median of 3 runs")
    for B in (1, 32):
        prompt = torch.randint(0, cfg.vocab_size, (B, 16), device="cuda")
        with torch.no_grad():
            logits, state0 = model(prompt, logits="last")
        tok0 = logits[:, -1].argmax(-1, keepdim=True)

        def eager():
            tok, st = tok0, state0
            with torch.no_grad():
                for _ in range(n_tokens):
                    lg, st = model(tok, st, logits="last")
                    tok = lg[:, -1].argmax(-1, keepdim=True)
            return tok

        def make_graphed():
            dec = CudaGraphDecoder(model, batch_size=B)

            def graphed():
                tok, st = tok0, state0
                for _ in range(n_tokens):
                    lg, st = dec(tok, st)
                    tok = lg.argmax(-1, keepdim=True)
                return tok

            return graphed

        times, finals = {}, {}
        for step_name, step in (("fused wkv step", fused_step), ("torch wkv step", ops.wkv_step_torch)):
            ops.wkv_step = step
            try:
                for mode in ("eager", "cuda graph"):
                    try:
                        fn = eager if mode == "eager" else make_graphed()
                        t = cuda_time(fn, warmup=1, reps=3)
                        times[(mode, step_name)] = t
                        finals[(mode, step_name)] = fn()
                        say(
                            f"batch {B:3d} {mode:10s} {step_name}: {n_tokens * B / t:9.0f} tok/s "
                            f"({t / n_tokens * 1e3:.3f} ms/step)"
                        )
                    except Exception as e:
                        say(f"batch {B:3d} {mode} {step_name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            finally:
                ops.wkv_step = fused_step
        base = times.get(("eager", "torch wkv step"))
        best = times.get(("cuda graph", "fused wkv step"))
        if base and best:
            say(f"batch {B:3d}: cuda graph + fused step vs eager + torch step: {base / best:.1f}x")
        # Bit-exactness is not expected between the fused and element-wise
        # steps (different exp rounding, amplified by 200 greedy bf16 steps on
        # random weights); the graph must replay exactly what eager runs.
        for step_name in ("fused wkv step", "torch wkv step"):
            a, b = finals.get(("eager", step_name)), finals.get(("cuda graph", step_name))
            if a is not None and b is not None:
                say(f"batch {B:3d}: {step_name}: cuda graph ends on the same greedy tokens as eager: {bool((a == b).all())}")


@section("rwkvkit.load(path, device='cuda', dtype=bf16) vs CPU fp32 logits")
def load_check():
    import tempfile
    from pathlib import Path

    import rwkvkit
    from rwkvkit.models.rwkv4 import RWKV4Config
    from rwkvkit.init import random_state_dict

    cfg = RWKV4Config(n_layer=4, n_embd=256, vocab_size=1000)
    sd = random_state_dict(cfg, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
        gpu = rwkvkit.load(path, device="cuda", dtype=torch.bfloat16)
        cpu = rwkvkit.load(path, dtype=torch.float32)
    cpu.wkv_backend = "reference"
    say(f"loaded: device {gpu.device}, dtype {gpu.dtype}")
    tokens = torch.randint(0, cfg.vocab_size, (2, 300))
    ref, ref_state = cpu(tokens)
    out, state = gpu(tokens.cuda())
    err = (out.cpu() - ref).abs().max().item()
    agree = (out.cpu().argmax(-1) == ref.argmax(-1)).float().mean().item()
    say(f"parallel form: max |logit diff| {err:.4f} (max |logit| {ref.abs().max().item():.2f}), argmax agreement {agree:.3f}")
    nxt = torch.randint(0, cfg.vocab_size, (2, 1))
    r2, _ = cpu(nxt, ref_state)
    o2, _ = gpu(nxt.cuda(), state)
    say(f"RNN step after 300 tokens: max |logit diff| {(o2.cpu() - r2).abs().max().item():.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="T=1024 only, fewer steps")
    args = ap.parse_args()
    global OUT_FILE
    OUT_FILE = args.out
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 1
    env()
    wkv_bench(Ts=(1024,) if args.quick else (1024, 8192))
    train_bench(steps=3 if args.quick else 6)
    decode_bench(n_tokens=50 if args.quick else 200)
    load_check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
