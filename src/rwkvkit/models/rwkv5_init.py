"""RWKV-5 initial weights: the official x052 recipe, and random checkpoints for tests.

:func:`init_weights` follows RWKV-LM's x052 trainer with its
``generate_init_weight`` pass for the matrices (rwkv5-7 spec 8.1); the
5.0/5.1 previews take the per-head variant of the decay and bonus.
:func:`random_state_dict` makes every tensor non-trivial so that tests
exercise every path.  The matrix rules are shared with RWKV-6
(:mod:`.rwkv6_init`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """r01 = l / (L - 1) (0 for L = 1) and r10 = 1 - l / L (spec 8)."""
    r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return r01, 1.0 - layer_id / n_layer


def decay_speed(n: int, r01: float) -> torch.Tensor:
    """-6 + 5 (i / (n - 1))^(0.7 + 1.3 r01) for i < n (fp64)."""
    i = torch.arange(n, dtype=torch.float64)
    return -6 + 5 * (i / max(n - 1, 1)) ** (0.7 + 1.3 * r01)


def faaaa(n: int, r01: float) -> torch.Tensor:
    """r01 (1 - i / (n - 1)) + 0.1 (((i + 1) mod 3) - 1) for i < n (fp64)."""
    i = torch.arange(n, dtype=torch.float64)
    return r01 * (1 - i / max(n - 1, 1)) + 0.1 * (((i + 1) % 3) - 1)


def small_params(config, layer_id: int) -> dict[str, torch.Tensor]:
    """The x052 trainer's per-channel parameters of one layer, official shapes (spec 8.1)."""
    C, A, H = config.n_embd, config.dim_att, config.n_head
    r01, r10 = ratios(layer_id, config.n_layer)
    ddd = torch.arange(C, dtype=torch.float64) / C
    vec = lambda t: t.float().reshape(1, 1, C)  # noqa: E731
    out = {
        "att.time_mix_k": vec(ddd**r10),
        "att.time_mix_v": vec(ddd**r10 + 0.3 * r01),
        "att.time_mix_r": vec(ddd ** (0.5 * r10)),
        "att.time_mix_g": vec(ddd ** (0.5 * r10)),
        "ffn.time_mix_k": vec(ddd**r10),
        "ffn.time_mix_r": vec(ddd**r10),
    }
    if config.per_channel_decay:
        out["att.time_decay"] = decay_speed(A, r01).float().reshape(H, -1)
        out["att." + config.bonus] = faaaa(A, r01).float().reshape(H, -1)
    else:  # the 5.0/5.1 previews: one decay and bonus per head
        out["att.time_decay"] = decay_speed(H, r01).float()
        if config.bonus == "time_first":
            out["att.time_first"] = torch.full((H,), -3.0)
        else:
            h = torch.arange(H, dtype=torch.float64)
            out["att.time_faaaa"] = (r01 * (1 - h / max(H - 1, 1))).float()
    return out


def orthogonal(shape: tuple[int, int], gain: float, g: torch.Generator) -> torch.Tensor:
    w = torch.empty(shape)
    nn.init.orthogonal_(w, gain=gain, generator=g)
    return w


def put(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def init_matrices(model, g: torch.Generator) -> None:
    """generate_init_weight for v5/v6 (spec 8.1): emb U(+-1e-4); receptance,
    value, ffn.key orthogonal gain 1; key and gate 0.1; output, ffn.value,
    ffn.receptance zero; head 0.5 sqrt(V/C) (0.5 when V <= C); ln_x weight
    ((l+1)/L)^0.7, bias 0; LayerNorms 1/0."""
    cfg = model.config
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    put(model.emb.weight, torch.rand(V, C, generator=g) * 2e-4 - 1e-4)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
        att.ln_x.bias.zero_()
        for lin, gain in ((att.receptance, 1.0), (att.value, 1.0), (att.key, 0.1), (ffn.key, 1.0)):
            put(lin.weight, orthogonal(tuple(lin.weight.shape), gain, g))
        if hasattr(att, "gate"):
            put(att.gate.weight, orthogonal(tuple(att.gate.weight.shape), 0.1, g))
        att.output.weight.zero_()
        ffn.value.weight.zero_()
        ffn.receptance.weight.zero_()
    put(model.head.weight, orthogonal((V, C), 0.5 * (math.sqrt(V / C) if V > C else 1.0), g))


@torch.no_grad()
def init_weights(model, seed: int = 0, **_unused) -> None:
    """Initialise an :class:`~rwkvkit.models.rwkv5.RWKV5` in place (spec 8.1)."""
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.blocks):
        for name, value in small_params(model.config, i).items():
            sub, attr = name.split(".")
            target = getattr(block, sub)
            if hasattr(target, attr):
                put(getattr(target, attr), value)
    init_matrices(model, g)


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """One non-trivial random tensor for an official v5/v6 key (shared with RWKV-6)."""
    leaf = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else ".".join(key.split(".")[-2:])
    rn = lambda scale: torch.randn(*shape, generator=g) * scale  # noqa: E731
    ru = lambda lo, hi: torch.rand(*shape, generator=g) * (hi - lo) + lo  # noqa: E731
    if key == "emb.weight":
        return rn(0.5)
    if leaf.endswith(".weight") and leaf.split(".")[0] in ("ln0", "ln1", "ln2", "ln_out", "ln_x"):
        return ru(0.5, 1.5)
    if leaf.endswith(".bias"):
        return rn(0.1)
    if leaf.startswith(("time_mix_", "time_maa_")) and leaf not in ("time_maa_w1", "time_maa_w2"):
        return ru(0.0, 1.0)
    if leaf == "time_decay":
        # decays exp(-exp(d)) from ~0.999 to ~1e-9 (d in [-7, 3])
        return ru(-7.0, 3.0)
    if leaf == "time_first":
        return rn(0.5)
    if leaf == "time_faaaa":
        return rn(0.5)
    if leaf in ("time_maa_w1", "time_decay_w1"):
        return rn(1.0 / math.sqrt(shape[0]))
    if leaf in ("time_maa_w2", "time_decay_w2"):
        return rn(1.0 / math.sqrt(shape[-2]))
    if leaf == "output.weight" and ".att." in key:
        # The GroupNorm output has unit variance per head and amplifies the
        # WKV's fp32 round-off where a head's variance is small; half the
        # usual scale keeps two fp32 implementations within ~5e-6 (1e-5 bound).
        return rn(0.5 / math.sqrt(shape[1]))
    if leaf.endswith(".weight"):
        return rn(1.0 / math.sqrt(shape[1]))
    raise AssertionError(key)  # pragma: no cover - every official key is covered above


def random_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random RWKV-5.x checkpoint with official keys and shapes, every tensor non-trivial.

    Decays span ~0.999 down to ~1e-9 and the logits are of order one.  For
    tests and benchmarks only.
    """
    g = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, shape, g).to(dtype).contiguous() for k, shape in config.expected_shapes().items()}
