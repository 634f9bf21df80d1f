"""RWKV-4 (Peng et al. 2023, arXiv 2305.13048, section 4): config and model.

One module, readable top to bottom: token shift, time mixing with the WKV
operator, channel mixing, pre-LN residual blocks.  Parameter names are
BlinkDL's official ones, so ``model.load_state_dict(official_sd)`` is the
identity.  The same ``forward`` is the parallel form (T > 1, for training and
prompts) and the recurrent form (T = 1, one RNN step); both carry a
:class:`~rwkvkit.state.State`.  For inference on the CPU the RNN step can run
as one fused C++ call (:mod:`rwkvkit.runtime`, same maths), attached by
:func:`rwkvkit.runtime.accelerate` (``rwkvkit.load`` does it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from .. import ops
from ..config import ModelConfig, count_layers, dtype_from_name, require
from ..errors import RwkvkitError, ShapeError
from ..state import State
from .common import LayerNorm, Linear, RWKVBase, shift as _shift
from .rwkv4_init import init_weights, random_state_dict  # noqa: F401  (the generation's recipe, for the registry)

SIGNATURE_KEYS: tuple[str, ...] = ()  # the default generation: no distinguishing key


@dataclass
class RWKV4Config(ModelConfig):
    """Shape and numerics of an RWKV-4 model.

    ``dim_att`` and ``dim_ffn`` complete the architecture (read off a state
    dict by :meth:`from_state_dict`).  The last two fields are numerical
    conventions on which the official implementations differ (rwkv4 spec
    sections 3.4 and 3.5): they do not change the weights, only how the
    forward pass rounds.
    """

    generation: ClassVar[str] = "4"
    # Fields that are numerical conventions, not architecture (not read off shapes).
    NUMERICS: ClassVar[tuple[str, ...]] = ("layer_norm_eps", "rescale_every", "ln0_fold_dtype")

    # Width of the time-mix projections and of the WKV state (C_att); equal to
    # n_embd in every official RWKV-4 model.
    dim_att: int = 0
    # Hidden width of the channel-mix (F); 4 * n_embd in every official model.
    dim_ffn: int = 0
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
        super().__post_init__()
        for name in ("dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RWKV4Config.{name} must be a positive integer, got {value!r}")
        if self.rescale_every < 0:
            raise ValueError(f"RWKV4Config.rescale_every must be >= 0, got {self.rescale_every}")
        if self.ln0_fold_dtype is not None:
            dtype_from_name(self.ln0_fold_dtype)  # validates

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of the fp32 RNN state of one sequence: L * (2C + 3 C_att) * 4."""
        return self.n_layer * (2 * self.n_embd + 3 * self.dim_att) * 4

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "RWKV4Config":
        """Infer the architecture from official-name tensors (spec 3.1).

        Raises :class:`CheckpointError` naming the missing key, and
        :class:`ShapeError` naming the key and both shapes when a tensor does not
        fit the sizes read from the others.
        """
        require(sd, "emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight", what="RWKV-4")
        emb = sd["emb.weight"]
        if emb.dim() != 2:
            raise ShapeError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected 2 dimensions (vocab, n_embd)")
        vocab_size, n_embd = (int(s) for s in emb.shape)
        cfg = cls(
            n_layer=count_layers(sd), n_embd=n_embd, vocab_size=vocab_size,
            dim_att=int(sd["blocks.0.att.key.weight"].shape[0]), dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
        )
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


# Tensors kept in float32 when a file stores them so (the WKV runs in fp32).
FP32_PARAMS = (".att.time_decay", ".att.time_first")
# Learning-rate multipliers of the official trainer (spec 4.2), by name part.
LR_SCALES = {"time_decay": 2.0, "time_first": 3.0}
# Default LoRA targets for fine-tuning.
LORA_TARGETS = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")


def _mix(x: torch.Tensor, xx: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """mu * x + (1 - mu) * xx (spec 1.2), as one lerp: xx + mu * (x - xx)."""
    return torch.lerp(xx, x, mu if mu.dtype == x.dtype else mu.to(x.dtype))


class TimeMix(nn.Module):
    """Time mixing, the attention replacement (paper eq. 11-15; spec 1.2)."""

    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        C, A = config.n_embd, config.dim_att
        self.layer_id = layer_id
        # d; the per-step decay factor is exp(-exp(d)) (spec 1.3).
        self.time_decay = nn.Parameter(torch.zeros(A))
        # u, the bonus of the current token, used raw.
        self.time_first = nn.Parameter(torch.zeros(A))
        # Token-shift mix ratios: 1 = current token only, 0 = previous only.
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        self.receptance = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        prev: torch.Tensor,
        wkv_state: ops.WKVState,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, ops.WKVState]:
        """x [B, T, C] is the LN1 output; prev [B, C] the previous token's."""
        xx = _shift(x, prev)
        xk = _mix(x, xx, self.time_mix_k)
        xv = _mix(x, xx, self.time_mix_v)
        xr = _mix(x, xx, self.time_mix_r)
        k = self.key(xk)
        v = self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        # The WKV operator always runs in fp32 (every official implementation
        # does); omega = -exp(d) is the log-decay per step.
        w = -torch.exp(self.time_decay.float())
        u = self.time_first.float()
        if x.shape[1] == 1 and not (torch.is_grad_enabled() and self.training):
            y, new_state = ops.wkv_step(w, u, k[:, 0].float(), v[:, 0].float(), wkv_state)
            y = y.unsqueeze(1)
        else:
            y, new_state = ops.wkv(w, u, k.float(), v.float(), wkv_state, backend=backend)
        return self.output(r * y.to(r.dtype)), new_state


