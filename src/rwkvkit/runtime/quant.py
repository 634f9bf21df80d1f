"""Int8 weights for CPU inference: symmetric, one scale per output channel.

Every weight matrix W [out, in] of the blocks (and, by default, the head) is
stored as ``qweight = round(W / scale)`` in int8 with ``scale = max|W_row| / 127``
per output row, so W ~= qweight * scale[:, None].  Activations, LayerNorms,
the embedding, the WKV state and the logits stay float32 (weight-only
quantisation: the only error is the rounding of the weights).

Decoding one token reads each weight once, so int8 weights move a quarter of
the bytes of fp32 ones; the fused CPU decoder (:mod:`rwkvkit.infer_cpu`)
multiplies by the int8 rows directly.  Longer inputs (prompts) dequantise one
matrix at a time and use the fp32 matrix multiply.

    model = rwkvkit.load(path)
    rwkvkit.quant.quantize_int8(model)     # in place; also model.quantize_int8()

A quantised model is for inference: it cannot be trained, and rwkvkit.save
expects float weights (save the model before quantising it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RwkvkitError

# Up to this many rows (batch * time) an int8 linear multiplies by the int8
# weights directly; above it, dequantising the matrix once is cheaper.
_DIRECT_ROWS = 16


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (int8 qweight [out, in], float32 scale [out]), per output row.

    scale = max|W_row| / 127 (1 for an all-zero row), qweight = round(W / scale),
    so |W - qweight * scale| <= scale / 2 element-wise.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and per-output-channel fp32 scales.

    ``y = x @ (qweight * scale[:, None])^T``; x of any leading shape [..., in].
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; RWKV linear layers have none")
        m = cls(linear.in_features, linear.out_features)
        q, s = quantize_weight(linear.weight)
        m.qweight = q.to(linear.weight.device)
        m.scale = s.to(linear.weight.device)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix these int8 weights stand for, [out, in]."""
        return (self.qweight.to(dtype) * self.scale.to(dtype)[:, None]).contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        y = None
        if x2.shape[0] <= _DIRECT_ROWS and x2.device.type == "cpu" and not torch.is_grad_enabled():
            from . import infer_cpu  # noqa: F401  (same layer)

            y = infer_cpu.linear(x2, self.qweight, self.scale)
            if y is None:
                # No extension: torch's own int8-weight matrix multiply.
                y = torch._weight_int8pack_mm(x2.float().contiguous(), self.qweight, self.scale)
        if y is None:
            y = F.linear(x2.float(), self.dequantize())
        return y.to(x.dtype).reshape(*lead, self.out_features)


def _linears(model, head: bool):
    """Every projection matrix of every block (any generation), then the head."""
    for block in model.blocks:
        for sub in (block.att, block.ffn):
            for name, child in list(sub.named_children()):
                if isinstance(child, (nn.Linear, Int8Linear)):
                    yield sub, name
    if head:
        yield model, "head"


@torch.no_grad()
def quantize_int8(model, head: bool = True):
    """Replace the model's weight matrices by :class:`Int8Linear` layers, in place.

    ``head=False`` keeps the output projection in float (more accurate logits,
    slower decoding: the head is about a third of the weights of a 169M model).
    The embedding is never quantised (decoding reads one row of it).  Returns
    the model.
    """
    from ..models.common import RWKVBase

    if not isinstance(model, RWKVBase):
        raise RwkvkitError(f"quantize_int8 expects an rwkvkit RWKV model, got {type(model).__name__}")
    if model.training:
        model.eval()
    for parent, name in _linears(model, head):
        lin = getattr(parent, name)
        if isinstance(lin, Int8Linear):
            continue
        if not isinstance(lin, nn.Linear):
            raise RwkvkitError(f"cannot quantise {name}: a {type(lin).__name__}, expected nn.Linear")
        setattr(parent, name, Int8Linear.from_linear(lin))
    model._decode_plan = None
    return model


def is_quantized(model) -> bool:
    """Whether any layer of ``model`` holds int8 weights."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "quantize_weight", "quantize_int8", "is_quantized"]
