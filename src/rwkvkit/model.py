"""The RWKV-4 language model (Peng et al. 2023, arXiv 2305.13048, section 4).

One module, readable top to bottom: token shift, time mixing with the WKV
operator, channel mixing, pre-LN residual blocks.  Parameter names are
BlinkDL's official ones, so ``model.load_state_dict(official_sd)`` is the
identity.  The same ``forward`` is the parallel form (T > 1, for training and
prompts) and the recurrent form (T = 1, one RNN step); both carry a
:class:`~rwkvkit.state.State`.  For inference on the CPU the RNN step runs as
one fused C++ call (:mod:`rwkvkit.infer_cpu`, same maths), and
:meth:`RWKV.quantize_int8` stores the weight matrices in int8
(:mod:`rwkvkit.quant`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import ModelConfig, dtype_from_name
from .errors import RwkvkitError
from .state import State

LogitsMode = Literal["all", "last", "none"]


def _shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Token shift (paper 4.2): the previous token's vector at every position.

    x [B, T, C]; prev [B, C] is the last vector of the previous chunk (zeros at
    the start of a text).  Returns [B, T, C] = [prev, x_0, ..., x_{T-2}].
    """
    if x.shape[1] == 1:
        return prev.to(x.dtype).unsqueeze(1)
    return torch.cat([prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


def _mix(x: torch.Tensor, xx: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """mu * x + (1 - mu) * xx (spec 1.2), as one lerp: xx + mu * (x - xx)."""
    return torch.lerp(xx, x, mu)


class TimeMix(nn.Module):
    """Time mixing, the attention replacement (paper eq. 11-15; spec 1.2)."""

    def __init__(self, config: ModelConfig, layer_id: int):
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
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

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

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, Fh = config.n_embd, config.dim_ffn
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, Fh, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fh, C, bias=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] is the LN2 output; prev [B, C] the previous token's."""
        xx = _shift(x, prev)
        xk = _mix(x, xx, self.time_mix_k)
        xr = _mix(x, xx, self.time_mix_r)
        k = torch.square(torch.relu(self.key(xk)))  # squared ReLU
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    """Pre-LN residual block: x += TimeMix(LN1 x); x += ChannelMix(LN2 x)."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.layer_id = layer_id
        if layer_id == 0:
            # Applied once, right after the embedding (paper 4.7, small-init
            # embedding); it lives in block 0 for the official key names.
            self.ln0 = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)


class RWKV(nn.Module):
    """RWKV-4 language model.

    >>> logits, state = model(tokens)          # tokens [B, T] -> logits [B, T, V] fp32
    >>> logits, state = model(more, state)     # continue; T == 1 is the RNN step
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.version != "4":
            raise RwkvkitError(f"rwkvkit runs RWKV-4 models only; this config is RWKV-{config.version}")
        # A private copy: the per-model switches (rescale_every, ln0 fold) must
        # not leak into other models built from the same config object.
        config = dataclasses.replace(config)
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        # Embedding table with ln0 already applied (see fold_ln0); not saved.
        self.register_buffer("emb_folded", None, persistent=False)
        self.wkv_backend = "auto"
        # The RNN step (T == 1) without autograd: "auto" runs the fused C++
        # decoder (rwkvkit.infer_cpu) on the CPU where it can, "torch" always
        # runs the modules below.  Both compute the same maths.
        self.decode_backend = "auto"
        self._decode_plan = None
        if config.ln0_fold_dtype is not None:
            self.fold_ln0(config.ln0_fold_dtype)

    # ------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_state(self, batch_size: int = 1) -> State:
        """The state of an empty context for ``batch_size`` sequences."""
        return State.for_config(self.config, batch_size, device=self.device)

    @torch.no_grad()
    def fold_ln0(self, dtype: "str | torch.dtype | None" = None) -> None:
        """Precompute LN0(emb) in ``dtype`` (spec 3.2) for inference.

        The `rwkv` package folds ln0 into its embedding table in the
        checkpoint's dtype (bf16 for official files), which rounds; folding in
        bf16 here reproduces it to 1e-6.  ``None`` undoes the fold (ln0 is then
        applied at run time, like HF and the trainer).  The stored parameters
        are unchanged, so saving a folded model writes the original weights.
        """
        if dtype is None:
            self.emb_folded = None
            self.config.ln0_fold_dtype = None
            return
        dt = dtype_from_name(dtype)
        ln0 = self.blocks[0].ln0
        folded = F.layer_norm(
            self.emb.weight.to(dt), (self.config.n_embd,), ln0.weight.to(dt), ln0.bias.to(dt), self.config.layer_norm_eps
        )
        self.emb_folded = folded.to(self.dtype)
        self.config.ln0_fold_dtype = str(dt).removeprefix("torch.")

    def quantize_int8(self, head: bool = True) -> "RWKV":
        """Int8 weights with per-channel scales for CPU inference (see :mod:`rwkvkit.quant`); in place."""
        from .quant import quantize_int8

        return quantize_int8(self, head=head)

    def _fused_step_allowed(self, tokens: torch.Tensor) -> bool:
        if self.decode_backend == "torch" or tokens.device.type != "cpu":
            return False
        if self.decode_backend != "auto":
            raise ValueError(f"decode_backend must be 'auto' or 'torch', got {self.decode_backend!r}")
        # The C++ step records no autograd graph: use it only when none is wanted.
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters())

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        logits: LogitsMode = "all",
    ) -> tuple[torch.Tensor | None, State]:
        """Run ``tokens`` [B, T] from ``state`` (an empty context if None).

        Returns float32 logits — [B, T, V] for ``logits="all"``, [B, 1, V] for
        ``"last"`` (the head only where generation needs it), None for
        ``"none"`` — and the state after the last token.  The input state is not
        modified.
        """
        cfg = self.config
        if tokens.dim() == 1:
            raise RwkvkitError(f"tokens must be a 2-D LongTensor [batch, time], got shape {tuple(tokens.shape)}; use tokens[None]")
        if tokens.dim() != 2:
            raise RwkvkitError(f"tokens must be a 2-D LongTensor [batch, time], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0:
            raise RwkvkitError("tokens is empty (T = 0): give at least one token")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise RwkvkitError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise RwkvkitError(f"token id {bad} is out of range for this model's vocabulary of {cfg.vocab_size}")
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        if state is None:
            state = self.new_state(B)
        else:
            state.check(cfg.n_layer, cfg.n_embd, cfg.dim_att, batch=B)
            if state.device != self.device:
                state = state.to(self.device)

        if T == 1 and self._fused_step_allowed(tokens):
            from . import infer_cpu

            fused = infer_cpu.step(self, tokens, state, want_logits=logits != "none")
            if fused is not None:
                return fused

        if self.emb_folded is not None:
            x = F.embedding(tokens, self.emb_folded)
        else:
            x = self.blocks[0].ln0(self.emb(tokens))

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
        if logits == "none":
            return None, new_state
        if logits == "last":
            x = x[:, -1:]
        out = self.head(self.ln_out(x)).float()
        return out, new_state
