"""Model hyper-parameters, always inferred from a checkpoint's tensor shapes.

RWKV checkpoints do not store their hyper-parameters; every official loader
recovers them from the shapes of a few tensors (spec section 3.1).  rwkvkit does
the same and never asks the user to type a size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import CheckpointError, ShapeError

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ModelConfig:
    """Shape and numerics of an RWKV-4 model.

    The first five fields are the architecture; they are read off a state dict
    by :meth:`from_state_dict`.  The last two are numerical conventions on which
    the official implementations differ (spec sections 3.4 and 3.5): they do not
    change the weights, only how the forward pass rounds.
    """

    # Number of residual blocks (L).
    n_layer: int
    # Width of the residual stream and of every LayerNorm (C).
    n_embd: int
    # Vocabulary size: rows of `emb.weight` and of `head.weight` (V).
    vocab_size: int
    # Width of the time-mix projections and of the WKV state (C_att); equal to
    # n_embd in every official RWKV-4 model.
    dim_att: int = 0
    # Hidden width of the channel-mix (F); 4 * n_embd in every official model.
    dim_ffn: int = 0
    # Architecture generation.  Only "4" runs today; others are refused on load.
    version: str = "4"
    # LayerNorm epsilon of every LayerNorm (PyTorch's default, used by all
    # official RWKV-4 code).
    layer_norm_eps: float = 1e-5
    # RESCALE period R (spec 3.4): when > 0, the outputs of att.output and
    # ffn.value in layer l are divided by 2**(l // R) and the residual stream is
    # halved after every R-th layer.  0 disables it (the `rwkv` package with an
    # fp32/bf16 strategy, HF with rescale_every=0).  6 matches HF's default in
    # eval mode and the `rwkv` package's fp16 strategies.  Only inference uses
    # it; it guards fp16 against overflow and changes fp32 logits by ~1e-5.
    rescale_every: int = 0
    # dtype in which the block-0 LayerNorm `ln0` is folded into the embedding
    # table at load time (spec 3.2 and 3.5).  None applies ln0 at run time, as
    # HF and the training code do.  "bfloat16" reproduces the `rwkv` package on
    # official bf16 checkpoints bit for bit (it folds in the file's dtype).
    ln0_fold_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dim_att <= 0:
            self.dim_att = self.n_embd
        if self.dim_ffn <= 0:
            self.dim_ffn = 4 * self.n_embd
        for name in ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.rescale_every < 0:
            raise ValueError(f"ModelConfig.rescale_every must be >= 0, got {self.rescale_every}")
        if self.ln0_fold_dtype is not None:
            dtype_from_name(self.ln0_fold_dtype)  # validates

    # ------------------------------------------------------------------ sizes
    @property
    def num_params(self) -> int:
        """Parameter count: 2VC + L(4 C C_att + 2 C F + C^2) + vectors (spec 1.5)."""
        C, A, F, V, L = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size, self.n_layer
        per_layer = 4 * C * A + 2 * C * F + C * C + 4 * C + 2 * A + 5 * C
        return 2 * V * C + L * per_layer + 4 * C

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of the fp32 RNN state of one sequence: L * (2C + 3 C_att) * 4."""
        return self.n_layer * (2 * self.n_embd + 3 * self.dim_att) * 4

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"config.json has unknown fields {unknown}; expected a subset of {sorted(known)}")
        missing = [n for n in ("n_layer", "n_embd", "vocab_size") if n not in data]
        if missing:
            raise CheckpointError(f"config.json lacks the fields {missing}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # --------------------------------------------------------------- inference
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "ModelConfig":
        """Infer the architecture from official-name tensors (spec 3.1).

        Raises :class:`CheckpointError` naming the missing key, and
        :class:`ShapeError` naming the key and both shapes when a tensor does not
        fit the sizes read from the others.
        """
        for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise CheckpointError(f"missing tensor '{key}': not an RWKV-4 state dict")
        emb = sd["emb.weight"]
        if emb.dim() != 2:
            raise ShapeError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected 2 dimensions (vocab, n_embd)")
        vocab_size, n_embd = (int(s) for s in emb.shape)
        dim_att = int(sd["blocks.0.att.key.weight"].shape[0])
        dim_ffn = int(sd["blocks.0.ffn.key.weight"].shape[0])
        layers = {int(m.group(1)) for k in sd for m in [_BLOCK_RE.match(k)] if m}
        n_layer = max(layers) + 1
        holes = sorted(set(range(n_layer)) - layers)
        if holes:
            raise CheckpointError(f"missing tensors for block(s) {holes} (found blocks up to {n_layer - 1})")
        cfg = cls(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, dim_att=dim_att, dim_ffn=dim_ffn)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.__post_init__()
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every official key of this model and its shape (spec 3.1 table)."""
        C, A, F, V = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
        for i in range(self.n_layer):
            p = f"blocks.{i}."
            if i == 0:
                shapes[p + "ln0.weight"] = (C,)
                shapes[p + "ln0.bias"] = (C,)
            for ln in ("ln1", "ln2"):
                shapes[f"{p}{ln}.weight"] = (C,)
                shapes[f"{p}{ln}.bias"] = (C,)
            shapes[p + "att.time_decay"] = (A,)
            shapes[p + "att.time_first"] = (A,)
            for m in ("k", "v", "r"):
                shapes[f"{p}att.time_mix_{m}"] = (1, 1, C)
            shapes[p + "att.key.weight"] = (A, C)
            shapes[p + "att.value.weight"] = (A, C)
            shapes[p + "att.receptance.weight"] = (A, C)
            shapes[p + "att.output.weight"] = (C, A)
            shapes[p + "ffn.time_mix_k"] = (1, 1, C)
            shapes[p + "ffn.time_mix_r"] = (1, 1, C)
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.receptance.weight"] = (C, C)
            shapes[p + "ffn.value.weight"] = (C, F)
        shapes["ln_out.weight"] = (C,)
        shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (V, C)
        return shapes


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def dtype_from_name(name: "str | torch.dtype") -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16` ... -> `torch.bfloat16`."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of float32, float16, bfloat16, float64")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
