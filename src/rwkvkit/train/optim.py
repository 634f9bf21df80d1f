"""The optimisation side of the paper's recipe (spec 4.2 and 4.3).

- :func:`param_groups` / :func:`model_param_groups`: weight decay only on
  matrices, per-generation learning-rate multipliers (RWKV-4 ``time_decay``
  x2 and ``time_first`` x3; RWKV-7 ``att.w0`` x2 and decay only on ``.weight``
  matrices, rwkv5-7 spec 8.2).
- :func:`lr_at`: warm-up, an optional constant phase, then exponential (the
  RWKV-LM v4neo schedule) or cosine decay to ``lr_final``.
- :func:`build_optimizer`: Adam(W) with betas (0.9, 0.99), eps 1e-8.
- :class:`L2Wrap`: the auxiliary gradient that keeps the largest logit small.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn


# RWKV-4's multipliers (RWKV-LM v4neo): the default for models without a registry module.
V4_LR_SCALES = {"time_decay": 2.0, "time_first": 3.0}


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float = 0.0,
    layerwise_lr: bool = True,
    lr_scales: Mapping[str, float] | None = None,
    decay_weights_only: bool = False,
) -> list[dict]:
    """Split trainable parameters into optimiser groups.

    Each group carries ``lr_scale`` (multiplied into the scheduled learning
    rate) and its ``weight_decay``.  Only tensors with two or more non-singleton
    dimensions are decayed — the matrices, including emb and head; never
    LayerNorms or the ``time_*`` vectors (whose (1, 1, C) shape is one
    non-singleton dimension).  ``decay_weights_only`` (RWKV-7, spec 8.2)
    further restricts decay to tensors named ``.weight`` (the projections, emb
    and head), leaving the LoRA factors w1/w2, a1/a2, ... and ``r_k`` undecayed.

    With ``layerwise_lr`` a parameter whose name ends with a key of
    ``lr_scales`` learns at that multiple of the base rate: the generation
    module's ``LR_SCALES`` (RWKV-4 ``time_decay`` 2x and ``time_first`` 3x,
    the default; RWKV-7 ``att.w0`` 2x).
    """
    scales = dict(V4_LR_SCALES if lr_scales is None else lr_scales)
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        scale = 1.0
        if layerwise_lr:
            scale = next((s for suffix, s in scales.items() if name.endswith(suffix)), 1.0)
        is_matrix = sum(1 for s in p.shape if s > 1) >= 2
        if decay_weights_only and ".weight" not in name:
            is_matrix = False
        wd = weight_decay if (is_matrix and weight_decay > 0) else 0.0
        buckets.setdefault((scale, wd), []).append(p)
        names.setdefault((scale, wd), []).append(name)
    return [
        {"params": ps, "lr_scale": scale, "weight_decay": wd, "names": names[(scale, wd)]}
        for (scale, wd), ps in sorted(buckets.items())
    ]


def model_param_groups(model: nn.Module, weight_decay: float = 0.0, layerwise_lr: bool = True) -> list[dict]:
    """:func:`param_groups` with the rules of ``model``'s generation.

    ``model`` may be wrapped (peft, state tuning, FSDP); the rules come from
    the registry module of the RWKV inside (``LR_SCALES``; RWKV-7 decays only
    ``.weight`` matrices).  A model that is not an RWKV (a baseline) gets
    RWKV-4's rules, as before generations existed.
    """
    from ..models import spec_of
    from ..models.common import RWKVBase

    base = model
    for _ in range(8):  # peel StateTuner / peft / DDP wrappers
        if isinstance(base, RWKVBase):
            break
        nxt = getattr(base, "model", None) if isinstance(getattr(base, "model", None), nn.Module) else None
        if nxt is None and hasattr(base, "get_base_model"):
            nxt = base.get_base_model()
        if nxt is None and isinstance(getattr(base, "module", None), nn.Module):
            nxt = base.module
        if nxt is None:
            break
        base = nxt
    if not isinstance(base, RWKVBase):
        return param_groups(model.named_parameters(), weight_decay, layerwise_lr)
    spec = spec_of(base)
    return param_groups(
        model.named_parameters(),
        weight_decay,
        layerwise_lr,
        lr_scales=getattr(spec, "LR_SCALES", V4_LR_SCALES),
        decay_weights_only=base.generation != "4",
    )


def build_optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Adam with the paper's betas; AdamW (decoupled decay) when any group decays."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if any(g["weight_decay"] > 0 for g in groups):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)


def lr_at(
    step: int,
    *,
    lr_init: float,
    lr_final: float,
    total_steps: int,
    warmup_steps: int = 0,
    hold_steps: int = 0,
    schedule: str = "exp",
) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    - Warm-up (RWKV-LM v4neo): during the first ``warmup_steps`` steps the rate
      is multiplied by 0.2 + 0.8 * step / warmup_steps.
    - Constant at ``lr_init`` until step ``hold_steps`` (the paper's "warm-up
      mini-epochs", spec 4.2 and 10.11).
    - Then decay over the remaining steps so that the last step
      (``total_steps - 1``) gets exactly ``lr_final``; with progress
      p in [0, 1]: ``"exp"`` lr_init * (lr_final / lr_init) ** p (v4neo),
      ``"cosine"`` lr_final + (lr_init - lr_final) (1 + cos(pi p)) / 2,
      ``"constant"`` lr_init throughout.
    """
    if schedule not in ("exp", "cosine", "constant"):
        raise ValueError(f"schedule must be 'exp', 'cosine' or 'constant', got {schedule!r}")
    span = total_steps - 1 - hold_steps
    p = 1.0 if span <= 0 else min(max((step - hold_steps) / span, 0.0), 1.0)
    if schedule == "constant" or lr_final == lr_init:
        lr = lr_init
    elif schedule == "exp":
        lr = lr_init * math.exp(math.log(lr_final / lr_init) * p)
    else:
        lr = lr_final + (lr_init - lr_final) * 0.5 * (1.0 + math.cos(math.pi * p))
    if warmup_steps > 0 and step < warmup_steps:
        lr *= 0.2 + 0.8 * step / warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; adds the PaLM-style auxiliary gradient (spec 4.3).

    ``L2Wrap.apply(loss, logits)`` returns ``loss``.  In the backward pass the
    logits [B, T, V] receive, at each position's arg-max entry only, an extra
    gradient ``factor * max_j y_{t,j} / (B * T)``, i.e. the gradient of
    ``factor * mean_t (max_j y_{t,j})^2 / 2``: it pulls the largest logit toward
    0 and keeps logits small for bf16.  Unlike RWKV-LM we multiply it by the
    incoming gradient, so scaling the loss (gradient accumulation, loss
    scaling) scales the auxiliary term with it and the total stays the exact
    gradient of ``loss + aux``.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, factor: float = 1e-4) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (logits,) = ctx.saved_tensors
        n = logits.numel() // logits.shape[-1]  # B * T positions
        top, idx = torch.max(logits.detach(), dim=-1, keepdim=True)
        g = torch.zeros_like(logits).scatter_(-1, idx, top * (ctx.factor / n))
        return grad_output, g * grad_output, None


def l2wrap(loss: torch.Tensor, logits: torch.Tensor, factor: float = 1e-4) -> torch.Tensor:
    """``loss`` with :class:`L2Wrap`'s auxiliary gradient attached to ``logits``."""
    if factor == 0:
        return loss
    return L2Wrap.apply(loss, logits, factor)
