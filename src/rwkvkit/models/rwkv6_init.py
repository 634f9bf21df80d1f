"""RWKV-6 initial weights: the official x060 recipe, and random checkpoints for tests.

:func:`init_weights` follows RWKV-LM's x060 trainer with its
``generate_init_weight`` pass for the matrices (rwkv5-7 spec 8.1; the matrix
rules are RWKV-5's, :func:`.rwkv5_init.init_matrices`).
:func:`random_state_dict` makes every tensor non-trivial (no zero LoRAs) so
that tests exercise every path, data-dependent decays from ~1 to ~0 included.
"""

from __future__ import annotations

import torch

from .rwkv5_init import decay_speed, faaaa, init_matrices, put, random_tensor, ratios


def small_params(config, layer_id: int) -> dict[str, torch.Tensor]:
    """The x060 trainer's per-channel parameters of one layer, official shapes (spec 8.1)."""
    C, A, H = config.n_embd, config.dim_att, config.n_head
    r01, r10 = ratios(layer_id, config.n_layer)
    ddd = torch.arange(C, dtype=torch.float64) / C
    vec = lambda t, n=C: t.float().reshape(1, 1, n)  # noqa: E731
    return {
        "att.time_maa_x": vec(1 - ddd**r10),
        "att.time_maa_w": vec(1 - ddd**r10),
        "att.time_maa_k": vec(1 - ddd**r10),
        "att.time_maa_v": vec(1 - (ddd**r10 + 0.3 * r01)),
        "att.time_maa_r": vec(1 - ddd ** (0.5 * r10)),
        "att.time_maa_g": vec(1 - ddd ** (0.5 * r10)),
        "att.time_decay": vec(decay_speed(A, r01), A),
        "att.time_faaaa": faaaa(A, r01).float().reshape(H, -1),
        "ffn.time_maa_k": vec(1 - ddd ** (r10**3)),
        "ffn.time_maa_r": vec(1 - ddd ** (r10**3)),
    }


@torch.no_grad()
def init_weights(model, seed: int = 0, **_unused) -> None:
    """Initialise an :class:`~rwkvkit.models.rwkv6.RWKV6` in place (spec 8.1):
    the small parameters above; time_maa_w1 and time_decay_w1 zero,
    time_maa_w2 and time_decay_w2 U(-0.01, 0.01); matrices as RWKV-5."""
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.blocks):
        att = block.att
        for name, value in small_params(model.config, i).items():
            sub, attr = name.split(".")
            put(getattr(getattr(block, sub), attr), value)
        att.time_maa_w1.zero_()
        att.time_decay_w1.zero_()
        for p in (att.time_maa_w2, att.time_decay_w2):
            put(p, torch.rand(tuple(p.shape), generator=g) * 0.02 - 0.01)
    init_matrices(model, g)


def random_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random RWKV-6 checkpoint with official keys and shapes, every tensor non-trivial.

    The data-dependent decays span ~0.999 to ~1e-9; LoRAs are non-zero and
    the logits of order one.  For tests and benchmarks only.
    """
    g = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, shape, g).to(dtype).contiguous() for k, shape in config.expected_shapes().items()}
