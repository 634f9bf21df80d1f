"""Initial weights for every generation: the official recipes, and random checkpoints for tests.

Dispatches on the generation; the recipes live beside their models
(:mod:`rwkvkit.models.rwkv4_init`, :mod:`rwkvkit.models.rwkv7_init`).
"""

from __future__ import annotations

import torch

from . import models
from .models.rwkv4_init import decay_init, first_init, mix_init  # noqa: F401  (RWKV-4 formulas, public)


def init_weights(model, seed: int = 0, **options) -> None:
    """Initialise ``model`` in place with its generation's official recipe."""
    models.spec_of(model).init_weights(model, seed=seed, **options)


def random_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random checkpoint with official keys and shapes for ``config``'s generation (tests, benchmarks)."""
    return models.spec(config.generation).random_state_dict(config, seed=seed, dtype=dtype)


__all__ = ["init_weights", "random_state_dict"]
