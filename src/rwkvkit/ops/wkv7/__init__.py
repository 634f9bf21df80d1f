"""The RWKV-7 ("Goose") WKV operator: one signature, several implementations.

``wkv7(r, logw, k, v, a, b, state=None) -> (y, new_state)`` with r, logw, k,
v, a, b all [B, T, H, N] and state [B, H, N, N] (S[i][j]: i = value channel,
j = key channel, the ``rwkv`` pip package's orientation; fla's is the
transpose).  Per head and token (spec 3.4 step 9):

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t,

with w_t = exp(logw_t).  The model passes a = -kappa_hat, b = kappa_hat*alpha,
k = k_tilde and logw = -exp(-0.5)*sigmoid(w_hat): the log-decay, because the
chunked form needs it and it avoids a log(exp()) round trip.  y and the state
are float32 (float64 for float64 inputs); bf16/fp16 inputs are computed in
float32.  The input state is never modified; gradients reach every input,
the state included.

Backends:

- ``"reference"``: :mod:`.reference`, the per-token loop; the spec, slow.
- ``"torch"``: :mod:`.chunked`, the chunked WY/UT form (spec 6.2); any device,
  autograd backward.
- ``"cpu"``: :mod:`.cpu`, the compiled C++ scans (forward and backward,
  SIMD chosen at run time), built lazily; where the build fails, one warning
  and ``"torch"``.  Measured 6-9x faster than ``"torch"`` for prompts and
  for training batches, forward and backward (NOTES.md, "CPU kernel").
- ``"cuda"``: :mod:`.cuda`, the CUDA kernels (forward, backward, decode
  step), built lazily with nvcc; where the build fails, one warning and
  ``"torch"``.
- ``"auto"``: ``"cuda"`` for CUDA tensors, ``"cpu"`` for CPU tensors, each
  falling back to ``"torch"`` when it cannot be built.

:func:`wkv7_step` on CUDA tensors with no gradient wanted runs the kernel's
one-token launch instead of the handful of PyTorch ops.
"""

from __future__ import annotations

import torch

from ..dispatch import Backends
from .chunked import DEFAULT_CHUNK, wkv7_chunked
from .reference import wkv7_reference
from .types import check_step_inputs, compute_dtype


def _load_cpu():
    from . import cpu  # plain Python: importing never builds anything

    return cpu.get_implementation()  # None (after one warning) when the build fails


def _load_cuda():
    from . import cuda  # plain Python: importing never builds anything

    return cuda.get_implementation()  # None without a GPU, or (after one warning) when the build fails


_BACKENDS = Backends(
    "WKV7",
    {"reference": lambda: wkv7_reference, "torch": lambda: wkv7_chunked, "cpu": _load_cpu, "cuda": _load_cuda},
    prefer={"cuda": ("cuda",), "cpu": ("cpu",)},
)
BACKENDS = _BACKENDS.names


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Which implementation ``backend`` means for tensors on ``device``."""
    return _BACKENDS.resolve(backend, device)


def wkv7(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the RWKV-7 WKV operator over a sequence (see the module docstring)."""
    return _BACKENDS.get(backend, r.device)(r, logw, k, v, a, b, state)


def wkv7_step(
    r: torch.Tensor,
    logw: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token on [B, H, N] tensors with a [B, H, N, N] state: the decode path.

    It runs once per layer per generated token, so it is a handful of ops
    (fused multiply-adds; measured a little faster than the plain
    expression or one [N, 2] x [2, N] matmul for both rank-1 updates).
    Differentiable; returns y [B, H, N] and the new state (a new tensor).
    On a GPU with the CUDA kernel built and no gradient wanted, one launch.
    """
    check_step_inputs(r, logw, k, v, a, b, state)
    if r.is_cuda and not (torch.is_grad_enabled() and any(x.requires_grad for x in (r, logw, k, v, a, b, state))):
        if _BACKENDS.load("cuda") is not None:
            from .cuda import supported, wkv7_step_cuda

            if supported(r):
                return wkv7_step_cuda(r, logw, k, v, a, b, state)
    dt = compute_dtype(r)
    r, logw, k, v, a, b, state = (x.to(dt) for x in (r, logw, k, v, a, b, state))  # no-ops in fp32
    sa = state @ a.unsqueeze(-1)  # [B, H, N(value), 1]: uses the old S
    S = torch.addcmul(state * torch.exp(logw).unsqueeze(-2), sa, b.unsqueeze(-2))
    S = torch.addcmul(S, v.unsqueeze(-1), k.unsqueeze(-2))  # [B, H, N(value), N(key)]
    y = (S @ r.unsqueeze(-1)).squeeze(-1)  # uses the new S
    return y, S


__all__ = ["wkv7", "wkv7_step", "wkv7_reference", "wkv7_chunked", "resolve_backend", "BACKENDS", "DEFAULT_CHUNK"]
