"""Training benchmarks and experiments (CPU by default).

    python benchmarks/bench_train.py speed          # tokens/s vs HF RwkvForCausalLM + fp32 matmul rate
    python benchmarks/bench_train.py context        # step time and saved activations vs context 128..4096
    python benchmarks/bench_train.py shakespeare    # RWKV-4, -5.2, -6, -7 and a same-size GPT, same loop, same wall time
    python benchmarks/bench_train.py long-context   # val loss by position, trained with / without state carry
    python benchmarks/bench_train.py cuda-check     # the trainer on a GPU (bf16, speed, checkpointing, resume)

Every number is measured side by side in one run on the machine it runs on;
nothing here is asserted.  Add ``--help`` after a verb for its options.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

from rwkvkit.models.rwkv4 import RWKV4Config  # noqa: E402
from rwkvkit.init import init_weights, random_state_dict  # noqa: E402
from rwkvkit.models.rwkv4 import RWKV  # noqa: E402


def machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def matmul_rate(m: int, k: int, n: int, reps: int = 10) -> float:
    """Measured fp32 GFLOP/s of an [m, k] x [k, n] product (median of reps)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def train_flops_per_token(cfg: RWKV4Config) -> float:
    """6 x the multiply-adds of the matrices a token passes through (the
    embedding is a lookup); WKV and element-wise work are not counted."""
    C, A, Fh, V, L = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    return 6.0 * (L * (4 * C * A + 2 * C * Fh + C * C) + V * C)


def _time_steps(step, n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ===================================================================== speed
def cmd_speed(args) -> None:
    from transformers import RwkvConfig, RwkvForCausalLM

    from rwkvkit.checkpoint import official_to_hf

    torch.manual_seed(0)
    cfg = RWKV4Config(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab)
    B, T = args.batch, args.ctx
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    sd = random_state_dict(cfg, seed=0)
    rate = matmul_rate(B * T, cfg.n_embd, cfg.dim_ffn)
    fpt = train_flops_per_token(cfg)
    print(f"# machine: {machine()}")
    print(f"# shape: vocab {cfg.vocab_size}, {cfg.n_layer} layers, width {cfg.n_embd}, ctx {T}, batch {B}")
    print(f"# measured fp32 matmul rate ([{B * T}, {cfg.n_embd}] x [{cfg.n_embd}, {cfg.dim_ffn}]): {rate:.1f} GFLOP/s")
    print(f"# training FLOPs per token (6 x matrix MACs): {fpt / 1e6:.1f} M")

    def rwkv_step_fn(backend):
        model = RWKV(cfg)
        model.load_state_dict(sd)
        model.wkv_backend = backend
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

        def step():
            logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    hcfg = RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                      attention_hidden_size=cfg.dim_att, intermediate_size=cfg.dim_ffn, context_length=T,
                      rescale_every=0, use_cache=False)
    hf = RwkvForCausalLM(hcfg)
    hf.load_state_dict({official_to_hf(k): v for k, v in sd.items()}, strict=True)
    hf.train()
    hopt = torch.optim.Adam(hf.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

    def hf_step():
        logits = hf(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), x[:, 1:].reshape(-1))
        loss.backward()
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    rows = []
    tokens = B * T
    for name in args.backends.split(","):
        t = _time_steps(rwkv_step_fn(name), args.steps)
        rows.append((f"rwkvkit ({name})", t))
        print(f"# rwkvkit ({name}): {t:.3f} s/step", flush=True)
    t_hf = _time_steps(hf_step, args.hf_steps)
    rows.append(("HF RwkvForCausalLM", t_hf))
    # Measured again after the timed runs: the machine may be shared, and the
    # ratio to the matmul rate should use a rate from the same period.
    rate = min(rate, matmul_rate(B * T, cfg.n_embd, cfg.dim_ffn))
    print(f"# fp32 matmul rate, lower of the measurements before and after: {rate:.1f} GFLOP/s")
    print(f"\n{'implementation':28s} {'s/step':>8s} {'tokens/s':>9s} {'model GFLOP/s':>14s} {'x matmul':>9s} {'x HF':>6s}")
    for name, t in rows:
        tps = tokens / t
        gf = tps * fpt / 1e9
        print(f"{name:28s} {t:8.3f} {tps:9.0f} {gf:14.1f} {gf / rate:9.2f} {t_hf / t:6.2f}")


