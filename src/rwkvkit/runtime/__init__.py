"""Inference accelerators: the layer above the models that the models never import.

- :mod:`~rwkvkit.runtime.infer_cpu`: the fused C++ one-token step on the CPU
  (fp32, bf16, fp16 and int8 weights), with optional 2 MiB pages for the weights;
- :mod:`~rwkvkit.runtime.quant`: int8 weight matrices (:func:`quantize_int8`);
- :mod:`~rwkvkit.runtime.cuda_graph`: the decode step as one CUDA graph.

A model gets an accelerator through :func:`accelerate`, which sets its
``step_accelerator`` hook; ``rwkvkit.load`` calls it.  Without one a model
runs its plain PyTorch step: the same maths, slower.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuStep:
    """The fused CPU step as a model's ``step_accelerator``."""

    # Back the weight matrices with 2 MiB pages on the first step (Linux 6.1+;
    # costs about 1 s per 600 MB once, then every weight read misses the TLB
    # 512x less often; see infer_cpu.use_huge_pages).
    huge_pages: bool = False

    def __call__(self, model, tokens, state, want_logits: bool):
        from . import infer_cpu

        return infer_cpu.step(model, tokens, state, want_logits, huge_pages=self.huge_pages)


def accelerate(model, *, huge_pages: bool = False):
    """Attach the fastest one-token step this machine has for ``model``; in place.

    Generations without a fused decoder keep their PyTorch step (the hook
    declines per call, so nothing changes for them).  Sets
    ``model.decode_kernel``, one line saying which weights and kernels decode
    (:func:`decode_kernel`; a description as of this call: casting or
    quantising the model later changes what runs, re-ask then).  Returns the model.
    """
    model.step_accelerator = CpuStep(huge_pages=huge_pages)
    model._decode_plan = None
    model.decode_kernel = decode_kernel(model)
    return model


def decode_kernel(model) -> str:
    """Which weights and which one-token step ``model`` decodes with here, in one line."""
    from .infer_cpu import describe

    return describe(model)


def quantize_int8(model, head: bool = True):
    """Int8 weights with per-row scales, in place (see :mod:`rwkvkit.runtime.quant`)."""
    from .quant import quantize_int8 as _q

    out = _q(model, head=head)
    if getattr(model, "step_accelerator", None) is not None:
        model.decode_kernel = decode_kernel(model)
    return out


__all__ = ["accelerate", "decode_kernel", "quantize_int8", "CpuStep"]
