"""RWKV-6 "Finch" (arXiv 2404.05892): config and model, in one readable file.

The maths is rwkv5-7 spec section 3.3, matching the `rwkv` package's
``RWKV`` class (version 6) and RWKV-LM's x060 trainer.  Per layer the time
mixing

1. interpolates with the previous token data-dependently ("ddlerp"): with
   delta = x_prev - x, a LoRA m = tanh((x + delta * maa_x) W1) W2 yields five
   offsets, in the block order w, k, v, r, g (spec 11.9), and
   x_c = x + delta * (maa_c + m_c);
2. computes r, k, v and the gate g = SiLU(W_g x_g);
3. computes a per-token, per-channel decay from a second LoRA,
   d_t = time_decay + tanh(x_w W_d1) W_d2, w_t = exp(-exp(d_t)) (fp32);
4. runs the WKV-6 recurrence on a per-head N x N state S[key][value]
   (:mod:`rwkvkit.ops.wkv6`) with the bonus u = ``time_faaaa`` (raw);
5. applies a per-head GroupNorm (eps 64e-5, also rwkv.cpp's for v6), gates
   and projects out.

Channel mixing is RWKV-4/5's with ``time_maa_k/r`` (x + delta * maa) in
place of ``time_mix_k/r``.  Parameter names are BlinkDL's, so an official
``.pth`` loads as the identity.  The same ``forward`` is the parallel form
(T > 1, the chunked WKV) and the RNN step (T == 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, count_layers, require
from ..errors import ShapeError
from ..state import MatrixState  # noqa: F401  (the state this model carries)
from .common import GroupNorm, Linear, like, shift
from .rwkv5 import MatrixStateRWKV, group_norm_out, run_wkv

SIGNATURE_KEYS = (".att.time_maa_x",)
# The five ddlerp targets, in the order of time_maa_w1's output blocks (spec 3.3).
DDLERP = ("w", "k", "v", "r", "g")


@dataclass
class RWKV6Config(ModelConfig):
    """Shape and numerics of an RWKV-6 model (all read off tensor shapes)."""

    generation: ClassVar[str] = "6"
    NUMERICS: ClassVar[tuple[str, ...]] = ("layer_norm_eps", "group_norm_eps")

    # Channels per head (N); 64 in every released model. dim_att = n_head * N.
    head_size: int = 64
    # Width of r, k, v and the WKV (C_att); n_embd in every official model.
    dim_att: int = 0
    # Hidden width of the channel mix (3.5 C rounded to 32 in the x060 trainer).
    dim_ffn: int = 0
    # LoRA ranks of the token shift (time_maa_w1 is C x 5 d_mix) and of the
    # decay (time_decay_w1 is C x d_decay): 32/64, 64/128 for 7B and 14B.
    d_mix: int = 32
    d_decay: int = 64
    # Epsilon of the per-head GroupNorm ln_x (64e-5 everywhere for v6, spec 3.1).
    group_norm_eps: float = 64e-5

    def __post_init__(self) -> None:
        if self.dim_att <= 0:
            self.dim_att = self.n_embd
        if self.dim_ffn <= 0:
            self.dim_ffn = int(self.n_embd * 3.5) // 32 * 32 or 4 * self.n_embd
        super().__post_init__()
        for name in ("head_size", "dim_att", "dim_ffn", "d_mix", "d_decay"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RWKV6Config.{name} must be a positive integer, got {value!r}")
        if self.dim_att % self.head_size:
            raise ValueError(f"RWKV6Config: dim_att {self.dim_att} is not a multiple of head_size {self.head_size}")
        if not self.group_norm_eps > 0:
            raise ValueError(f"RWKV6Config.group_norm_eps must be > 0, got {self.group_norm_eps!r}")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    @property
    def state_bytes_per_sequence(self) -> int:
        """fp32 bytes of one sequence's state: L * (2C + H N^2) * 4."""
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2) * 4

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "RWKV6Config":
        """Sizes and LoRA ranks from the tensor shapes (spec 2.5)."""
        a = "blocks.0.att."
        require(
            sd, "emb.weight", a + "key.weight", a + "time_faaaa", a + "time_maa_w1", a + "time_decay_w1",
            "blocks.0.ffn.key.weight", what="RWKV-6",
        )
        emb, faaaa, w1, dw1 = sd["emb.weight"], sd[a + "time_faaaa"], sd[a + "time_maa_w1"], sd[a + "time_decay_w1"]
        if len(emb.shape) != 2:
            raise ShapeError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected 2 dimensions (vocab, n_embd)")
        if len(faaaa.shape) != 2:
            raise ShapeError(f"tensor '{a}time_faaaa' has shape {tuple(faaaa.shape)}, expected (n_head, head_size)")
        if len(w1.shape) != 2 or w1.shape[1] % 5:
            raise ShapeError(f"tensor '{a}time_maa_w1' has shape {tuple(w1.shape)}, expected (n_embd, 5 * d_mix)")
        if len(dw1.shape) != 2:
            raise ShapeError(f"tensor '{a}time_decay_w1' has shape {tuple(dw1.shape)}, expected (n_embd, d_decay)")
        cfg = cls(
            n_layer=count_layers(sd),
            n_embd=int(emb.shape[1]),
            vocab_size=int(emb.shape[0]),
            head_size=int(faaaa.shape[1]),
            dim_att=int(sd[a + "key.weight"].shape[0]),
            dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
            d_mix=int(w1.shape[1]) // 5,
            d_decay=int(dw1.shape[1]),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.__post_init__()
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every official key and its shape (spec 2.1, 2.3)."""
        C, A, F_, V, H, N = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size, self.n_head, self.head_size
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
            for m in ("x",) + DDLERP:
                shapes[f"{a}time_maa_{m}"] = (1, 1, C)
            shapes[a + "time_maa_w1"] = (C, 5 * self.d_mix)
            shapes[a + "time_maa_w2"] = (5, self.d_mix, C)
            shapes[a + "time_decay"] = (1, 1, A)
            shapes[a + "time_decay_w1"] = (C, self.d_decay)
            shapes[a + "time_decay_w2"] = (self.d_decay, A)
            shapes[a + "time_faaaa"] = (H, N)
            for m in ("receptance", "key", "value", "gate"):
                shapes[f"{a}{m}.weight"] = (A, C)
            shapes[a + "output.weight"] = (C, A)
            shapes[a + "ln_x.weight"] = (A,)
            shapes[a + "ln_x.bias"] = (A,)
            shapes[p + "ffn.time_maa_k"] = (1, 1, C)
            shapes[p + "ffn.time_maa_r"] = (1, 1, C)
            shapes[p + "ffn.key.weight"] = (F_, C)
            shapes[p + "ffn.receptance.weight"] = (C, C)
            shapes[p + "ffn.value.weight"] = (C, F_)
        shapes["ln_out.weight"] = (C,)
        shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (V, C)
        return shapes


# Tensors kept in float32 when a file stores them so (decays and bonus; the WKV runs in fp32).
FP32_PARAMS = (".att.time_decay", ".att.time_faaaa")
# Learning-rate multipliers of the official x060 trainer (spec 8.2, stage 1).
LR_SCALES = {"att.time_decay": 2.0}
# Default LoRA (peft) targets for fine-tuning.
LORA_TARGETS = ("att.key", "att.value", "att.receptance", "att.gate", "att.output", "ffn.key", "ffn.receptance", "ffn.value")


class TimeMix(nn.Module):
    """RWKV-6 time mixing (spec 3.3)."""

    def __init__(self, config: RWKV6Config, layer_id: int):
        super().__init__()
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.layer_id = layer_id
        self.n_head, self.head_size, self.d_mix = H, N, config.d_mix
        # ddlerp: 0 = current token only, 1 = previous only, plus the LoRA offset.
        for m in ("x",) + DDLERP:
            setattr(self, f"time_maa_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * config.d_mix))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, config.d_mix, C))
        # d_t = time_decay + tanh(x_w W_d1) W_d2; the decay is exp(-exp(d_t)).
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, config.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(config.d_decay, A))
        # The current token's bonus u (raw).
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, A, bias=False)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        self.gate = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)
        self.ln_x = GroupNorm(H, A, eps=config.group_norm_eps)

    def forward(self, x: torch.Tensor, prev: torch.Tensor, kv: torch.Tensor, backend: str = "auto"):
        """x [B, T, C] is the LN1 output, prev [B, C] the previous token's, kv
        [B, H, N, N] the WKV state.  Returns (output, new kv)."""
        B, T, C = x.shape
        f32 = torch.promote_types(x.dtype, torch.float32)
        dx = shift(x, prev) - x
        xxx = x + dx * self.time_maa_x
        m = torch.tanh(xxx @ like(self.time_maa_w1, xxx)).view(B * T, 5, self.d_mix).transpose(0, 1)  # [5, BT, D]
        mw, mk, mv, mr, mg = torch.bmm(m, like(self.time_maa_w2, m)).view(5, B, T, C).unbind(0)
        xw = x + dx * (self.time_maa_w + mw)
        xk = x + dx * (self.time_maa_k + mk)
        xv = x + dx * (self.time_maa_v + mv)
        xr = x + dx * (self.time_maa_r + mr)
        xg = x + dx * (self.time_maa_g + mg)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        d = self.time_decay.to(f32) + (torch.tanh(xw @ like(self.time_decay_w1, xw)) @ like(self.time_decay_w2, xw)).to(f32)
        logw = -torch.exp(d).view(B, T, self.n_head, self.head_size)  # per token and key channel
        y, kv = run_wkv(self, r, k, v, logw, self.time_faaaa.to(f32), kv, backend)
        return self.output(group_norm_out(self, y, x.dtype) * g), kv


class ChannelMix(nn.Module):
    """RWKV-6 channel mixing: RWKV-5's with the maa form of the token shift."""

    def __init__(self, config: RWKV6Config, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, config.dim_ffn, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(config.dim_ffn, C, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        dx = shift(x, prev) - x
        k = torch.square(torch.relu(self.key(x + dx * self.time_maa_k)))
        return torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k)


class RWKV6(MatrixStateRWKV):
    """RWKV-6 language model.

    >>> logits, state = model(tokens)          # tokens [B, T] -> logits [B, T, V] fp32
    >>> logits, state = model(more, state)     # continue; T == 1 is the RNN step
    """

    CONFIG_CLASS = RWKV6Config
    TIME_MIX = TimeMix
    CHANNEL_MIX = ChannelMix


MODEL = RWKV6
CONFIG = RWKV6Config

from .rwkv6_init import init_weights, random_state_dict  # noqa: E402,F401  (the generation's recipe, for the registry)
