"""RWKV-7 initial weights: the official x070 recipe, and random checkpoints for tests.

:func:`init_weights` follows RWKV-LM's May-2025 x070 trainer with its
``generate_init_weight`` pass for the matrices (rwkv5-7 spec 8.1).
:func:`random_state_dict` makes every tensor non-trivial (no zero LoRAs, no
zero matrices) so that tests exercise every path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """r01 = l / (L - 1) (0 for L = 1) and r10 = 1 - l / L (spec 8)."""
    r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return r01, 1.0 - layer_id / n_layer


def small_params(n_embd: int, head_size: int, layer_id: int, n_layer: int) -> dict[str, torch.Tensor]:
    """The x070 trainer's per-channel parameters of one layer (spec 8.1), official shapes."""
    C, N = n_embd, head_size
    r01, r10 = _ratios(layer_id, n_layer)
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5 if C > 1 else torch.zeros(C, dtype=torch.float64)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C, dtype=torch.float64)
    zigzag = z * z.abs()
    www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r01**0.3)
    vec = lambda t: t.float().reshape(1, 1, C)  # noqa: E731
    out = {
        "att.x_r": vec(1 - ddd ** (0.2 * r10)),
        "att.x_w": vec(1 - ddd ** (0.9 * r10)),
        "att.x_k": vec(1 - ddd ** (0.7 * r10)),
        "att.x_v": vec(1 - ddd ** (0.7 * r10)),
        "att.x_a": vec(1 - ddd ** (0.9 * r10)),
        "att.x_g": vec(1 - ddd ** (0.2 * r10)),
        # +0.5 compensates the -0.5 of the soft clamp in the trainer's log-log form.
        "att.w0": vec(www + 0.5 + 2.5 * zigzag),
        "att.a0": vec(-0.19 + 0.3 * zigzag + 0.4 * linear),
        "att.v0": vec(0.73 - 0.4 * linear),
        "att.k_k": vec(0.71 - 0.1 * linear),
        "att.k_a": vec(torch.full((C,), 1.02, dtype=torch.float64)),
        "att.r_k": torch.full((C // N, N), -0.04),
        "ffn.x_k": vec(1 - ddd ** (r10**4)),
    }
    return out


def _orthogonal(shape: tuple[int, int], gain: float, g: torch.Generator) -> torch.Tensor:
    w = torch.empty(shape)
    nn.init.orthogonal_(w, gain=gain, generator=g)
    return w


@torch.no_grad()
def init_weights(model, seed: int = 0, **_unused) -> None:
    """Initialise an :class:`~rwkvkit.models.rwkv7.RWKV7` in place (spec 8.1).

    - per-channel parameters: :func:`small_params`;
    - LoRA first factors (w1, a1, v1, g1) zero, second factors orthogonal with gain 0.1;
    - ln_x weight ((l+1)/L)^0.7, bias 0; LayerNorms 1/0;
    - matrices (generate_init_weight): emb U(+-1e-4); receptance, value and
      ffn.key orthogonal gain 1; key orthogonal 0.1; output and ffn.value zero;
      head orthogonal 0.5 sqrt(V/C) (0.5 when V <= C).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(device=param.device, dtype=param.dtype))

    put(model.emb.weight, torch.rand(V, C, generator=g) * 2e-4 - 1e-4)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm,)):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        for name, value in small_params(C, cfg.head_size, i, L).items():
            sub, attr = name.split(".")
            target = getattr(block, sub)
            if hasattr(target, attr):
                put(getattr(target, attr), value)
        for x in ("w", "a", "v", "g"):
            if hasattr(att, f"{x}1"):
                getattr(att, f"{x}1").zero_()
                second = getattr(att, f"{x}2")
                put(second, _orthogonal(tuple(second.shape), 0.1, g))
        att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
        att.ln_x.bias.zero_()
        put(att.receptance.weight, _orthogonal((C, C), 1.0, g))
        put(att.value.weight, _orthogonal((C, C), 1.0, g))
        put(att.key.weight, _orthogonal((C, C), 0.1, g))
        att.output.weight.zero_()
        put(ffn.key.weight, _orthogonal(tuple(ffn.key.weight.shape), 1.0, g))
        ffn.value.weight.zero_()
    put(model.head.weight, _orthogonal((V, C), 0.5 * (math.sqrt(V / C) if V > C else 1.0), g))


def random_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random RWKV-7 checkpoint with official keys and shapes, every tensor non-trivial.

    Decays span the whole clamp range, LoRAs are non-zero, and the logits are
    of order one.  For tests and benchmarks only.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = config.expected_shapes()
    C = config.n_embd

    def rn(shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def ru(shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        name = key.rsplit(".", 2)
        leaf = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else key.split(".")[-2] + "." + key.split(".")[-1]
        if key in ("emb.weight",):
            t = rn(shape, 0.5)
        elif leaf.endswith(".weight") and leaf.split(".")[0] in ("ln0", "ln1", "ln2", "ln_out", "ln_x"):
            t = ru(shape, 0.5, 1.5)
        elif leaf.endswith(".bias"):
            t = rn(shape, 0.1)
        elif leaf.startswith("x_"):
            t = ru(shape)
        elif leaf in ("w0",):
            t = rn(shape, 1.5)  # sigmoid spans most of (0, 1): decays from ~0.55 to ~1
        elif leaf in ("a0", "v0"):
            t = rn(shape, 1.0)
        elif leaf in ("w1", "a1", "v1", "g1"):
            t = rn(shape, 1.0 / math.sqrt(shape[0]))
        elif leaf in ("w2", "a2", "v2", "g2"):
            t = rn(shape, 1.0 / math.sqrt(shape[0]))
        elif leaf == "k_k":
            t = ru(shape, 0.5, 1.2)
        elif leaf == "k_a":
            t = ru(shape, 0.5, 1.5)
        elif leaf == "r_k":
            t = rn(shape, 0.3)
        elif leaf.endswith(".weight"):
            t = rn(shape, 1.0 / math.sqrt(shape[1]))
        else:  # pragma: no cover - every official key is covered above
            raise AssertionError(key)
        del name
        sd[key] = t
    del C
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
