"""RWKV-5 "Eagle" (arXiv 2404.05892): config and model, in one readable file.

The maths is rwkv5-7 spec section 3.2, matching the `rwkv` package's
``RWKV`` class (versions 5, 5.1 and 5.2, named as the package names them;
rwkv.cpp's "5.1" is the package's 5.0, spec section 1).  Per layer the time
mixing

1. mixes each projection's input with the previous token, RWKV-4 style
   (x_c = x * mu_c + x_prev * (1 - mu_c) for c in k, v, r and, 5.1/5.2, g);
2. computes r, k, v (no sigmoid on r) and, 5.1/5.2, the gate g = SiLU(W_g x_g);
3. runs the WKV-5 recurrence on a per-head N x N matrix state S[key][value]
   (:mod:`rwkvkit.ops.wkv6` with a constant decay): the output reads the old
   state plus the current token's bonus u, then S <- diag(w) S + k v^T with
   w = exp(-exp(time_decay)) per head (5.0/5.1) or per key channel (5.2);
4. applies a per-head GroupNorm (eps 64e-5 as the `rwkv` package; rwkv.cpp
   uses 1e-5 for v5, see :meth:`RWKV5Config.rwkvcpp_compatible`), gates
   (5.1/5.2) and projects out.

The bonus is stored either as ``time_first`` (log u, exponentiated here) or
``time_faaaa`` (u itself), independent of the sub-version; the config keeps
which so a round trip writes the same key.  Channel mixing is RWKV-4's.
Parameter names are BlinkDL's, so an official ``.pth`` loads as the
identity.  The same ``forward`` is the parallel form (T > 1, the chunked WKV)
and the RNN step (T == 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, count_layers, require
from ..errors import CheckpointError, RwkvkitError, ShapeError
from ..ops.wkv6 import wkv6, wkv6_step
from ..state import MatrixState
from .common import GroupNorm, LayerNorm, Linear, RWKVBase, like, shift

SIGNATURE_KEYS = (".att.ln_x.weight",)
BONUS_KEYS = ("time_first", "time_faaaa")


@dataclass
class RWKV5Config(ModelConfig):
    """Shape and numerics of an RWKV-5.x model (all read off tensor names and shapes).

    The sub-version is not a field: it follows from ``gate`` and
    ``per_channel_decay`` (:attr:`generation` is "5", "5.1" or "5.2").
    """

    NUMERICS: ClassVar[tuple[str, ...]] = ("layer_norm_eps", "group_norm_eps")

    # Channels per head (N); 64 in every released model. dim_att = n_head * N.
    head_size: int = 64
    # Width of r, k, v and the WKV (C_att); n_embd in every official model.
    dim_att: int = 0
    # Hidden width of the channel mix (3.5 C rounded to 32 in the x052 trainer).
    dim_ffn: int = 0
    # 5.1 and 5.2: the SiLU output gate (att.gate, att.time_mix_g).
    gate: bool = True
    # 5.2: time_decay (and the bonus) per key channel (H, N); else per head (H,).
    per_channel_decay: bool = True
    # Name of the bonus tensor: "time_faaaa" (u, raw) or "time_first" (log u).
    bonus: str = "time_faaaa"
    # Epsilon of the per-head GroupNorm ln_x: 64e-5 in the `rwkv` package and
    # the trainers (spec 3.1); rwkv.cpp's v5 graph uses 1e-5.
    group_norm_eps: float = 64e-5

    def __post_init__(self) -> None:
        if self.dim_att <= 0:
            self.dim_att = self.n_embd
        if self.dim_ffn <= 0:
            self.dim_ffn = int(self.n_embd * 3.5) // 32 * 32 or 4 * self.n_embd
        super().__post_init__()
        for name in ("head_size", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if self.dim_att % self.head_size:
            raise ValueError(f"{type(self).__name__}: dim_att {self.dim_att} is not a multiple of head_size {self.head_size}")
        if self.bonus not in BONUS_KEYS:
            raise ValueError(f"{type(self).__name__}.bonus must be one of {BONUS_KEYS}, got {self.bonus!r}")
        if not self.group_norm_eps > 0:
            raise ValueError(f"{type(self).__name__}.group_norm_eps must be > 0, got {self.group_norm_eps!r}")

    @property
    def generation(self) -> str:  # type: ignore[override]
        if self.per_channel_decay:
            return "5.2"
        return "5.1" if self.gate else "5"

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    @property
    def state_bytes_per_sequence(self) -> int:
        """fp32 bytes of one sequence's state: L * (2C + H N^2) * 4."""
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2) * 4

    def rwkvcpp_compatible(self) -> "RWKV5Config":
        """The same model with rwkv.cpp's v5 numerics (GroupNorm eps 1e-5, spec 11.2)."""
        return dataclasses.replace(self, group_norm_eps=1e-5)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "RWKV5Config":
        """Sizes from the tensor shapes (spec 2.5): H from time_decay, variant from the names."""
        require(sd, "emb.weight", "blocks.0.att.key.weight", "blocks.0.att.time_decay", "blocks.0.ffn.key.weight", what="RWKV-5")
        if "blocks.0.att.ln_x.weight" not in sd:
            raise CheckpointError("missing tensor 'blocks.0.att.ln_x.weight': an RWKV-5 state dict has the per-head GroupNorm ln_x")
        emb, td = sd["emb.weight"], sd["blocks.0.att.time_decay"]
        gated = "blocks.0.att.gate.weight" in sd
        per_channel = len(td.shape) >= 2 and td.shape[1] > 1
        if len(emb.shape) != 2:
            raise ShapeError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected 2 dimensions (vocab, n_embd)")
        dim_att = int(sd["blocks.0.att.key.weight"].shape[0])
        if len(td.shape) not in (1, 2) or td.shape[0] < 1 or dim_att % td.shape[0]:
            raise ShapeError(
                f"tensor 'blocks.0.att.time_decay' has shape {tuple(td.shape)}, expected (n_head,) or (n_head, head_size) "
                f"with n_head dividing dim_att {dim_att}"
            )
        n_head = int(td.shape[0])
        bonus = [b for b in BONUS_KEYS if f"blocks.0.att.{b}" in sd]
        if len(bonus) != 1:
            raise CheckpointError(
                "an RWKV-5 state dict has exactly one of 'blocks.0.att.time_first' and 'blocks.0.att.time_faaaa', "
                f"found {bonus or 'neither'}"
            )
        cfg = cls(
            n_layer=count_layers(sd),
            n_embd=int(emb.shape[1]),
            vocab_size=int(emb.shape[0]),
            head_size=dim_att // n_head,
            dim_att=dim_att,
            dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
            gate=gated,
            per_channel_decay=per_channel,
            bonus=bonus[0],
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.__post_init__()
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every official key and its shape (spec 2.1, 2.2)."""
        C, A, F_, V, H, N = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size, self.n_head, self.head_size
        per = (H, N) if self.per_channel_decay else (H,)
        shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
        for i in range(self.n_layer):
            p = f"blocks.{i}."
            if i == 0:
                shapes[p + "ln0.weight"] = (C,)
                shapes[p + "ln0.bias"] = (C,)
            for ln in ("ln1", "ln2"):
                shapes[f"{p}{ln}.weight"] = (C,)
                shapes[f"{p}{ln}.bias"] = (C,)
            a = p + "att."
            for m in ("k", "v", "r") + (("g",) if self.gate else ()):
                shapes[f"{a}time_mix_{m}"] = (1, 1, C)
            shapes[a + "time_decay"] = per
            shapes[a + self.bonus] = per
            for m in ("receptance", "key", "value") + (("gate",) if self.gate else ()):
                shapes[f"{a}{m}.weight"] = (A, C)
            shapes[a + "output.weight"] = (C, A)
            shapes[a + "ln_x.weight"] = (A,)
            shapes[a + "ln_x.bias"] = (A,)
            shapes[p + "ffn.time_mix_k"] = (1, 1, C)
            shapes[p + "ffn.time_mix_r"] = (1, 1, C)
            shapes[p + "ffn.key.weight"] = (F_, C)
            shapes[p + "ffn.receptance.weight"] = (C, C)
            shapes[p + "ffn.value.weight"] = (C, F_)
        shapes["ln_out.weight"] = (C,)
        shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (V, C)
        return shapes


# Tensors kept in float32 when a file stores them so (the WKV runs in fp32).
FP32_PARAMS = (".att.time_decay", ".att.time_first", ".att.time_faaaa")
# Learning-rate multipliers of the official x052 trainer (spec 8.2, stage 1).
LR_SCALES = {"att.time_decay": 2.0, "att.time_first": 3.0}
# Default LoRA (peft) targets for fine-tuning.
LORA_TARGETS = ("att.key", "att.value", "att.receptance", "att.gate", "att.output", "ffn.key", "ffn.receptance", "ffn.value")


def _mix(x: torch.Tensor, xx: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """x * mu + xx * (1 - mu): the `rwkv` package's expression, for its rounding
    (1 - mu in the activations' dtype)."""
    mu = like(mu, x)
    return x * mu + xx * (1 - mu)


def run_wkv(att: nn.Module, r, k, v, logw, u, kv, backend: str):
    """The WKV of one layer on [B, T, C_att] projections and [B, T or 1, H, N]
    log-decays; returns y [B, T, H, N] (fp32, fp64 for fp64 models) and the new state."""
    B, T, _ = r.shape
    H, N = att.n_head, att.head_size
    f32 = torch.promote_types(r.dtype, torch.float32)
    heads = lambda t: t.to(f32).view(B, T, H, N)  # noqa: E731
    logw = logw.to(f32).expand(B, T, H, N)
    if T == 1 and not (torch.is_grad_enabled() and att.training):
        y, kv = wkv6_step(heads(r)[:, 0], heads(k)[:, 0], heads(v)[:, 0], logw[:, 0], u, kv)
        return y.unsqueeze(1), kv
    return wkv6(heads(r), heads(k), heads(v), logw, u, kv, backend=backend)


def group_norm_out(att: nn.Module, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-head GroupNorm of the WKV output, in fp32 at least (as the `rwkv`
    package: its ln_x parameters stay fp32), cast to the activations' dtype."""
    B, T, H, N = y.shape
    ln = att.ln_x
    z = F.group_norm(y.reshape(B * T, H * N), H, ln.weight.to(y.dtype), ln.bias.to(y.dtype), ln.eps)
    return z.view(B, T, H * N).to(dtype)


class TimeMix(nn.Module):
    """RWKV-5.x time mixing (spec 3.2)."""

    def __init__(self, config: RWKV5Config, layer_id: int):
        super().__init__()
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.layer_id = layer_id
        self.n_head, self.head_size = H, N
        self.has_gate = config.gate
        self.bonus_name = config.bonus
        # Token-shift mix ratios: 1 = current token only, 0 = previous only.
        for m in ("k", "v", "r") + (("g",) if config.gate else ()):
            setattr(self, f"time_mix_{m}", nn.Parameter(torch.ones(1, 1, C)))
        per = (H, N) if config.per_channel_decay else (H,)
        # d; the decay per token is w = exp(-exp(d)).
        self.time_decay = nn.Parameter(torch.zeros(per))
        # The current token's bonus: u itself (time_faaaa) or log u (time_first).
        setattr(self, config.bonus, nn.Parameter(torch.zeros(per)))
        self.receptance = Linear(C, A, bias=False)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        if config.gate:
            self.gate = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)
        self.ln_x = GroupNorm(H, A, eps=config.group_norm_eps)

    def bonus_u(self, dtype: torch.dtype) -> torch.Tensor:
        """u [H, N] in ``dtype``."""
        t = getattr(self, self.bonus_name).to(dtype)
        u = torch.exp(t) if self.bonus_name == "time_first" else t
        return u.reshape(self.n_head, -1).expand(self.n_head, self.head_size)

    def forward(self, x: torch.Tensor, prev: torch.Tensor, kv: torch.Tensor, backend: str = "auto"):
        """x [B, T, C] is the LN1 output, prev [B, C] the previous token's, kv
        [B, H, N, N] the WKV state.  Returns (output, new kv)."""
        f32 = torch.promote_types(x.dtype, torch.float32)
        xx = shift(x, prev)
        r = self.receptance(_mix(x, xx, self.time_mix_r))
        k = self.key(_mix(x, xx, self.time_mix_k))
        v = self.value(_mix(x, xx, self.time_mix_v))
        logw = -torch.exp(self.time_decay.to(f32)).reshape(1, 1, self.n_head, -1)
        y, kv = run_wkv(self, r, k, v, logw, self.bonus_u(f32), kv, backend)
        z = group_norm_out(self, y, x.dtype)
        if self.has_gate:
            z = z * F.silu(self.gate(_mix(x, xx, self.time_mix_g)))
        return self.output(z), kv


class ChannelMix(nn.Module):
    """RWKV-5 channel mixing: RWKV-4's (squared ReLU, receptance gate)."""

    def __init__(self, config: RWKV5Config, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = Linear(C, config.dim_ffn, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(config.dim_ffn, C, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        xx = shift(x, prev)
        k = torch.square(torch.relu(self.key(_mix(x, xx, self.time_mix_k))))
        return torch.sigmoid(self.receptance(_mix(x, xx, self.time_mix_r))) * self.value(k)


class Block(nn.Module):
    """Pre-LN residual block: x += TimeMix(LN1 x); x += ChannelMix(LN2 x)."""

    def __init__(self, config, layer_id: int, time_mix: type, channel_mix: type):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = LayerNorm(C, eps=eps)
        self.ln1 = LayerNorm(C, eps=eps)
        self.ln2 = LayerNorm(C, eps=eps)
        self.att = time_mix(config, layer_id)
        self.ffn = channel_mix(config, layer_id)


class MatrixStateRWKV(RWKVBase):
    """What RWKV-5 and RWKV-6 share: blocks of (TimeMix, ChannelMix) over a
    :class:`~rwkvkit.state.MatrixState` with S[key][value]."""

    CONFIG_CLASS: ClassVar[type] = ModelConfig
    TIME_MIX: ClassVar[type] = nn.Module
    CHANNEL_MIX: ClassVar[type] = nn.Module

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.CONFIG_CLASS):
            raise RwkvkitError(f"{type(self).__name__} needs an {self.CONFIG_CLASS.__name__}, got {type(config).__name__}")
        config = dataclasses.replace(config)
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i, self.TIME_MIX, self.CHANNEL_MIX) for i in range(config.n_layer)])
        self.ln_out = LayerNorm(C, eps=config.layer_norm_eps)
        self.head = Linear(C, config.vocab_size, bias=False)
        self._init_common()
        self.wkv_backend = "auto"

    def new_state(self, batch_size: int = 1) -> MatrixState:
        """The state of an empty context for ``batch_size`` sequences (all zeros)."""
        cfg = self.config
        return MatrixState.zeros(
            cfg.n_layer, batch_size, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.generation, device=self.device
        )

    def forward_blocks(self, x: torch.Tensor, state: MatrixState) -> tuple[torch.Tensor, MatrixState]:
        att_x, att_kv, ffn_x = [], [], []
        for i, block in enumerate(self.blocks):
            a = block.ln1(x)
            out, kv = block.att(a, state.att_x[i], state.att_kv[i], self.wkv_backend)
            x = x + out
            b = block.ln2(x)
            x = x + block.ffn(b, state.ffn_x[i])
            att_x.append(a[:, -1].float())
            ffn_x.append(b[:, -1].float())
            att_kv.append(kv)
        return x, MatrixState(
            torch.stack(att_x), torch.stack(att_kv), torch.stack(ffn_x), generation=self.config.generation
        )


class RWKV5(MatrixStateRWKV):
    """RWKV-5.x language model.

    >>> logits, state = model(tokens)          # tokens [B, T] -> logits [B, T, V] fp32
    >>> logits, state = model(more, state)     # continue; T == 1 is the RNN step
    """

    CONFIG_CLASS = RWKV5Config
    TIME_MIX = TimeMix
    CHANNEL_MIX = ChannelMix


MODEL = RWKV5
CONFIG = RWKV5Config

from .rwkv5_init import init_weights, random_state_dict  # noqa: E402,F401  (the generation's recipe, for the registry)
