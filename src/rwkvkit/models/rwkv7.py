"""RWKV-7 "Goose" (arXiv 2503.14456): config and model, in one readable file.

The maths is rwkv5-7 spec section 3.4, matching the `rwkv` package's
``RWKV_x070`` and RWKV-LM's x070 trainer.  Per layer the time mixing

1. mixes each projection's input with the previous token
   (x_c = x + (x_prev - x) * x_c for c in r, w, k, v, a, g);
2. computes r, k, v and, through small LoRAs, a per-token decay w in
   (0.545, 1), an in-context learning rate alpha, a value-residual gate and
   an output gate g;
3. runs the WKV-7 "generalised delta rule" on a per-head N x N matrix state
   (:mod:`rwkvkit.ops.wkv7`), removing along the normalised key kappa_hat
   and writing the value along k_tilde;
4. applies a per-head GroupNorm, adds the "r_k bonus" of the current token,
   gates with g and projects out.

Layer 0's value v is carried to every later layer ("v_first"), which mixes it
back into its own value.  Channel mixing is a squared-ReLU MLP without the
receptance gate of RWKV-4/5/6.  Parameter names are BlinkDL's, so an official
``.pth`` loads as the identity.  The same ``forward`` is the parallel form
(T > 1, the chunked WKV) and the RNN step (T == 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, count_layers, require
from ..errors import CheckpointError, RwkvkitError, ShapeError
from ..ops.wkv7 import wkv7, wkv7_step
from ..state import MatrixState
from .common import GroupNorm, LayerNorm, Linear, RWKVBase, like, shift

SIGNATURE_KEYS = (".att.r_k", ".att.x_r", ".att.x_rwkvag")
# exp(-0.5): the decay is w = exp(-e^-0.5 * sigmoid(w_hat)) in (0.545, 1) (spec 3.4 step 3).
_DECAY_SCALE = math.exp(-0.5)
# Keys of the DeepEmbed variant ("RWKV-7a"), which the `rwkv` package runs only
# under RWKV_DE_VERSION=1; rwkvkit refuses it by name.
_DEEP_EMBED = (".ffn.s_emb.", ".ffn.s0", ".ffn.s1", ".ffn.s2", "s_emb.weight")
_LORAS = (("w", "d_decay"), ("a", "d_aaa"), ("v", "d_mv"), ("g", "d_gate"))


@dataclass
class RWKV7Config(ModelConfig):
    """Shape and numerics of an RWKV-7 model (all read off tensor shapes)."""

    generation: ClassVar[str] = "7"
    NUMERICS: ClassVar[tuple[str, ...]] = ("layer_norm_eps", "group_norm_eps")

    # Channels per head (N); 64 in every released model. n_embd = n_head * N.
    head_size: int = 64
    # Hidden width of the channel mix; 4 * n_embd in every released model.
    dim_ffn: int = 0
    # LoRA ranks of the decay (w1/w2), in-context rate (a1/a2), value
    # residual (v1/v2) and gate (g1/g2) (spec 2.4; they vary per model size).
    d_decay: int = 64
    d_aaa: int = 64
    d_mv: int = 32
    d_gate: int = 128
    # Whether layer 0 stores v0/v1/v2 (released files do; they are unused
    # there since layer 0 makes v_first). Kept so round trips are exact.
    layer0_v_lora: bool = True
    # Epsilon of the per-head GroupNorm ln_x: 64e-5 in every official code path
    # (spec 3.1), rwkv.cpp included for RWKV-7.
    group_norm_eps: float = 64e-5

    def __post_init__(self) -> None:
        if self.dim_ffn <= 0:
            self.dim_ffn = 4 * self.n_embd
        super().__post_init__()
        for name in ("head_size", "dim_ffn", "d_decay", "d_aaa", "d_mv", "d_gate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RWKV7Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.head_size:
            raise ValueError(f"RWKV7Config: n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def state_bytes_per_sequence(self) -> int:
        """fp32 bytes of one sequence's state: L * (2C + H N^2) * 4."""
        return self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2) * 4

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides: Any) -> "RWKV7Config":
        """Sizes and LoRA ranks from the tensor shapes (spec 2.5); never typed by hand."""
        deep = next((k for k in sd if any(m in k for m in _DEEP_EMBED)), None)
        if deep is not None:
            raise CheckpointError(
                f"this is an RWKV-7 DeepEmbed model (it has the tensor '{deep}'); rwkvkit runs plain RWKV-7 only"
            )
        require(sd, "emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", what="RWKV-7")
        emb, r_k = sd["emb.weight"], sd["blocks.0.att.r_k"]
        if len(emb.shape) != 2:
            raise ShapeError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected 2 dimensions (vocab, n_embd)")
        if len(r_k.shape) != 2:
            raise ShapeError(f"tensor 'blocks.0.att.r_k' has shape {tuple(r_k.shape)}, expected (n_head, head_size)")
        n_layer = count_layers(sd)
        ranks = {}
        for x, field in _LORAS:
            # Layer 0 may lack v1 (released files keep it, trainers and rwkv.cpp drop it).
            key = next((f"blocks.{i}.att.{x}1" for i in range(n_layer) if f"blocks.{i}.att.{x}1" in sd), None)
            if key is None:
                raise CheckpointError(f"missing tensor 'blocks.{min(1, n_layer - 1)}.att.{x}1': not an RWKV-7 state dict")
            if len(sd[key].shape) != 2:
                raise ShapeError(f"tensor '{key}' has shape {tuple(sd[key].shape)}, expected 2 dimensions (n_embd, rank)")
            ranks[field] = int(sd[key].shape[1])
        cfg = cls(
            n_layer=n_layer,
            n_embd=int(emb.shape[1]),
            vocab_size=int(emb.shape[0]),
            head_size=int(r_k.shape[1]),
            dim_ffn=int(sd["blocks.0.ffn.key.weight"].shape[0]),
            layer0_v_lora="blocks.0.att.v1" in sd,
            **ranks,
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.__post_init__()
        return cfg

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every official key and its shape (spec 2.4)."""
        C, F_, V, H, N = self.n_embd, self.dim_ffn, self.vocab_size, self.n_head, self.head_size
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
            for m in ("r", "w", "k", "v", "a", "g"):
                shapes[f"{a}x_{m}"] = (1, 1, C)
            for x, field in _LORAS:
                if x == "v" and i == 0 and not self.layer0_v_lora:
                    continue
                D = getattr(self, field)
                if x != "g":
                    shapes[f"{a}{x}0"] = (1, 1, C)
                shapes[f"{a}{x}1"] = (C, D)
                shapes[f"{a}{x}2"] = (D, C)
            shapes[a + "k_k"] = (1, 1, C)
            shapes[a + "k_a"] = (1, 1, C)
            shapes[a + "r_k"] = (H, N)
            for m in ("receptance", "key", "value", "output"):
                shapes[f"{a}{m}.weight"] = (C, C)
            shapes[a + "ln_x.weight"] = (C,)
            shapes[a + "ln_x.bias"] = (C,)
            shapes[p + "ffn.x_k"] = (1, 1, C)
            shapes[p + "ffn.key.weight"] = (F_, C)
            shapes[p + "ffn.value.weight"] = (C, F_)
        shapes["ln_out.weight"] = (C,)
        shapes["ln_out.bias"] = (C,)
        shapes["head.weight"] = (V, C)
        return shapes


# Tensors kept in float32 when a file stores them so.
FP32_PARAMS = (".att.w0", ".att.r_k")
# Learning-rate multipliers of the official x070 trainer (spec 8.2).
LR_SCALES = {"att.w0": 2.0}
# Default LoRA (peft) targets for fine-tuning: the projections (no ffn receptance).
LORA_TARGETS = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value")


def _plus(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` where that keeps the result's dtype.

    On the CPU a fresh [B, T, C] allocation (page faults) costs more than the
    arithmetic, so the prompt path adds into temporaries it owns: products and
    matmul outputs, whose backward never reads them, so this is autograd-safe.
    Addition commutes exactly, so the rounding is that of ``other + fresh``
    (unlike addcmul, whose fused multiply-add differs).  Where the sum would
    promote (a bf16 product under autocast plus an fp32 parameter) it is the
    ordinary out-of-place sum.
    """
    if fresh.dtype == torch.promote_types(fresh.dtype, other.dtype):
        return fresh.add_(other)
    return fresh + other


class TimeMix(nn.Module):
    """RWKV-7 time mixing (spec 3.4)."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.layer_id = layer_id
        self.n_head, self.head_size = H, N
        # Token-shift mix per input: 0 = current token only, 1 = previous only.
        for m in ("r", "w", "k", "v", "a", "g"):
            setattr(self, f"x_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        # LoRA of the decay pre-activation w_hat = w0 + tanh(x w1) w2.
        self.w0 = nn.Parameter(torch.zeros(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, config.d_decay))
        self.w2 = nn.Parameter(torch.zeros(config.d_decay, C))
        # In-context learning rate alpha = sigmoid(a0 + x a1 a2).
        self.a0 = nn.Parameter(torch.zeros(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, config.d_aaa))
        self.a2 = nn.Parameter(torch.zeros(config.d_aaa, C))
        # Value residual gate sigmoid(v0 + x v1 v2); layer 0 makes v_first instead.
        self.has_v_lora = layer_id > 0 or config.layer0_v_lora
        if self.has_v_lora:
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, config.d_mv))
            self.v2 = nn.Parameter(torch.zeros(config.d_mv, C))
        # Output gate g = sigmoid(x g1) g2.
        self.g1 = nn.Parameter(torch.zeros(C, config.d_gate))
        self.g2 = nn.Parameter(torch.zeros(config.d_gate, C))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = GroupNorm(H, C, eps=config.group_norm_eps)

    def forward(
        self, x: torch.Tensor, prev: torch.Tensor, kv: torch.Tensor, v_first: torch.Tensor | None, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] is the LN1 output, prev [B, C] the previous token's, kv
        [B, H, N, N] the WKV state; v_first [B, T, C] is layer 0's value (None
        in layer 0).  Returns (output, new kv, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        # The decay, the WKV and its inputs run in fp32 at least (fp64 for fp64 models).
        f32 = torch.promote_types(x.dtype, torch.float32)
        dx = shift(x, prev) - x
        # The six mixes x + dx * x_c at once into one [6, B, T, C] tensor (_plus:
        # the sum written into the fresh product).
        mixes = torch.stack([getattr(self, f"x_{m}") for m in ("r", "w", "k", "v", "a", "g")])  # [6, 1, 1, C]
        xr, xw, xk, xv, xa, xg = _plus(dx * mixes, x).unbind(0)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # Decay and gates in fp32 (the decay must be: w is close to 1).
        w_hat = _plus(torch.tanh(xw.to(f32) @ self.w1.to(f32)) @ self.w2.to(f32), self.w0.to(f32))
        logw = -_DECAY_SCALE * torch.sigmoid(w_hat)  # log of w in (-0.6065, 0)
        alpha = torch.sigmoid(_plus((xa @ like(self.a1, xa)) @ like(self.a2, xa), self.a0))
        g = torch.sigmoid(xg @ like(self.g1, xg)) @ like(self.g2, xg)
        kappa = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, eps=1e-12)
        k = k * ((alpha - 1) * self.k_a).add_(1)  # k_tilde = k * (1 + (alpha - 1) * k_a)
        if v_first is None:
            v_first = v
        else:
            v = _plus((v_first - v) * torch.sigmoid(_plus((xv @ like(self.v1, xv)) @ like(self.v2, xv), self.v0)), v)
        heads = lambda t: t.to(f32).view(B, T, H, N)  # noqa: E731
        alpha_h = heads(alpha)
        a, b = -kappa.to(f32), kappa.to(f32) * alpha_h
        if T == 1 and not (torch.is_grad_enabled() and self.training):
            y, kv = wkv7_step(heads(r)[:, 0], logw.view(B, T, H, N)[:, 0], heads(k)[:, 0], heads(v)[:, 0], a[:, 0], b[:, 0], kv)
            y = y.unsqueeze(1)
        else:
            y, kv = wkv7(heads(r), logw.view(B, T, H, N), heads(k), heads(v), a, b, kv, backend=backend)
        z = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, H, N)
        bonus = (heads(r) * heads(k) * self.r_k.to(f32)).sum(-1, keepdim=True) * heads(v)  # [B, T, H, N]
        z = bonus.to(z.dtype).add_(z).view(B, T, C)  # z + bonus (bonus is a fresh product)
        return self.output(z * g), kv, v_first


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing: a squared-ReLU MLP on the token-shifted input (no receptance)."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, config.dim_ffn, bias=False)
        self.value = Linear(config.dim_ffn, C, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        xk = _plus((shift(x, prev) - x) * self.x_k, x)
        h = self.key(xk)
        if h.requires_grad:
            h = torch.square(torch.relu(h))
        else:
            h = h.relu_().square_()  # in place when no gradient is recorded: no two [B, T, 4C] temporaries
        return self.value(h)


class Block(nn.Module):
    """Pre-LN residual block: x += TimeMix(LN1 x); x += ChannelMix(LN2 x)."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = LayerNorm(C, eps=eps)
        self.ln1 = LayerNorm(C, eps=eps)
        self.ln2 = LayerNorm(C, eps=eps)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)


