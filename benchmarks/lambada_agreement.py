"""LAMBADA with rwkvkit against the `rwkv` package's own procedure (spec 12), on
one random-weight model with the 20B vocabulary; prints both perplexities.

    python benchmarks/lambada_agreement.py --data ../shared/data/lambada_test.jsonl \
        --tokenizer ../shared/data/tokenizers/20B_tokenizer.json --limit 40
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")  # the rwkv package reads these at import
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch
import torch.nn.functional as F

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.eval import lambada, read_lambada
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv4 import RWKV
from rwkvkit.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/lambada_test.jsonl")
    ap.add_argument("--tokenizer", default="../shared/data/tokenizers/20B_tokenizer.json")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rwkv.model import RWKV as PipRWKV

    tok = load_tokenizer(args.tokenizer)
    texts = read_lambada(args.data, limit=args.limit)
    cfg = RWKV4Config(n_layer=args.layers, n_embd=args.width, vocab_size=50277)
    sd = random_state_dict(cfg, seed=args.seed)
    model = RWKV(cfg)
    model.load_state_dict(sd)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(sd, Path(tmp) / "m.pth")
        pm = PipRWKV(model=str(Path(tmp) / "m.pth"), strategy="cpu fp32", verbose=False)
        t0 = time.perf_counter()
        lps, ok = [], []
        for text in texts:  # ChatRWKV v2/benchmark.py, one passage at a time
            ctx, tgt = text.rsplit(" ", 1)
            src, dst = [187] + tok.encode(ctx), tok.encode(" " + tgt)
            out, _ = pm.forward(src + dst, None, full_output=True)
            lp, good = 0.0, True
            for i, t in enumerate(dst):
                probs = F.softmax(out[len(src) - 1 + i].float(), dim=-1)
                lp += math.log(probs[t])
                good &= int(torch.argmax(probs)) == t
            lps.append(lp)
            ok.append(good)
        t_pip = time.perf_counter() - t0
    ref = math.exp(-sum(lps) / len(lps))
    res = lambada(model, tok, texts, batch_size=16, progress=False)
    print(f"passages {len(texts)}, model L{args.layers} C{args.width} V50277 (random, seed {args.seed})")
    print(f"rwkv package: ppl {ref:.6f}  acc {sum(ok) / len(ok):.4f}  ({t_pip:.2f} s)")
    print(f"rwkvkit:      ppl {res.ppl:.6f}  acc {res.accuracy:.4f}  ({res.seconds:.2f} s, batched)")
    print(f"relative ppl difference {abs(res.ppl - ref) / ref:.2e}; largest log-probability difference "
          f"{max(abs(a - b) for a, b in zip(res.logprobs, lps)):.2e}; same correct flags: {res.correct == ok}")


if __name__ == "__main__":
    main()
