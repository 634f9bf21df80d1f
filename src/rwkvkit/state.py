"""The RNN state of an RWKV-4 model: five named fp32 tensors, batched.

Per layer and sequence the state is five vectors (spec 2.5): the previous
token's LN1 output (time-mix shift), the WKV numerator `aa`, denominator `bb`
and shared log-scale `pp`, and the previous token's LN2 output (channel-mix
shift).  rwkvkit stacks layers so each field is one tensor of shape
``[n_layer, batch, width]``.  Everything is float32 whatever the weights' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from .errors import RwkvkitError

# Initial value of the WKV log-scale: exp(pp - anything) underflows to exactly
# 0, so the first token's update gives aa = v, bb = 1, pp = k exactly.  The
# `rwkv` package and HF's model-level state use the same value.
PP_INIT = -1e30

_FIELDS = ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")


@dataclass
class State:
    """Batched RWKV-4 state.

    Shapes (L = layers, B = batch, C = n_embd, A = dim_att), all float32:

    - ``att_x``  [L, B, C]  LN1 output of the previous token (time-mix shift)
    - ``att_aa`` [L, B, A]  WKV numerator, scaled by exp(-pp)
    - ``att_bb`` [L, B, A]  WKV denominator, scaled by exp(-pp)
    - ``att_pp`` [L, B, A]  WKV log-scale (running max exponent)
    - ``ffn_x``  [L, B, C]  LN2 output of the previous token (channel-mix shift)
    """

    att_x: torch.Tensor
    att_aa: torch.Tensor
    att_bb: torch.Tensor
    att_pp: torch.Tensor
    ffn_x: torch.Tensor

    # ------------------------------------------------------------ construction
    @classmethod
    def zeros(
        cls,
        n_layer: int,
        batch: int,
        n_embd: int,
        dim_att: int | None = None,
        device: torch.device | str | None = None,
    ) -> "State":
        """The state of an empty context (spec 2.4): zeros, and pp = -1e30."""
        A = n_embd if dim_att is None else dim_att
        kw = dict(dtype=torch.float32, device=device)
        return cls(
            att_x=torch.zeros(n_layer, batch, n_embd, **kw),
            att_aa=torch.zeros(n_layer, batch, A, **kw),
            att_bb=torch.zeros(n_layer, batch, A, **kw),
            att_pp=torch.full((n_layer, batch, A), PP_INIT, **kw),
            ffn_x=torch.zeros(n_layer, batch, n_embd, **kw),
        )

    @classmethod
    def for_config(cls, config, batch: int = 1, device=None) -> "State":
        return cls.zeros(config.n_layer, batch, config.n_embd, config.dim_att, device=device)

    # ------------------------------------------------------------- properties
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in _FIELDS)

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    @property
    def batch_size(self) -> int:
        return self.att_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.att_x.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, fn) -> "State":
        return State(*(fn(t) for t in self.tensors()))

    # -------------------------------------------------------------- operations
    def clone(self) -> "State":
        """An independent copy (the forward pass never mutates its input state,
        but a caller that edits tensors in place should work on a clone)."""
        return self._map(lambda t: t.clone())

    def detach(self) -> "State":
        """Cut the autograd graph (truncated back-propagation through time)."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> "State":
        return self._map(lambda t: t.to(device))

    def select(self, index: "int | Sequence[int] | torch.Tensor | slice") -> "State":
        """Rows of the batch: ``state.select(2)`` keeps row 2 (batch of 1),
        ``state.select([0, 3])`` rows 0 and 3."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if isinstance(index, slice):
            return self._map(lambda t: t[:, index])
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._map(lambda t: t.index_select(1, idx))

    @staticmethod
    def concat(states: Sequence["State"]) -> "State":
        """Stack the batches of several states (same model) into one."""
        if not states:
            raise ValueError("State.concat needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.n_layer != first.n_layer or s.att_x.shape[2] != first.att_x.shape[2] or s.att_aa.shape[2] != first.att_aa.shape[2]:
                raise ValueError("State.concat: states come from models of different shapes")
        return State(*(torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in states))))

    def expand(self, batch: int) -> "State":
        """Repeat a batch-1 state ``batch`` times (a shared prompt prefix)."""
        if self.batch_size != 1:
            raise ValueError(f"State.expand needs a batch of 1, this state has {self.batch_size}")
        return self._map(lambda t: t.expand(-1, batch, -1).contiguous())

    def allclose(self, other: "State", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        return all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(self.tensors(), other.tensors()))

    def check(self, n_layer: int, n_embd: int, dim_att: int, batch: int | None = None) -> None:
        """Raise a clear error if this state does not belong to such a model."""
        want = {"att_x": n_embd, "att_aa": dim_att, "att_bb": dim_att, "att_pp": dim_att, "ffn_x": n_embd}
        B = self.batch_size
        for name in _FIELDS:
            t = getattr(self, name)
            exp = (n_layer, B if batch is None else batch, want[name])
            if tuple(t.shape) != exp:
                raise RwkvkitError(f"state field '{name}' has shape {tuple(t.shape)}, expected {exp} for this model and batch")

    # ------------------------------------------------------ other formats
    def to_rwkv_pip(self, row: int = 0) -> list[torch.Tensor]:
        """The `rwkv` pip package's v4 state list for one batch row:
        5L tensors, index 5l+j with j = att_x, aa, bb, pp, ffn_x (spec 2.5)."""
        out: list[torch.Tensor] = []
        for l in range(self.n_layer):
            for name in _FIELDS:
                out.append(getattr(self, name)[l, row].clone())
        return out

    @classmethod
    def from_rwkv_pip(cls, tensors: Sequence[torch.Tensor]) -> "State":
        if len(tensors) % 5:
            raise ValueError(f"an rwkv-package v4 state has 5 tensors per layer, got {len(tensors)}")
        L = len(tensors) // 5
        cols = [torch.stack([tensors[5 * l + j].float().reshape(-1) for l in range(L)])[:, None] for j in range(5)]
        return cls(*cols)

    def to_hf(self) -> list[torch.Tensor]:
        """HF `RwkvModel` state: [ffn_x, att_x, aa, bb, pp], each (B, C, L)."""
        order = ("ffn_x", "att_x", "att_aa", "att_bb", "att_pp")
        return [getattr(self, n).permute(1, 2, 0).contiguous() for n in order]

    @classmethod
    def from_hf(cls, tensors: Sequence[torch.Tensor]) -> "State":
        ffn_x, att_x, aa, bb, pp = (t.float().permute(2, 0, 1).contiguous() for t in tensors)
        return cls(att_x, aa, bb, pp, ffn_x)

    # ------------------------------------------------------------ save / load
    def save(self, path: "str | os.PathLike[str]") -> None:
        """Write the state to a safetensors file, atomically."""
        from safetensors.torch import save_file

        from .io_utils import atomic_path

        tensors = {name: t.detach().contiguous().cpu() for name, t in zip(_FIELDS, self.tensors())}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "rwkvkit-state", "version": "4"})

    @classmethod
    def load(cls, path: "str | os.PathLike[str]", device=None) -> "State":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RwkvkitError(f"state file '{path}' does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "rwkvkit-state":
                    raise RwkvkitError(f"'{path}' is not an rwkvkit state file (metadata format={meta.get('format')!r})")
                tensors = [f.get_tensor(name).float() for name in _FIELDS]
        except RwkvkitError:
            raise
        except Exception as exc:  # safetensors raises several types for bad files
            raise RwkvkitError(f"cannot read state file '{path}': {exc}") from None
        st = cls(*tensors)
        return st.to(device) if device is not None else st


def state_field_names() -> tuple[str, ...]:
    return _FIELDS


assert tuple(f.name for f in fields(State)) == _FIELDS
