"""Train the small byte-level RWKV-4 that ships inside rwkvkit (src/rwkvkit/data).

A deliberately minimal loop (the full trainer is rwkvkit.train): random windows
of Tiny Shakespeare bytes, cross-entropy, AdamW, warm-up then cosine decay,
gradient clipping, the paper's initialisation (rwkvkit.init.init_weights).
The first 90% of the file is the training split and the last 10% the
validation split (the usual nanoGPT split).  At the end it measures the
validation loss over the whole validation split (run as one long sequence in
chunks, carrying the RNN state) and writes the model in fp16 as an rwkvkit
folder.  See docs/shipped-model.md for the command that produced the shipped
weights and its numbers.

    python scripts/train_shipped_model.py --data ../shared/data/tinyshakespeare.txt \
        --out src/rwkvkit/data --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkvkit.config import ModelConfig
from rwkvkit.init import init_weights
from rwkvkit.model import RWKV


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="Tiny Shakespeare text file")
    p.add_argument("--out", type=Path, required=True, help="output rwkvkit folder (model.safetensors + config.json)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--ctx", type=int, default=128, help="tokens (bytes) per training window")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--lr-final", type=float, default=1e-4, help="learning rate at the last step")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of the matrices only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick validation estimates")
    p.add_argument("--save-raw", type=Path, default=None, help="also save the fp32 state dict here (torch.save)")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (0.1 + 0.9 * step / args.warmup)
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * p))


def batch_of(data: torch.Tensor, args, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,), generator=g)
    return torch.stack([data[s : s + args.ctx + 1] for s in starts.tolist()])  # [B, ctx + 1]


@torch.no_grad()
def val_bpc(model: RWKV, data: torch.Tensor, chunk: int = 1024) -> float:
    """Bits per character over the whole split, as one sequence (state carried)."""
    model.eval()
    total, n, state = 0.0, 0, None
    for s in range(0, len(data) - 1, chunk):
        x = data[s : min(s + chunk, len(data) - 1)][None]
        y = data[s + 1 : s + 1 + x.shape[1]][None]
        logits, state = model(x, state)
        total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        n += y.shape[1]
    model.train()
    return total / n / math.log(2)


@torch.no_grad()
def quick_val(model: RWKV, data: torch.Tensor, args, g: torch.Generator, n: int = 32) -> float:
    model.eval()
    x = batch_of(data, argparse.Namespace(ctx=256, batch=n), g)
    logits, _ = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    model.train()
    return loss / math.log(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = np.frombuffer(args.data.read_bytes(), dtype=np.uint8)
    split = int(0.9 * len(raw))
    train = torch.from_numpy(raw[:split].astype(np.int64))
    val = torch.from_numpy(raw[split:].astype(np.int64))
    print(f"data: {len(raw)} bytes, train {len(train)}, val {len(val)}", flush=True)

    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=256)
    model = RWKV(cfg)
    init_weights(model, seed=args.seed)
    model.train()
    print(f"model: L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, {model.num_parameters():,} parameters", flush=True)

    # Weight decay on matrices only; time_*, LayerNorms never (spec 4.2).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or ".time_" in n]
    decay = [p for p in decay if all(p is not q for q in no_decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    g = torch.Generator().manual_seed(args.seed)
    gval = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    running = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = batch_of(train, args, g)
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            tps = (step + 1) * args.batch * args.ctx / el
            print(
                f"step {step:5d}  loss {running:.4f} nats ({running / math.log(2):.3f} bpc)  "
                f"lr {lr_at(step, args):.2e}  {tps:.0f} tok/s  {el / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"step {step:5d}  quick val {quick_val(model, val, args, gval):.3f} bpc", flush=True)

    train_min = (time.time() - t0) / 60
    bpc = val_bpc(model, val)
    # The shipped file is fp16: measure what the rounding costs.
    fp32_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.half().float() for k, v in fp32_sd.items()})
    bpc_half = val_bpc(model, val)
    print(f"final validation: {bpc:.4f} bpc (fp32), {bpc_half:.4f} bpc (fp16 weights); trained {train_min:.1f} min", flush=True)
    if args.save_raw:
        torch.save(fp32_sd, args.save_raw)
    model.half()
    import rwkvkit

    rwkvkit.save(model, args.out)
    summary = {
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch * args.ctx,
        "val_bpc_fp32": round(bpc, 4),
        "val_bpc_fp16": round(bpc_half, 4),
        "train_minutes": round(train_min, 1),
        "parameters": model.num_parameters(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