class ChannelMix(nn.Module):
    """Channel mixing, the feed-forward replacement (paper eq. 16-18; spec 1.4)."""

    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        C, Fh = config.n_embd, config.dim_ffn
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = Linear(C, Fh, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(Fh, C, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] is the LN2 output; prev [B, C] the previous token's."""
        xx = _shift(x, prev)
        xk = _mix(x, xx, self.time_mix_k)
        xr = _mix(x, xx, self.time_mix_r)
        k = torch.square(torch.relu(self.key(xk)))  # squared ReLU
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    """Pre-LN residual block: x += TimeMix(LN1 x); x += ChannelMix(LN2 x)."""

    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.layer_id = layer_id
        if layer_id == 0:
            # Applied once, right after the embedding (paper 4.7, small-init
            # embedding); it lives in block 0 for the official key names.
            self.ln0 = LayerNorm(C, eps=eps)
        self.ln1 = LayerNorm(C, eps=eps)
        self.ln2 = LayerNorm(C, eps=eps)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)


class RWKV(RWKVBase):
    """RWKV-4 language model.

    >>> logits, state = model(tokens)          # tokens [B, T] -> logits [B, T, V] fp32
    >>> logits, state = model(more, state)     # continue; T == 1 is the RNN step
    """

    def __init__(self, config: RWKV4Config):
        super().__init__()
        if not isinstance(config, RWKV4Config):
            raise RwkvkitError(f"RWKV (RWKV-4) needs an RWKV4Config, got {type(config).__name__}")
        # A private copy: the per-model switches (rescale_every, ln0 fold) must
        # not leak into other models built from the same config object.
        config = dataclasses.replace(config)
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = LayerNorm(C, eps=config.layer_norm_eps)
        self.head = Linear(C, config.vocab_size, bias=False)
        self._init_common()
        self.wkv_backend = "auto"
        if config.ln0_fold_dtype is not None:
            self.fold_ln0(config.ln0_fold_dtype)

    def new_state(self, batch_size: int = 1) -> State:
        """The state of an empty context for ``batch_size`` sequences."""
        cfg = self.config
        return State.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.dim_att, device=self.device)

    def fold_ln0(self, dtype: "str | torch.dtype | None" = None) -> None:
        """See :meth:`RWKVBase.fold_ln0`; also recorded in ``config.ln0_fold_dtype``."""
        super().fold_ln0(dtype)
        self.config.ln0_fold_dtype = None if dtype is None else str(dtype_from_name(dtype)).removeprefix("torch.")

    def for_training(self) -> "RWKV":
        super().for_training()
        self.config.ln0_fold_dtype = None
        self.config.rescale_every = 0
        return self

    def forward_blocks(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        cfg = self.config
        R = cfg.rescale_every if not self.training else 0
        att_x, att_aa, att_bb, att_pp, ffn_x = [], [], [], [], []
        for i, block in enumerate(self.blocks):
            a = block.ln1(x)
            wkv_state = (state.att_aa[i], state.att_bb[i], state.att_pp[i])
            out, (aa, bb, pp) = block.att(a, state.att_x[i], wkv_state, self.wkv_backend)
            if R:
                out = out / (2 ** (i // R))
            x = x + out
            b = block.ln2(x)
            out = block.ffn(b, state.ffn_x[i])
            if R:
                out = out / (2 ** (i // R))
            x = x + out
            if R and (i + 1) % R == 0:
                x = x / 2
            att_x.append(a[:, -1].float())
            ffn_x.append(b[:, -1].float())
            att_aa.append(aa)
            att_bb.append(bb)
            att_pp.append(pp)

        new_state = State(
            att_x=torch.stack(att_x),
            att_aa=torch.stack(att_aa).float(),
            att_bb=torch.stack(att_bb).float(),
            att_pp=torch.stack(att_pp).float(),
            ffn_x=torch.stack(ffn_x),
        )
        return x, new_state


RWKV4 = RWKV
MODEL = RWKV
CONFIG = RWKV4Config
