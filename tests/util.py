"""Helpers shared by tests: random models and the independent implementations."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.init import random_state_dict
from rwkvkit.models.rwkv4 import RWKV

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


def make_model(cfg: RWKV4Config, seed: int = 0, dtype=torch.float32) -> tuple[RWKV, dict]:
    """A random model as rwkvkit.load returns one: eval mode, fused step attached."""
    from rwkvkit import runtime

    sd = random_state_dict(cfg, seed=seed)
    model = RWKV(cfg)
    model.load_state_dict(sd)
    model.to(dtype).eval()
    runtime.accelerate(model)
    return model, sd


def hf_key(key: str) -> str:
    """Official key -> transformers RwkvForCausalLM key (spec 3.6), written
    independently of rwkvkit.checkpoint so the tests check it."""
    if key == "head.weight":
        return key
    k = key.replace("blocks.0.ln0.", "blocks.0.pre_ln.")
    k = k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
    for a, b in (("time_mix_k", "time_mix_key"), ("time_mix_v", "time_mix_value"), ("time_mix_r", "time_mix_receptance")):
        if k.endswith(a):
            k = k[: -len(a)] + b
    if k == "emb.weight":
        k = "embeddings.weight"
    return "rwkv." + k


def hf_model(sd: dict, cfg: RWKV4Config, rescale_every: int = 0):
    from transformers import RwkvConfig, RwkvForCausalLM

    hcfg = RwkvConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        attention_hidden_size=cfg.dim_att,
        intermediate_size=cfg.dim_ffn,
        rescale_every=rescale_every,
        context_length=4096,
    )
    model = RwkvForCausalLM(hcfg)
    missing, unexpected = model.load_state_dict({hf_key(k): v for k, v in sd.items()}, strict=True), None
    del missing, unexpected
    return model.eval()


def pip_model(sd: dict, tmp: Path, strategy: str = "cpu fp32", name: str = "m.pth"):
    """The `rwkv` package's model on the same weights (saved as an official .pth)."""
    from rwkv.model import RWKV as PipRWKV

    path = tmp / name
    torch.save(sd, path)
    return PipRWKV(model=str(path), strategy=strategy, verbose=False)


def assert_matmul_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, extra_ulps: float = 2.0) -> None:
    """``got`` (float32) equals ``x @ w.T`` within the float32 rounding bound of
    a dot product, elementwise: |error| <= (K + extra) * 2**-24 * (|x| @ |w|.T)
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), whatever the
    summation order, SIMD width or thread count.  A fixed atol instead would
    hold or not depending on the magnitudes and on the machine's order."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.t()
    k = x.shape[-1]
    bound = (k + extra_ulps) * 2.0**-24 * (xd.abs() @ wd.abs().t()) + 1e-30
    err = (got.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"matmul error {err.max().item():.3g} exceeds the float32 bound (ratio {worst:.3g})"
