"""What every generation's model shares: the protocol the rest of rwkvkit sees.

Generic code (generate, serve, eval, the lm-eval adapter, training) uses only

- ``model(tokens, state, logits="all" | "last" | "none") -> (logits, state)``,
- ``model.new_state(batch)``, ``model.check_state(state, batch)``,
- ``model.config`` (its :class:`~rwkvkit.config.ModelConfig` base fields),
  ``model.device``, ``model.dtype``, ``model.blocks`` (each with ``.att`` and
  ``.ffn``, the units of gradient checkpointing and FSDP),

and the state's batch operations.  :class:`RWKVBase` implements the parts that
do not depend on the generation: input checks, the embedding with ``ln0``,
the output head, and the hook through which an inference accelerator
(:mod:`rwkvkit.runtime`) takes over the one-token step.  Models never import
the runtime: it attaches itself with :func:`rwkvkit.runtime.accelerate`.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RwkvkitError

LogitsMode = Literal["all", "last", "none"]

# Below this many rows a product of fp32 activations with a half weight runs
# in the weight's dtype (the activations rounded once) instead of widening the
# whole weight: a one-row head product would otherwise write an fp32 copy of a
# [65536, C] matrix per token.
WIDEN_MIN_ROWS = 16


class Linear(nn.Linear):
    """``nn.Linear`` that also takes activations of another float dtype.

    With matching dtypes it is ``nn.Linear`` exactly.  Where a half-precision
    model runs its prompt with fp32 activations (:attr:`RWKVBase.prompt_dtype`)
    the weight is widened for the product (exact: every bf16/fp16 value is a
    float), so the product is an fp32 GEMM with fp32 accumulation; for fewer
    than ``WIDEN_MIN_ROWS`` rows the activations are rounded to the weight's
    dtype instead.  The result has the activations' dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            return F.linear(x, w, self.bias)
        b = self.bias
        if x.numel() >= WIDEN_MIN_ROWS * x.shape[-1]:
            return F.linear(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None)
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose affine parameters follow the input's dtype when they differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype) if b is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose affine parameters follow the input's dtype when they differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype) if b is not None else None
        return F.group_norm(x, self.num_groups, w, b, self.eps)