class RWKV7(RWKVBase):
    """RWKV-7 language model.

    >>> logits, state = model(tokens)          # tokens [B, T] -> logits [B, T, V] fp32
    >>> logits, state = model(more, state)     # continue; T == 1 is the RNN step
    """

    def __init__(self, config: RWKV7Config):
        super().__init__()
        if not isinstance(config, RWKV7Config):
            raise RwkvkitError(f"RWKV7 needs an RWKV7Config, got {type(config).__name__}")
        config = dataclasses.replace(config)
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = LayerNorm(C, eps=config.layer_norm_eps)
        self.head = Linear(C, config.vocab_size, bias=False)
        self._init_common()
        self.wkv_backend = "auto"

    def new_state(self, batch_size: int = 1) -> MatrixState:
        """The state of an empty context for ``batch_size`` sequences (all zeros)."""
        cfg = self.config
        return MatrixState.zeros(cfg.n_layer, batch_size, cfg.n_embd, cfg.n_head, cfg.head_size, "7", device=self.device)

    def forward_blocks(self, x: torch.Tensor, state: MatrixState) -> tuple[torch.Tensor, MatrixState]:
        att_x, att_kv, ffn_x = [], [], []
        v_first = None
        for i, block in enumerate(self.blocks):
            a = block.ln1(x)
            out, kv, v_first = block.att(a, state.att_x[i], state.att_kv[i], v_first, self.wkv_backend)
            x = _plus(out, x)  # x + out
            b = block.ln2(x)
            x = _plus(block.ffn(b, state.ffn_x[i]), x)
            att_x.append(a[:, -1].float())
            ffn_x.append(b[:, -1].float())
            att_kv.append(kv)
        return x, MatrixState(torch.stack(att_x), torch.stack(att_kv), torch.stack(ffn_x), generation="7")


MODEL = RWKV7
CONFIG = RWKV7Config

from .rwkv7_init import init_weights, random_state_dict  # noqa: E402,F401  (the generation's recipe, for the registry)
