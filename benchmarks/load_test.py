"""Load test of `rwkvkit serve`: N concurrent streaming requests vs the same requests one at a time.

Starts the server in a subprocess on 127.0.0.1 (a free port), sends the
requests from this process with httpx, and prints aggregate generated
tokens/s, time to first token (TTFT) and per-request latency percentiles for
both runs, their ratio, and whether every request's text was the same in
both (greedy decoding, so it must be).  Nothing leaves the machine: the
target is always loopback.

    python benchmarks/load_test.py                       # the shipped model (or a random 6x512 one)
    python benchmarks/load_test.py --model RWKV-4-Pile-169M.pth --requests 64 --max-tokens 64
    python benchmarks/load_test.py --random 12x768        # a random model of that shape (bytes vocab)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)

    def p(q: float) -> float:
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return f"p50 {p(0.5) * 1e3:8.1f} ms  p90 {p(0.9) * 1e3:8.1f} ms  p99 {p(0.99) * 1e3:8.1f} ms  max {xs[-1] * 1e3:8.1f} ms"


async def one(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = None
    pieces: list[str] = []
    usage = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                if ch.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(ch["text"])
    return {"text": "".join(pieces), "ttft": ttft if ttft is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0, "tokens": usage["completion_tokens"]}


async def run_batch(base: str, bodies: list[dict], concurrent: bool) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        url = base + "/v1/completions"
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, url, b) for b in bodies))
        else:
            results = [await one(client, url, b) for b in bodies]
        return list(results), time.perf_counter() - t0


def start_server(model: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "rwkvkit", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(max_batch), "--log-level", "warning", "--cache-mb", "0", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode}")
            continue
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return proc, m.group(1)
        print("server:", line.rstrip(), file=sys.stderr)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def random_model(shape: str, folder: Path) -> str:
    import rwkvkit
    from rwkvkit.models.rwkv4 import RWKV4Config
    from rwkvkit.init import random_state_dict
    from rwkvkit.model import RWKV

    layers, width = (int(x) for x in shape.lower().split("x"))
    cfg = RWKV4Config(n_layer=layers, n_embd=width, vocab_size=256)
    model = RWKV(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=0))
    rwkvkit.save(model, folder)
    return str(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: the shipped model if present, else --random)")
    ap.add_argument("--random", default=None, metavar="LxC", help="serve a random byte-level model of this shape (default when no model is given and none is shipped: 6x512)")
    ap.add_argument("--requests", type=int, default=64, help="number of requests (default 64)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: torch's choice)")
    ap.add_argument("--skip-sequential", action="store_true", help="only the concurrent run")
    args = ap.parse_args()

    import torch

    from rwkvkit.generate import SHIPPED_MODEL

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.random is None and (Path(SHIPPED_MODEL) / "model.safetensors").is_file():
            model = str(SHIPPED_MODEL)
        elif model is None:
            args.random = args.random or "6x512"
            model = random_model(args.random, Path(tmp) / "m")
        desc = f"random {args.random} byte-level model" if args.random else model
        extra = ["--dtype", "float32"] if model == str(SHIPPED_MODEL) else []
        if args.threads:
            extra += ["--threads", str(args.threads)]
        proc, base = start_server(model, max(args.requests, 1), extra)
        try:
            print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), server threads {args.threads or 'default'}, torch {torch.__version__}, python {platform.python_version()}")
            print(f"model: {desc}; {args.requests} requests x {args.max_tokens} tokens, greedy, streamed; server {base}")
            name = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
            bodies = [
                {"model": name,
                 "prompt": f"Request {i}: the story of number {i * 7919 % 1000} begins", "max_tokens": args.max_tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                for i in range(args.requests)
            ]
            asyncio.run(run_batch(base, bodies[:2], concurrent=False))  # warm-up (kernel load)
            m0 = json.loads(urllib.request.urlopen(base + "/metrics").read())
            together, wall_c = asyncio.run(run_batch(base, bodies, concurrent=True))
            m1 = json.loads(urllib.request.urlopen(base + "/metrics").read())
            rows = [("concurrent", together, wall_c)]
            if not args.skip_sequential:
                alone, wall_s = asyncio.run(run_batch(base, bodies, concurrent=False))
                rows.append(("one at a time", alone, wall_s))
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"{'mode':<14} {'wall s':>8} {'tokens':>7} {'tok/s':>8}   TTFT / latency")
    rates = {}
    for name, res, wall in rows:
        tokens = sum(r["tokens"] for r in res)
        rates[name] = tokens / wall
        print(f"{name:<14} {wall:8.2f} {tokens:7d} {tokens / wall:8.1f}   TTFT    {percentiles([r['ttft'] for r in res])}")
        print(f"{'':<14} {'':>8} {'':>7} {'':>8}   latency {percentiles([r['latency'] for r in res])}")
    steps = m1["decode_steps_total"] - m0["decode_steps_total"]
    batch = (m1["completion_tokens_total"] - m0["completion_tokens_total"]) / max(steps, 1)
    print(f"concurrent run: {steps} decode steps, mean batch {batch:.1f} (max {m1['max_batch']}); "
          f"failed {m1['requests_failed']}, rejected {m1['requests_rejected']}")
    if len(rows) == 2:
        same = sum(a["text"] == b["text"] for a, b in zip(rows[0][1], rows[1][1]))
        print(f"throughput ratio concurrent / one at a time: {rates['concurrent'] / rates['one at a time']:.2f}x")
        print(f"identical texts: {same}/{len(bodies)}")
        return 0 if same == len(bodies) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