def like(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Parameter ``p`` in the dtype of activations ``x`` (itself when they match)."""
    return p if p.dtype == x.dtype else p.to(x.dtype)


def shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Token shift (RWKV-4 paper 4.2): the previous token's vector at every position.

    x [B, T, C]; prev [B, C] is the last vector of the previous chunk (zeros at
    the start of a text).  Returns [B, T, C] = [prev, x_0, ..., x_{T-2}].
    """
    if x.shape[1] == 1:
        return prev.to(x.dtype).unsqueeze(1)
    return torch.cat([prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


class RWKVBase(nn.Module):
    """Shared machinery; subclasses define ``__init__`` (emb, blocks, ln_out,
    head), ``new_state`` and ``_forward_blocks``."""

    config: object
    emb: nn.Embedding
    blocks: nn.ModuleList
    ln_out: nn.LayerNorm
    head: nn.Module

    def _init_common(self) -> None:
        # Embedding table with ln0 already applied (see fold_ln0); not saved.
        self.register_buffer("emb_folded", None, persistent=False)
        # The RNN step (T == 1) without autograd: "auto" lets an attached
        # accelerator (rwkvkit.runtime) run it where it can, "torch" always
        # runs the modules.  Both compute the same maths.
        self.decode_backend = "auto"
        # Set by rwkvkit.runtime.accelerate: (model, tokens, state, want_logits)
        # -> (logits, state) or None when it cannot run this call.
        self.step_accelerator: Callable | None = None
        self._decode_plan = None
        # Activations' dtype for prompts (T > 1) run without autograd; None =
        # the weights' dtype.  rwkvkit.runtime.accelerate sets float32 for a
        # half model on a CPU without a native half matmul: the products then
        # widen the weights (Linear above) and the element-wise work runs in
        # fp32, which there is faster than bf16/fp16 arithmetic and exact-er.
        self.prompt_dtype: torch.dtype | None = None

    # ------------------------------------------------------------ conveniences
    @property
    def generation(self) -> str:
        return self.config.generation

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_state(self, state, batch: int | None = None) -> None:
        """Raise a clear error unless ``state`` fits this model (generation,
        layout, shapes; and ``batch`` rows when given)."""
        state.check_like(self._state_template(), batch=batch)

    def _state_template(self):
        with torch.device("meta"):
            return self.new_state(1)

    def for_training(self) -> "RWKVBase":
        """Drop inference-only numerics (folded ln0 and the like); in place."""
        self.emb_folded = None
        return self

    @torch.no_grad()
    def fold_ln0(self, dtype: "str | torch.dtype | None" = None) -> None:
        """Precompute LN0(emb) in ``dtype`` for inference (``None`` undoes it).

        The `rwkv` package folds ln0 into its embedding table in the
        checkpoint's dtype (bf16 for official RWKV-4/5/6 files), which rounds;
        folding in bf16 here reproduces it.  The stored parameters are
        unchanged, so saving a folded model writes the original weights.
        """
        from ..config import dtype_from_name

        if dtype is None:
            self.emb_folded = None
            return
        dt = dtype_from_name(dtype)
        ln0 = self.blocks[0].ln0
        folded = F.layer_norm(
            self.emb.weight.to(dt), (self.config.n_embd,), ln0.weight.to(dt), ln0.bias.to(dt), ln0.eps
        )
        self.emb_folded = folded.to(self.dtype)

    # ------------------------------------------------------------- pieces
    def check_tokens(self, tokens: torch.Tensor) -> None:
        vocab = self.config.vocab_size
        if tokens.dim() == 1:
            raise RwkvkitError(f"tokens must be a 2-D LongTensor [batch, time], got shape {tuple(tokens.shape)}; use tokens[None]")
        if tokens.dim() != 2:
            raise RwkvkitError(f"tokens must be a 2-D LongTensor [batch, time], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise RwkvkitError("tokens is empty (T = 0): give at least one token")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise RwkvkitError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise RwkvkitError(f"token id {bad} is out of range for this model's vocabulary of {vocab}")

    def embed(self, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """LN0(emb[tokens]) [B, T, C] (folded table when present), computed in
        ``dtype`` (default: the model's)."""
        if self.emb_folded is not None:
            x = F.embedding(tokens, self.emb_folded)
            return x if dtype is None else x.to(dtype)
        x = self.emb(tokens)
        return self.blocks[0].ln0(x if dtype is None else x.to(dtype))

    def output(self, x: torch.Tensor, logits: LogitsMode) -> torch.Tensor | None:
        if logits == "none":
            return None
        if logits == "last":
            x = x[:, -1:]
        return self.head(self.ln_out(x)).float()

    def _accelerated_allowed(self, tokens: torch.Tensor) -> bool:
        if self.decode_backend not in ("auto", "torch"):
            raise ValueError(f"decode_backend must be 'auto' or 'torch', got {self.decode_backend!r}")
        if self.step_accelerator is None or self.decode_backend == "torch":
            return False
        # An accelerated step records no autograd graph: only when none is wanted.
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters())

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, state=None, *, logits: LogitsMode = "all"):
        """Run ``tokens`` [B, T] from ``state`` (an empty context if None).

        Returns float32 logits — [B, T, V] for ``logits="all"``, [B, 1, V] for
        ``"last"`` (the head only where generation needs it), None for
        ``"none"`` — and the state after the last token.  The input state is not
        modified.
        """
        self.check_tokens(tokens)
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        B, T = tokens.shape
        if state is None:
            state = self.new_state(B)
        else:
            self.check_state(state, batch=B)
            if state.device != self.device:
                state = state.to(self.device)
        if T == 1 and self._accelerated_allowed(tokens):
            out = self.step_accelerator(self, tokens, state, logits != "none")
            if out is not None:
                return out
        pd = self.prompt_dtype
        wide = pd is not None and T > 1 and pd != self.dtype and not torch.is_grad_enabled()
        x, new_state = self.forward_blocks(self.embed(tokens, pd if wide else None), state)
        return self.output(x, logits), new_state

    def forward_blocks(self, x: torch.Tensor, state):  # pragma: no cover - abstract
        """The residual stream after every block, and the new state."""
        raise NotImplementedError