# =================================================================== context
def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def cmd_context(args) -> None:
    torch.manual_seed(0)
    cfg = RWKV4Config(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab)
    model = RWKV(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=0))
    model.wkv_backend = args.backend
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    print(f"# machine: {machine()}")
    print(f"# {cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}, batch 1, forward + backward, WKV backend {args.backend}")
    print(f"{'ctx':>6s} {'s/step':>8s} {'us/token':>9s} {'saved MB':>9s} {'KB/token':>9s}")
    for T in [int(t) for t in args.lengths.split(",")]:
        x = torch.randint(0, cfg.vocab_size, (1, T + 1))

        def fwd():
            logits, _ = model(x[:, :-1])
            return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))

        loss, seen = _saved_bytes(fwd)
        act = sum(b for p, b in seen.items() if p not in params)
        loss.backward()
        model.zero_grad(set_to_none=True)

        def step():
            fwd().backward()
            model.zero_grad(set_to_none=True)

        t = _time_steps(step, args.steps, warmup=0)
        print(f"{T:6d} {t:8.3f} {t / T * 1e6:9.1f} {act / 2**20:9.1f} {act / T / 1024:9.1f}", flush=True)


# ========================================================= GPT baseline
class GPT(nn.Module):
    """A pre-LN causal Transformer (GPT-2 layout, learned positions, GELU MLP,
    untied head, no biases) with the RWKV call signature, so the same training
    loop runs it.  ``mlp_ratio`` 4.5 gives 13 C^2 weights per layer, RWKV-4's."""

    def __init__(self, vocab: int, n_layer: int, n_embd: int, n_head: int, ctx_len: int, mlp_ratio: float = 4.5):
        super().__init__()
        self.ctx_len = ctx_len
        self.n_head = n_head
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(ctx_len, n_embd)
        H = int(mlp_ratio * n_embd)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            blk = nn.ModuleDict(dict(
                ln1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd, bias=False), proj=nn.Linear(n_embd, n_embd, bias=False),
                ln2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, H, bias=False), out=nn.Linear(H, n_embd, bias=False),
            ))
            self.blocks.append(blk)
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if n.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens, state=None, **kw):
        B, T = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.shape[-1], dim=-1)
            # [B, T, C] -> [B, heads, T, C / heads]
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln_f(x)).float(), None


def _prepare_text(path: Path, out: Path) -> Path:
    from rwkvkit.train import prepare

    if not (out / "meta.json").exists():
        prepare([path], out, tokenizer="bytes", val_fraction=0.1, progress=False)
    return out


@torch.no_grad()
def eval_bits_per_char(model, data, T: int, carry: bool, batch: int = 16) -> float:
    """Mean loss over the whole split in bits per byte (= per character for
    ASCII text), in non-overlapping windows of T; with ``carry`` the RNN state
    runs through the whole split (one long sequence)."""
    model.eval()
    tok = torch.from_numpy(data.tokens[:].astype("int64"))
    n = (len(tok) - 1) // T
    if carry:
        state, total, count = None, 0.0, 0
        for i in range(n):
            x, y = tok[i * T : (i + 1) * T][None], tok[i * T + 1 : (i + 1) * T + 1][None]
            logits, state = model(x, state)
            total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
            count += T
        return total / count / math.log(2)
    xs = tok[: n * T].view(n, T)
    ys = tok[1 : n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, batch):
        logits, _ = model(xs[i : i + batch])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[i : i + batch].reshape(-1), reduction="sum").item()
    return total / (n * T) / math.log(2)


def _calibrated_steps(make_model, cfg_kw: dict, data: Path, minutes: float, work: Path) -> int:
    """Steps that fit in ``minutes``, from the speed of 6 timed steps."""
    from rwkvkit.train import TrainConfig, train

    cal = TrainConfig(data=str(data), out=str(work / "calib"), max_steps=8, progress=False, plot=False, save_every=0,
                      val_every=0, **cfg_kw)
    train(cal, model=make_model())
    rows = [json.loads(line) for line in (work / "calib" / "metrics.jsonl").read_text().splitlines()]
    per = (rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]) / (len(rows) - 2)
    return max(10, int(minutes * 60 / per))


