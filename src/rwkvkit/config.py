"""Model hyper-parameters shared by every generation, inferred from tensor shapes.

RWKV checkpoints do not store their hyper-parameters; every official loader
recovers them from the shapes of a few tensors (spec section 3.1).  rwkvkit does
the same and never asks the user to type a size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from .errors import CheckpointError, ShapeError

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ModelConfig:
    """What every RWKV generation shares: depth, width, vocabulary, LayerNorm eps.

    Each generation subclasses it beside its model (``rwkvkit.models.rwkv4``,
    ``rwkvkit.models.rwkv7``) with its own fields and shape rules; the class
    attribute ``generation`` says which one a config describes.  Generic code
    (generate, serve, eval, train) reads only the fields here.  Configs are
    read off a checkpoint's tensor shapes, never typed by hand.
    """

    # Architecture generation ("4", "7", ...); set by each subclass.
    generation: ClassVar[str] = ""
    # Fields that are numerical conventions, not architecture (not read off shapes).
    NUMERICS: ClassVar[tuple[str, ...]] = ("layer_norm_eps",)

    # Number of residual blocks (L).
    n_layer: int
    # Width of the residual stream and of every LayerNorm (C).
    n_embd: int
    # Vocabulary size: rows of `emb.weight` and of `head.weight` (V).
    vocab_size: int
    # Epsilon of every LayerNorm (PyTorch's default, used by all official code).
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if type(self) is ModelConfig:
            raise TypeError(
                "ModelConfig is the base shared by every generation; build a generation's config, "
                "e.g. rwkvkit.RWKV4Config(...) or rwkvkit.RWKV7Config(...)"
            )
        for name in ("n_layer", "n_embd", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def num_params(self) -> int:
        """Parameter count, from the expected shapes."""
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def state_bytes_per_sequence(self) -> int:  # pragma: no cover - abstract
        """Bytes of the fp32 RNN state of one sequence."""
        raise NotImplementedError

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """This class's config from a dict (config.json); unknown fields are an error."""
        data = {k: v for k, v in data.items() if k not in ("generation", "version")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"config.json has unknown fields {unknown}; expected a subset of {sorted(known)}")
        missing = [n for n in ("n_layer", "n_embd", "vocab_size") if n not in data]
        if missing:
            raise CheckpointError(f"config.json lacks the fields {missing}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # --------------------------------------------------------------- inference
    def validate_tensors(self, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Every expected key present with its exact shape, nothing else, floats only."""
        expected = self.expected_shapes()
        for key, shape in expected.items():
            if key not in tensors:
                raise CheckpointError(f"'{source}' is missing tensor '{key}' (expected shape {shape})")
            got = tuple(tensors[key].shape)
            if got != shape:
                raise ShapeError(f"'{source}': tensor '{key}' has shape {got}, expected {shape}")
            if not tensors[key].is_floating_point():
                raise CheckpointError(
                    f"'{source}': tensor '{key}' has dtype {dtype_name(tensors[key].dtype)}, expected a float type"
                )
        extra = sorted(set(tensors) - set(expected))
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise CheckpointError(
                f"'{source}' has unexpected tensors {extra[:5]}{more}; not a plain RWKV-{self.generation} checkpoint"
            )


def count_layers(sd: Mapping[str, Any]) -> int:
    """L from the ``blocks.{i}.`` keys; every block from 0 to L-1 must be present."""
    layers = {int(m.group(1)) for k in sd for m in [_BLOCK_RE.match(k)] if m}
    if not layers:
        raise CheckpointError("no 'blocks.N.' tensors: not an RWKV state dict")
    n_layer = max(layers) + 1
    holes = sorted(set(range(n_layer)) - layers)
    if holes:
        raise CheckpointError(f"missing tensors for block(s) {holes} (found blocks up to {n_layer - 1})")
    return n_layer


def require(sd: Mapping[str, Any], *keys: str, what: str) -> None:
    for key in keys:
        if key not in sd:
            raise CheckpointError(f"missing tensor '{key}': not an {what} state dict")


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
