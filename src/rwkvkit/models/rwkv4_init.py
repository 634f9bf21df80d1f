"""RWKV-4 initial weights: the paper's recipe, and random checkpoints for tests.

:func:`init_weights` follows the official RWKV-4 training code (spec 4.1),
which the paper's appendix describes with a few contradictions (spec 10.2 and
10.3); where they disagree we follow the code, except for the embedding, where
the paper's U(-1e-4, 1e-4) is the default (``emb_init`` selects the others).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn




def _ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """r01 = l / (L - 1) (0 for L = 1) and r10 = 1 - l / L (spec 4.1)."""
    r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    r10 = 1.0 - layer_id / n_layer
    return r01, r10


def decay_init(dim_att: int, layer_id: int, n_layer: int) -> torch.Tensor:
    """d_h = -5 + 8 (h / (A - 1))^(0.7 + 1.3 r01): slow to fast decay across channels."""
    r01, _ = _ratios(layer_id, n_layer)
    h = torch.arange(dim_att, dtype=torch.float64)
    frac = h / max(dim_att - 1, 1)
    return (-5 + 8 * frac ** (0.7 + 1.3 * r01)).float()


def first_init(dim_att: int) -> torch.Tensor:
    """u_i = ln 0.3 + 0.5 (((i + 1) mod 3) - 1): a zigzag around ln 0.3."""
    i = torch.arange(dim_att, dtype=torch.float64)
    return (math.log(0.3) + 0.5 * (((i + 1) % 3) - 1)).float()


def mix_init(n_embd: int, layer_id: int, n_layer: int) -> dict[str, torch.Tensor]:
    """Token-shift ratios with delta_i = i / C (spec 4.1), each shaped (1, 1, C)."""
    r01, r10 = _ratios(layer_id, n_layer)
    delta = torch.arange(n_embd, dtype=torch.float64) / n_embd
    out = {
        "att.time_mix_k": delta**r10,
        "att.time_mix_v": delta**r10 + 0.3 * r01,
        "att.time_mix_r": delta ** (0.5 * r10),
        "ffn.time_mix_k": delta**r10,
        "ffn.time_mix_r": delta**r10,
    }
    return {k: v.float().reshape(1, 1, n_embd) for k, v in out.items()}


def _orthogonal(shape: tuple[int, int], gain: float, generator: torch.Generator) -> torch.Tensor:
    w = torch.empty(shape)
    # nn.init.orthogonal_ takes a generator since torch 2.1.
    nn.init.orthogonal_(w, gain=gain, generator=generator)
    return w


@torch.no_grad()
def init_weights(model, seed: int = 0, emb_init: str = "uniform") -> None:
    """Initialise ``model`` (an :class:`~rwkvkit.model.RWKV`) in place.

    - LayerNorms: weight 1, bias 0.
    - time_decay, time_first, time_mix_*: the formulas above.
    - Zero: att.key, att.receptance, att.output, ffn.receptance, ffn.value.
    - Orthogonal: att.value (gain 1), ffn.key (gain sqrt(F/C)), head
      (gain 0.5 sqrt(V/C)), each gain being sqrt(rows/cols) when rows > cols
      times the extra scale of the official code.
    - Embedding: ``"uniform"`` U(-1e-4, 1e-4) (paper), ``"normal"`` N(0, 1e-4)
      (paper appendix remark), or ``"orthogonal"`` with gain 1e-4 sqrt(max(V, C))
      (the v4 trainer).
    """
    cfg: ModelConfig = model.config
    g = torch.Generator().manual_seed(seed)
    L, C, A, Fh, V = cfg.n_layer, cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size
    dev, dt = model.device, model.dtype

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(device=dev, dtype=param.dtype))

    if emb_init == "uniform":
        put(model.emb.weight, torch.rand(V, C, generator=g) * 2e-4 - 1e-4)
    elif emb_init == "normal":
        put(model.emb.weight, torch.randn(V, C, generator=g) * 1e-4)
    elif emb_init == "orthogonal":
        put(model.emb.weight, _orthogonal((V, C), 1e-4 * math.sqrt(max(V, C)), g))
    else:
        raise ValueError(f"emb_init must be 'uniform', 'normal' or 'orthogonal', got {emb_init!r}")
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for i, block in enumerate(model.blocks):
        put(block.att.time_decay, decay_init(A, i, L))
        put(block.att.time_first, first_init(A))
        for name, value in mix_init(C, i, L).items():
            sub, attr = name.split(".")
            put(getattr(getattr(block, sub), attr), value)
        for lin in (block.att.key, block.att.receptance, block.att.output, block.ffn.receptance, block.ffn.value):
            lin.weight.zero_()
        put(block.att.value.weight, _orthogonal((A, C), math.sqrt(A / C) if A > C else 1.0, g))
        put(block.ffn.key.weight, _orthogonal((Fh, C), math.sqrt(Fh / C) if Fh > C else 1.0, g))
    put(model.head.weight, _orthogonal((V, C), 0.5 * (math.sqrt(V / C) if V > C else 1.0), g))
    del dt


def random_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random checkpoint with official keys and shapes, every tensor non-trivial.

    Unlike the paper's initialisation (which zeroes many matrices and so would
    leave whole code paths untested), every weight here is random, decays span
    the paper's range and the logits are of order one.  For tests and
    benchmarks only.
    """
    g = torch.Generator().manual_seed(seed)
    C, A, Fh, V, L = config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size, config.n_layer

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def ru(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {"emb.weight": rn(V, C, scale=0.5)}
    for i in range(L):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"] = ru(C, lo=0.5, hi=1.5)
            sd[p + "ln0.bias"] = rn(C, scale=0.1)
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"] = ru(C, lo=0.5, hi=1.5)
            sd[f"{p}{ln}.bias"] = rn(C, scale=0.1)
        sd[p + "att.time_decay"] = decay_init(A, i, L) + rn(A, scale=0.3)
        sd[p + "att.time_first"] = first_init(A) + rn(A, scale=0.3)
        for m in ("k", "v", "r"):
            sd[f"{p}att.time_mix_{m}"] = ru(1, 1, C)
        sd[p + "att.key.weight"] = rn(A, C, scale=1.0 / math.sqrt(C))
        sd[p + "att.value.weight"] = rn(A, C, scale=1.0 / math.sqrt(C))
        sd[p + "att.receptance.weight"] = rn(A, C, scale=1.0 / math.sqrt(C))
        sd[p + "att.output.weight"] = rn(C, A, scale=1.0 / math.sqrt(A))
        sd[p + "ffn.time_mix_k"] = ru(1, 1, C)
        sd[p + "ffn.time_mix_r"] = ru(1, 1, C)
        sd[p + "ffn.key.weight"] = rn(Fh, C, scale=1.0 / math.sqrt(C))
        sd[p + "ffn.receptance.weight"] = rn(C, C, scale=1.0 / math.sqrt(C))
        sd[p + "ffn.value.weight"] = rn(C, Fh, scale=1.0 / math.sqrt(Fh))
    sd["ln_out.weight"] = ru(C, lo=0.5, hi=1.5)
    sd["ln_out.bias"] = rn(C, scale=0.1)
    sd["head.weight"] = rn(V, C, scale=1.0 / math.sqrt(C))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