def cmd_shakespeare(args) -> None:
    import rwkvkit
    from rwkvkit.train import TrainConfig, load_tokens, train

    text = Path(args.text)
    work = Path(args.work or tempfile.mkdtemp(prefix="shk-"))
    data = _prepare_text(text, work / "data")
    val = load_tokens(data, "val")
    L, C, T = args.layers, args.width, args.ctx

    def make_rwkv():
        m = RWKV(RWKV4Config(n_layer=L, n_embd=C, vocab_size=256))
        init_weights(m, seed=0)
        m.wkv_backend = args.backend
        return m

    def maker(generation: str):
        # What `rwkvkit train --generation N` builds: the generation's official
        # init and default ranks (RWKV-7: no layer-0 value LoRA).
        def make():
            from rwkvkit import models
            from rwkvkit.train.loop import model_config

            # RWKV-6's default LoRA ranks (32/64) add 12% at this width: 8/16 keep
            # its parameter count level with the others.
            ranks = dict(d_mix=8, d_decay=16) if generation == "6" else {}
            mc = model_config(TrainConfig(generation=generation, n_layer=L, n_embd=C, head_size=args.head_size, **ranks), 256)
            m = models.build(mc)
            init_weights(m, seed=0)
            m.wkv_backend = args.backend7
            return m

        return make

    def make_gpt():
        torch.manual_seed(0)
        return GPT(256, L, C, args.heads, T)

    makers = {"rwkv": make_rwkv, "rwkv5": maker("5"), "rwkv6": maker("6"), "rwkv7": maker("7"), "gpt": make_gpt}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(makers)}")
    n_params = {name: sum(p.numel() for p in makers[name]().parameters()) for name in names}
    print(f"# machine: {machine()}")
    print(f"# data: {text} ({len(load_tokens(data, 'train')):,} train / {len(val):,} val bytes)")
    print(f"# {L} layers x {C}: " + "; ".join(f"{_LABELS[n]} {n_params[n]:,} parameters" for n in names)
          + f" (GPT: {args.heads} heads, MLP 4.5x; RWKV-7: head size {args.head_size})")
    results = {}
    for name in names:
        make = makers[name]
        is_rwkv = name.startswith("rwkv")
        kw = dict(ctx_len=T, batch_size=args.batch, lr_init=args.lr, lr_final=args.lr / 10, warmup_steps=args.warmup,
                  threads=args.threads, l2wrap=1e-4 if is_rwkv else 0.0, layerwise_lr=is_rwkv, seed=0)
        steps = _calibrated_steps(make, kw, data, args.minutes, work / name)
        cfg = TrainConfig(data=str(data), out=str(work / name / "run"), max_steps=steps, time_limit=args.minutes * 1.05,
                          val_every=max(1, steps // 10), val_windows=32, save_every=0, progress=False, plot=True, **kw)
        model = make()
        t0 = time.perf_counter()
        summary = train(cfg, model=model)
        wall = time.perf_counter() - t0
        bpc = eval_bits_per_char(model, val, T, carry=False)
        res = {"steps": summary["steps"], "planned_steps": steps, "train_minutes": wall / 60, "val_bpc": bpc,
               "params": n_params[name]}
        if is_rwkv:
            res["val_bpc_state_carried"] = eval_bits_per_char(model, val, T, carry=True)
            rwkvkit.save(model, work / name / "model")
        results[name] = res
        print(f"{name}: {json.dumps(res)}", flush=True)
    print(f"\n# outputs in {work}")
    print(f"{'model':6s} {'params':>10s} {'steps':>6s} {'minutes':>8s} {'val bits/char':>14s} {'state carried':>14s}")
    for name, r in results.items():
        carried = f"{r['val_bpc_state_carried']:14.4f}" if "val_bpc_state_carried" in r else f"{'-':>14s}"
        print(f"{name:6s} {r['params']:10,d} {r['steps']:6d} {r['train_minutes']:8.1f} {r['val_bpc']:14.4f} {carried}")
    print("(state carried: the RNN state runs through the whole validation text instead of restarting every window)")
    if args.plot:
        plot_race(work, Path(args.plot))
        print(f"plot: {args.plot}")


_LABELS = {"rwkv": "RWKV-4", "rwkv5": "RWKV-5.2", "rwkv6": "RWKV-6", "rwkv7": "RWKV-7", "gpt": "GPT"}


def plot_race(work: Path, path: Path) -> None:
    """Validation loss (bits/char) against training time, RWKV-4, RWKV-7 and GPT, from the runs' metrics files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in _LABELS.items():
        f = work / name / "run" / "metrics.jsonl"
        if not f.exists():
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r["loss"] / math.log(2) for r in rows], lw=0.6, alpha=0.35)
        ax.plot([r["elapsed_s"] / 60 for r in val], [r["val_loss"] / math.log(2) for r in val], "o-",
                color=ax.lines[-1].get_color(), label=f"{label} validation (train: faint)")
    ax.set_xlabel("training time (minutes, 2 CPU threads)")
    ax.set_ylabel("loss (bits per character)")
    ax.set_ylim(top=3.5)
    ax.set_title("Tiny Shakespeare, same parameter count, same loop, same time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ============================================================= long context
@torch.no_grad()
def loss_by_position(model, data, length: int, buckets: list[tuple[int, int]], max_windows: int, stride: int = 0):
    """Mean loss (nats) of tokens at positions [a, b) of windows of ``length``
    tokens, each window run from an empty state in chunks of 512 with the
    state carried (exactly the same as one pass)."""
    model.eval()
    dev = next(model.parameters()).device
    tok = torch.from_numpy(data.tokens[:].astype("int64"))
    stride = stride or length  # windows start every `stride` tokens (overlapping if < length)
    n = min(max_windows, (len(tok) - 1 - length) // stride + 1)
    sums = torch.zeros(length, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            x = tok[i * stride : i * stride + length][None].to(dev)
            y = tok[i * stride + 1 : i * stride + length + 1].to(dev)
            state, losses = None, []
            for c in range(0, length, 512):
                logits, state = model(x[:, c : c + 512], state)
                losses.append(F.cross_entropy(logits[0].float(), y[c : c + 512], reduction="none"))
            sums += torch.cat(losses).double().cpu()
    per_pos = sums / n
    return [float(per_pos[a:b].mean()) for a, b in buckets], n, per_pos


def cmd_long_context(args) -> None:
    from rwkvkit.train import TrainConfig, load_tokens, train

    work = Path(args.work or tempfile.mkdtemp(prefix="longctx-"))
    data = _prepare_text(Path(args.text), work / "data")
    val = load_tokens(data, "val")
    buckets = [(0, 256), (256, 1024), (1024, 4096)]
    print(f"# machine: {machine()}")
    print(f"# data {args.text}; model {args.layers} x {args.width}; window {args.ctx}; {args.steps} steps each, "
          f"{args.ctx * args.chunks} tokens per sample")
    out, curves = {}, {}
    for name, chunks, batch in (("no carry", 1, args.chunks), ("state carry", args.chunks, 1)):
        # Same tokens per step: the no-carry run sees `chunks` short samples,
        # the carry run one long sample cut into `chunks` windows.
        cfg = TrainConfig(data=str(data), out=str(work / name.replace(" ", "_")), n_layer=args.layers, n_embd=args.width,
                          ctx_len=args.ctx, bptt_chunks=chunks, batch_size=batch * args.batch, max_steps=args.steps,
                          lr_init=args.lr, lr_final=args.lr / 10, val_every=0, val_windows=8, save_every=0,
                          progress=False, plot=False, threads=args.threads, wkv_backend=args.backend,
                          device=args.device, precision=args.precision, time_limit=args.minutes)
        model = RWKV(RWKV4Config(n_layer=args.layers, n_embd=args.width, vocab_size=256))
        init_weights(model, seed=0)
        model.wkv_backend = args.backend
        t0 = time.perf_counter()
        summary = train(cfg, model=model)
        losses, n, per_pos = loss_by_position(model, val, 4096, buckets, args.windows, args.stride)
        out[name] = losses
        curves[name] = per_pos
        print(f"{name}: {summary['steps']} steps in {time.perf_counter() - t0:.0f} s; val loss (nats) by position "
              + ", ".join(f"{a}-{b}: {v:.4f}" for (a, b), v in zip(buckets, losses)) + f" ({n} windows of 4096)", flush=True)
    print(f"\n{'positions':>12s} " + " ".join(f"{k:>12s}" for k in out))
    for i, (a, b) in enumerate(buckets):
        print(f"{f'{a}-{b}':>12s} " + " ".join(f"{v[i]:12.4f}" for v in out.values()))
    if args.plot:
        _plot_by_position(curves, args.ctx, Path(args.plot))
        print(f"plot: {args.plot}")


def _plot_by_position(curves: dict, window: int, path: Path) -> None:
    """Validation loss against position (log axis, averaged over octave-spaced bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = [0, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_pos in curves.items():
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        vals = [float(per_pos[a:b].mean()) for a, b in zip(edges, edges[1:])]
        ax.plot(mids, vals, marker="o", label=name)
    ax.axvline(window, color="grey", ls="--", lw=1, label=f"training window ({window})")
    ax.set_xscale("log")
    ax.set_xlabel("position in a 4096-token validation window")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Loss by position, trained with and without state carry")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# =============================================================== cuda check
def cmd_cuda_check(args) -> None:
    """The trainer on a GPU: bf16 autocast, tokens/s, gradient checkpointing
    (same losses, less memory), resume, truncated BPTT."""
    from rwkvkit.train import TrainConfig, train

    if not torch.cuda.is_available():
        raise SystemExit("cuda-check needs a CUDA GPU")
    work = Path(args.work or tempfile.mkdtemp(prefix="cudacheck-"))
    data = _prepare_text(Path(args.text), work / "data")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    base = dict(data=str(data), n_layer=args.layers, n_embd=args.width, ctx_len=args.ctx, batch_size=args.batch,
                max_steps=args.steps, lr_init=1e-3, lr_final=1e-4, warmup_steps=10, val_every=args.steps // 2,
                val_windows=32, save_every=0, progress=False, plot=True, device="cuda", precision="bf16")

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    def run(name, **kw):
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(**{**base, "out": str(work / name), **kw})
        t0 = time.perf_counter()
        s = train(cfg)
        torch.cuda.synchronize()
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2 :])
        print(f"{name}: {s['steps']} steps in {time.perf_counter() - t0:.1f} s; median {tps:,.0f} tokens/s; "
              f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; val {s.get('val_loss', float('nan')):.4f}; "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
        return losses(work / name)

    ref = run("bf16")
    ck = run("bf16_grad_checkpoint", grad_checkpoint=True, stop_after=20)
    print(f"grad checkpoint vs plain, first 20 losses: max |diff| {max(abs(a - b) for a, b in zip(ck, ref)):.2e}")
    run("resume", stop_after=10)
    rs = run("resume", stop_after=10, resume=True)
    print(f"resumed vs uninterrupted, first 20 losses: max |diff| {max(abs(a - b) for a, b in zip(rs, ref)):.2e}")
    run("bptt4", ctx_len=args.ctx // 4, bptt_chunks=4, bptt_detach=False, stop_after=20)
    run("fp32", precision="fp32", stop_after=20)


# ===================================================================== main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("speed", help="training tokens/s vs HF RwkvForCausalLM")
    s.add_argument("--vocab", type=int, default=256)
    s.add_argument("--layers", type=int, default=6)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--hf-steps", type=int, default=2)
    s.add_argument("--backends", default="auto,torch", help="comma-separated rwkvkit WKV backends to time")

    s = sub.add_parser("context", help="step time and activation memory vs context length")
    s.add_argument("--vocab", type=int, default=256)
    s.add_argument("--layers", type=int, default=6)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    s.add_argument("--steps", type=int, default=2)
    s.add_argument("--backend", default="auto")

    s = sub.add_parser("shakespeare", help="RWKV-4, -5.2, -6, -7 and a same-size GPT on Tiny Shakespeare, same loop, same time")
    s.add_argument("--models", default="rwkv,rwkv5,rwkv6,rwkv7,gpt", help="which to race, in order: rwkv (RWKV-4), rwkv5 (5.2), rwkv6, rwkv7, gpt")
    s.add_argument("--head-size", type=int, default=64, help="RWKV-5/6/7 head size")
    s.add_argument("--backend7", default="auto", help="RWKV-5/6/7 WKV backend (auto, torch, reference)")
    s.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    s.add_argument("--work", default=None, help="folder for data and runs (default: a temporary folder)")
    s.add_argument("--minutes", type=float, default=15.0, help="training time per model")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--width", type=int, default=256)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--ctx", type=int, default=256)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--warmup", type=int, default=50)
    s.add_argument("--backend", default="auto")
    s.add_argument("--plot", default="", help="draw validation loss against time for both models to this PNG")

    s = sub.add_parser("long-context", help="val loss at positions 0-256, 256-1024, 1024-4096, with / without state carry")
    s.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    s.add_argument("--work", default=None)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--width", type=int, default=128)
    s.add_argument("--ctx", type=int, default=256)
    s.add_argument("--chunks", type=int, default=8, help="windows per sample in the state-carry run")
    s.add_argument("--batch", type=int, default=1, help="long samples per step (x chunks short ones without carry)")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--windows", type=int, default=24, help="validation windows of 4096 tokens")
    s.add_argument("--backend", default="auto")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    s.add_argument("--minutes", type=float, default=0.0, help="time limit per run (0 = none; the run stops early, cleanly)")
    s.add_argument("--plot", default="", help="draw loss by position to this PNG")
    s.add_argument("--stride", type=int, default=0, help="validation windows start every STRIDE tokens (0 = 4096, no overlap); "
                   "a smaller stride puts different text at each position")

    s = sub.add_parser("cuda-check", help="the trainer on a GPU: bf16, speed, gradient checkpointing, resume")
    s.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    s.add_argument("--work", default=None)
    s.add_argument("--layers", type=int, default=6)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--steps", type=int, default=200)

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    {"cuda-check": cmd_cuda_check, "speed": cmd_speed, "context": cmd_context, "shakespeare": cmd_shakespeare, "long-context": cmd_long_context}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
