"""The WKV operator: one signature, several implementations.

``wkv(w, u, k, v, state) -> (y, new_state)`` with w = -exp(time_decay) and u =
time_first, both [C]; k, v [B, T, C]; state (aa, bb, pp) each [B, C] or None.
y and the state are float32 (float64 if k is float64).

Backends:

- ``"reference"``: :mod:`rwkvkit.ops.reference`, the spec; slow.
- ``"torch"``: chunked PyTorch formulation, any device, autograd backward.
- ``"cpu"``: compiled C++ scan (forward and backward), built lazily; falls
  back to ``"torch"`` with one warning where it cannot be built.
- ``"cuda"``: the GPU kernel (see :mod:`rwkvkit.ops.cuda`).
- ``"auto"``: ``"cuda"`` for CUDA tensors, ``"cpu"`` for CPU tensors, each
  falling back to ``"torch"``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .dispatch import Backends
from .reference import wkv_closed_form, wkv_reference
from .types import WKVState, initial_state


def _module_impl(module: str) -> Callable[[], Callable | None]:
    def load() -> Callable | None:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ImportError:
            return None
        return mod.get_implementation()  # None when unavailable (warns once)

    return load


_BACKENDS = Backends(
    "WKV",
    {"reference": lambda: wkv_reference, "torch": _module_impl("chunked"), "cpu": _module_impl("cpu"), "cuda": _module_impl("cuda")},
    prefer={"cuda": ("cuda",), "cpu": ("cpu",)},
)
BACKENDS = _BACKENDS.names


def _load(name: str) -> Callable | None:
    """The implementation function of a backend, or None if it cannot run here."""
    return _BACKENDS.load(name)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Which implementation ``backend`` means for tensors on ``device``."""
    return _BACKENDS.resolve(backend, device)


def wkv(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, WKVState]:
    """Run the WKV operator with the chosen backend (see module docstring)."""
    fn = _load(resolve_backend(backend, k.device))
    assert fn is not None
    return fn(w, u, k, v, state)


def wkv_step(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKVState
) -> tuple[torch.Tensor, WKVState]:
    """One token of the stable recurrence (spec 2.4) on [B, C] tensors.

    The RNN step of the model uses this directly: for T = 1 a few element-wise
    ops are cheaper than any scan.  On a GPU with the CUDA kernel built, an
    inference step (no gradient wanted) runs them as one fused launch.
    """
    if k.is_cuda and not (torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v, *state))):
        if _load("cuda") is not None:
            from .cuda import wkv_step_cuda

            return wkv_step_cuda(w, u, k, v, state)
    return wkv_step_torch(w, u, k, v, state)


def wkv_step_torch(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKVState
) -> tuple[torch.Tensor, WKVState]:
    """:func:`wkv_step` as element-wise PyTorch ops (any device, differentiable)."""
    aa, bb, pp = state
    ww = u + k
    q = torch.maximum(pp, ww)
    e1 = torch.exp(pp - q)
    e2 = torch.exp(ww - q)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + w
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    return y, (e1 * aa + e2 * v, e1 * bb + e2, q)


__all__ = ["wkv", "wkv_step", "wkv_step_torch", "wkv_reference", "wkv_closed_form", "resolve_backend", "initial_state", "BACKENDS"]
