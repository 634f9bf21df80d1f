"""Inference accelerators: the layer above the models that the models never import.

- :mod:`~rwkvkit.runtime.infer_cpu`: the fused C++ one-token step on the CPU
  (fp32, bf16, fp16 and int8 weights), with optional 2 MiB pages for the weights;
- :mod:`~rwkvkit.runtime.quant`: int8 weight matrices (:func:`quantize_int8`);
- :mod:`~rwkvkit.runtime.cuda_graph`: the decode step as one CUDA graph;
- half-precision prompts with fp32 activations where the CPU has no native
  bf16/fp16 matmul (:func:`native_half_matmul`; ``model.prompt_dtype``).

A model gets an accelerator through :func:`accelerate`, which sets its
``step_accelerator`` hook; ``rwkvkit.load`` calls it.  Without one a model
runs its plain PyTorch step: the same maths, slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    quantising the model later changes what runs, re-ask then), and
    ``model.prompt_matmul``, how a half model's prompts multiply (see
    :func:`_half_prompts`).  Returns the model.
    """
    model.step_accelerator = CpuStep(huge_pages=huge_pages)
    model._decode_plan = None
    model.decode_kernel = decode_kernel(model)
    model.prompt_matmul = _half_prompts(model)
    return model


# --------------------------------------------------------- half-precision prompts
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively at least as fast as fp32.

    Measured with torch 2.13's oneDNN on the 169M shape, prompt of 128-256
    tokens, 2 threads, prompt tok/s relative to fp32: Sapphire Rapids with
    AMX: bf16 3.4x, fp16 0.93x; the same CPU limited to AVX512-BF16 (as Zen 4):
    bf16 0.64x, fp16 0.10x; to AVX-512: 0.27x / 0.12x; to AVX2: 0.12x / 0.11x.
    So native means AMX for bf16 (amx_bf16) and AVX512-FP16 or AMX for fp16
    (avx512_fp16, amx_fp16); elsewhere prompts take the fp32 route of
    :func:`_half_prompts`.
    """
    flags = {torch.bfloat16: ("amx_bf16",), torch.float16: ("avx512_fp16", "amx_fp16")}.get(dtype)
    if flags is None:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split())
                    return any(fl in have for fl in flags)
    except OSError:
        pass
    return False


def _half_prompts(model) -> str:
    """Choose how the half model's prompts multiply; says which.

    Where the CPU has no native half matmul the model runs prompts with fp32
    activations (``model.prompt_dtype``): each product widens its weight
    (exact) and is an fp32 GEMM, and the element-wise work is fp32 too (half
    arithmetic on such a CPU converts per element).  Measured on the RWKV-7
    0.1B shape, T = 512, with oneDNN limited to AVX-512 (no AMX, no BF16):
    bf16 prompts at 0.71x fp32 with only the products in fp32, ~1.0x with
    fp32 activations.  Training and the one-token step are unchanged.
    """
    dtype = model.dtype
    model.prompt_dtype = None
    if model.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return f"PyTorch {str(dtype).removeprefix('torch.')} matmul"
    name = str(dtype).removeprefix("torch.")
    if native_half_matmul(dtype):
        return f"PyTorch {name} matmul (native on this CPU)"
    model.prompt_dtype = torch.float32
    return f"{name} weights widened to fp32 per product, fp32 activations (no native {name} matmul on this CPU)"


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


__all__ = ["accelerate", "decode_kernel", "native_half_matmul", "quantize_int8", "CpuStep"]
