"""The RNN state: named, batched fp32 tensors, one layout per family of generations.

Generic code (generate, serve, eval, training) treats a state as an opaque
object with batch operations: :meth:`select`, :meth:`concat`, :meth:`expand`,
:meth:`clone`, :meth:`detach`, :meth:`to`, :attr:`nbytes`, :meth:`save` and
:meth:`load`.  Only a model (and the interop converters below) knows the
fields.  Two layouts exist:

- :class:`State` (RWKV-4): per layer and sequence five vectors (rwkv4 spec
  2.5): the previous token's LN1 output, the WKV numerator ``aa``,
  denominator ``bb`` and shared log-scale ``pp``, and the previous token's LN2
  output.
- :class:`MatrixState` (RWKV-5, -6 and -7): the two token-shift vectors and
  one N x N fp32 matrix per head (rwkv5-7 spec 5.1), whose orientation is the
  `rwkv` package's for that generation (v7: ``[value][key]``).

Layers are stacked, so every field is one tensor whose first two axes are
``[n_layer, batch]``.  Everything is float32 whatever the weights' dtype.
Saved files record the generation; loading a state into a model of another
generation or shape is refused by :meth:`check_like`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from .errors import RwkvkitError

# Initial value of the RWKV-4 WKV log-scale: exp(pp - anything) underflows to
# exactly 0, so the first token's update gives aa = v, bb = 1, pp = k exactly.
# The `rwkv` package and HF's model-level state use the same value.
PP_INIT = -1e30


class StateBase:
    """Batch operations shared by every layout (fields are dataclass fields).

    Subclasses are dataclasses whose fields are tensors ``[n_layer, batch, ...]``
    plus, for shared layouts, the non-tensor ``generation`` field.
    """

    # Name of the layout in saved files.
    LAYOUT: ClassVar[str] = ""

    # -------------------------------------------------------------- structure
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "generation")

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self.field_names())

    def _extra(self) -> dict:
        return {"generation": self.generation} if "generation" in {f.name for f in fields(self)} else {}

    def _map(self, fn) -> "StateBase":
        return type(self)(*(fn(t) for t in self.tensors()), **self._extra())

    @property
    def n_layer(self) -> int:
        return self.tensors()[0].shape[0]

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def describe(self) -> str:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(self.field_names(), self.tensors()))
        return f"RWKV-{self.generation} {type(self).__name__}({shapes})"

    # -------------------------------------------------------------- operations
    def clone(self):
        """An independent copy (the forward pass never mutates its input state,
        but a caller that edits tensors in place should work on a clone)."""
        return self._map(lambda t: t.clone())

    def detach(self):
        """Cut the autograd graph (truncated back-propagation through time)."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str):
        return self._map(lambda t: t.to(device))

    def select(self, index: "int | Sequence[int] | torch.Tensor | slice"):
        """Rows of the batch: ``state.select(2)`` keeps row 2 (batch of 1),
        ``state.select([0, 3])`` rows 0 and 3."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if isinstance(index, slice):
            return self._map(lambda t: t[:, index])
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._map(lambda t: t.index_select(1, idx))

    @staticmethod
    def concat(states: Sequence["StateBase"]):
        """Stack the batches of several states (same model) into one."""
        if not states:
            raise ValueError("State.concat needs at least one state")
        first = states[0]
        for s in states[1:]:
            if type(s) is not type(first) or s._extra() != first._extra() or any(
                a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:] for a, b in zip(s.tensors(), first.tensors())
            ):
                raise ValueError(f"State.concat: states come from models of different shapes ({s.describe()} vs {first.describe()})")
        return type(first)(*(torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in states))), **first._extra())

    def expand(self, batch: int):
        """Repeat a batch-1 state ``batch`` times (a shared prompt prefix)."""
        if self.batch_size != 1:
            raise ValueError(f"State.expand needs a batch of 1, this state has {self.batch_size}")
        return self._map(lambda t: t.expand(-1, batch, *t.shape[2:]).contiguous())

    def allclose(self, other: "StateBase", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        return type(self) is type(other) and all(
            torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(self.tensors(), other.tensors())
        )

    def check_like(self, template: "StateBase", batch: int | None = None) -> None:
        """Raise a clear error unless this state has ``template``'s generation,
        layout and per-field shapes (the batch may differ unless ``batch`` is given)."""
        if type(self) is not type(template) or self.generation != template.generation:
            raise RwkvkitError(
                f"this state is from an RWKV-{self.generation} model ({type(self).__name__}); "
                f"the model is RWKV-{template.generation} and needs a {type(template).__name__}"
            )
        B = self.batch_size
        for name, t, ref in zip(self.field_names(), self.tensors(), template.tensors()):
            exp = (ref.shape[0], B if batch is None else batch, *ref.shape[2:])
            if tuple(t.shape) != exp:
                raise RwkvkitError(
                    f"state field '{name}' has shape {tuple(t.shape)}, expected {exp} for this model and batch"
                )

    # ------------------------------------------------------------ save / load
    def save(self, path: "str | os.PathLike[str]") -> None:
        """Write the state to a safetensors file, atomically, with its generation."""
        from safetensors.torch import save_file

        from .io_utils import atomic_path

        tensors = {name: t.detach().contiguous().cpu() for name, t in zip(self.field_names(), self.tensors())}
        meta = {"format": "rwkvkit-state", "generation": str(self.generation), "layout": self.LAYOUT}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]", device=None) -> "StateBase":
        """Read a state written by :meth:`save` (any layout; the file says which)."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise RwkvkitError(f"state file '{path}' is a directory, expected a .safetensors file written by State.save")
        if not path.is_file():
            raise RwkvkitError(f"state file '{path}' does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "rwkvkit-state":
                    raise RwkvkitError(f"'{path}' is not an rwkvkit state file (metadata format={meta.get('format')!r})")
                # Files from before the generation field hold RWKV-4 states ("version": "4").
                generation = meta.get("generation", meta.get("version", "4"))
                layout = meta.get("layout", State.LAYOUT)
                kind = _LAYOUTS.get(layout)
                if kind is None:
                    raise RwkvkitError(f"'{path}' holds a state of unknown layout {layout!r}")
                names = kind.field_names()
                have = set(f.keys())
                if set(names) != have:
                    raise RwkvkitError(f"'{path}' holds fields {sorted(have)}, expected {sorted(names)} for a {layout} state")
                tensors = [f.get_tensor(name).float() for name in names]
        except RwkvkitError:
            raise
        except Exception as exc:  # safetensors raises several types for bad files
            raise RwkvkitError(f"cannot read state file '{path}': {exc}") from None
        st = kind(*tensors, **({"generation": generation} if kind is not State else {}))
        if kind is State and generation != "4":
            raise RwkvkitError(f"'{path}' says generation {generation!r} but holds an RWKV-4 layout")
        return st.to(device) if device is not None else st


@dataclass
class State(StateBase):
    """Batched RWKV-4 state.

    Shapes (L = layers, B = batch, C = n_embd, A = dim_att), all float32:

    - ``att_x``  [L, B, C]  LN1 output of the previous token (time-mix shift)
    - ``att_aa`` [L, B, A]  WKV numerator, scaled by exp(-pp)
    - ``att_bb`` [L, B, A]  WKV denominator, scaled by exp(-pp)
    - ``att_pp`` [L, B, A]  WKV log-scale (running max exponent)
    - ``ffn_x``  [L, B, C]  LN2 output of the previous token (channel-mix shift)
    """

    LAYOUT: ClassVar[str] = "rwkv4"
    generation: ClassVar[str] = "4"

    att_x: torch.Tensor
    att_aa: torch.Tensor
    att_bb: torch.Tensor
    att_pp: torch.Tensor
    ffn_x: torch.Tensor

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

    def check(self, n_layer: int, n_embd: int, dim_att: int, batch: int | None = None) -> None:
        """Raise a clear error if this state does not belong to such an RWKV-4 model."""
        self.check_like(State.zeros(n_layer, 1, n_embd, dim_att, device="meta"), batch=batch)

    # ------------------------------------------------------ other formats
    def to_rwkv_pip(self, row: int = 0) -> list[torch.Tensor]:
        """The `rwkv` pip package's v4 state list for one batch row:
        5L tensors, index 5l+j with j = att_x, aa, bb, pp, ffn_x (spec 2.5)."""
        out: list[torch.Tensor] = []
        for l in range(self.n_layer):
            for t in self.tensors():
                out.append(t[l, row].clone())
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


@dataclass
class MatrixState(StateBase):
    """Batched state of RWKV-5, -6 and -7.

    Shapes (L = layers, B = batch, C = n_embd, H heads of size N), all float32:

    - ``att_x``  [L, B, C]        LN1 output of the previous token (time-mix shift)
    - ``att_kv`` [L, B, H, N, N]  the WKV matrix of each head; RWKV-7 stores
      S[value][key] (the `rwkv` package's and rwkv.cpp's orientation; fla's is
      the transpose), RWKV-5/6 S[key][value]
    - ``ffn_x``  [L, B, C]        LN2 output of the previous token (channel-mix shift)
    """

    LAYOUT: ClassVar[str] = "matrix"

    att_x: torch.Tensor
    att_kv: torch.Tensor
    ffn_x: torch.Tensor
    # Which generation's maths this state belongs to ("5", "6" or "7").
    generation: str = "7"

    @classmethod
    def zeros(cls, n_layer: int, batch: int, n_embd: int, n_head: int, head_size: int, generation: str,
              device: torch.device | str | None = None) -> "MatrixState":
        """The state of an empty context: all zeros (every implementation agrees)."""
        kw = dict(dtype=torch.float32, device=device)
        return cls(
            att_x=torch.zeros(n_layer, batch, n_embd, **kw),
            att_kv=torch.zeros(n_layer, batch, n_head, head_size, head_size, **kw),
            ffn_x=torch.zeros(n_layer, batch, n_embd, **kw),
            generation=str(generation),
        )

    # ------------------------------------------------------ other formats
    def to_rwkv_pip(self, row: int = 0) -> list[torch.Tensor]:
        """The `rwkv` pip package's state list for one batch row: 3L tensors,
        index 3l+0 att_x (C), 3l+1 the WKV matrix (H, N, N) fp32, 3l+2 ffn_x
        (C) (spec 5.1; same orientation as rwkvkit's)."""
        out: list[torch.Tensor] = []
        for l in range(self.n_layer):
            out += [self.att_x[l, row].clone(), self.att_kv[l, row].clone(), self.ffn_x[l, row].clone()]
        return out

    @classmethod
    def from_rwkv_pip(cls, tensors: Sequence[torch.Tensor], generation: str = "7") -> "MatrixState":
        if len(tensors) % 3:
            raise ValueError(f"an rwkv-package v5/v6/v7 state has 3 tensors per layer, got {len(tensors)}")
        L = len(tensors) // 3
        att_x = torch.stack([tensors[3 * l].float().reshape(-1) for l in range(L)])[:, None]
        kv = torch.stack([tensors[3 * l + 1].float() for l in range(L)])[:, None]
        ffn_x = torch.stack([tensors[3 * l + 2].float().reshape(-1) for l in range(L)])[:, None]
        return cls(att_x, kv, ffn_x, generation=str(generation))


State4 = State
_LAYOUTS: dict[str, type[StateBase]] = {State.LAYOUT: State, MatrixState.LAYOUT: MatrixState}

__all__ = ["StateBase", "State", "State4", "MatrixState", "PP_INIT"]
