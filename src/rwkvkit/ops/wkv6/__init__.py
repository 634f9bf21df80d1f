"""The RWKV-5/6 ("Eagle"/"Finch") WKV operator: one signature, two implementations.

``wkv6(r, k, v, logw, u, state=None) -> (y, new_state)`` with r, k, v, logw
[B, T, H, N], u [H, N] and state [B, H, N, N] (S[i][j]: i = key channel, j =
value channel, the ``rwkv`` pip package's RWKV-5/6 orientation; RWKV-7's is
the transpose).  Per head and token (spec 3.2 step 4, 3.3 step 6):

    y_t[j] = sum_i r_t[i] (S[i][j] + u[i] k_t[i] v_t[j]),
    S <- diag(w_t) S + k_t v_t^T,   w_t = exp(logw_t).

RWKV-6 passes its per-token decay logw = -exp(d_t); RWKV-5 the constant
-exp(time_decay) broadcast over T (a 5.0/5.1 per-head decay broadcast over N
too).  The log-decay is what the chunked form needs, and -exp(d) never takes
the log of an underflowed w.  y and the state are float32 (float64 for
float64 inputs); bf16/fp16 inputs are computed in float32.  The input state is
never modified; gradients reach every input, u and the state included.

Backends:

- ``"reference"``: :mod:`.reference`, the per-token loop; the spec, slow.
- ``"torch"``: :mod:`.chunked`, the sub-chunked form (spec 6.1), stable for
  any logw <= 0; any device, autograd backward.
- ``"cuda"``: :mod:`.cuda`, the CUDA kernels (forward, backward, decode
  step), built lazily with nvcc; where the build fails, one warning and
  ``"torch"``.
- ``"cpu"``: :mod:`.cpu`, the compiled C++ scan (forward, and a backward
  from state checkpoints; AVX-512 / AVX2 / scalar picked at run time), built
  lazily through :mod:`rwkvkit._cbuild`; where the build fails, one warning
  and ``"torch"``.
- ``"auto"``: ``"cuda"`` for CUDA tensors (when it builds), ``"cpu"`` for CPU
  tensors (when it builds; measured 5-9x faster than ``"torch"`` forward and
  forward+backward at a prompt and a training shape, 2 threads, ``NOTES.md``),
  else ``"torch"``.

:func:`wkv6_step` on CUDA tensors with no gradient wanted runs the kernel's
one-token launch instead of the handful of PyTorch ops.
"""

from __future__ import annotations

import torch

from ..dispatch import Backends
from .chunked import DEFAULT_CHUNK, DEFAULT_SUB_CHUNK, wkv6_chunked
from .reference import wkv6_reference
from .types import check_step_inputs, compute_dtype


def _load_cuda():
    from . import cuda  # plain Python: importing never builds anything

    return cuda.get_implementation()  # None without a GPU, or (after one warning) when the build fails


def _load_cpu():
    from . import cpu  # plain Python: importing never builds anything

    return cpu.get_implementation()  # None (after one warning) when the build fails


_BACKENDS = Backends(
    "WKV6",
    {"reference": lambda: wkv6_reference, "torch": lambda: wkv6_chunked, "cpu": _load_cpu, "cuda": _load_cuda},
    prefer={"cuda": ("cuda",), "cpu": ("cpu",)},
)
BACKENDS = _BACKENDS.names


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Which implementation ``backend`` means for tensors on ``device``."""
    return _BACKENDS.resolve(backend, device)


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the RWKV-5/6 WKV operator over a sequence (see the module docstring)."""
    return _BACKENDS.get(backend, r.device)(r, k, v, logw, u, state)


def wkv6_step(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logw: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token on [B, H, N] tensors, u [H, N], a [B, H, N, N] state: the decode path.

    Differentiable; returns y [B, H, N] (from the old state plus the bonus)
    and the new state (a new tensor).  On a GPU with the CUDA kernel built and
    no gradient wanted, one launch.
    """
    check_step_inputs(r, k, v, logw, u, state)
    if r.is_cuda and not (torch.is_grad_enabled() and any(x.requires_grad for x in (r, k, v, logw, u, state))):
        if _BACKENDS.load("cuda") is not None:
            from .cuda import supported, wkv6_step_cuda

            if supported(r):
                return wkv6_step_cuda(r, k, v, logw, u, state)
    dt = compute_dtype(r)
    r, k, v, logw, u, state = (x.to(dt) for x in (r, k, v, logw, u, state))  # no-ops in fp32
    bonus = (r * u * k).sum(-1, keepdim=True)  # [B, H, 1]
    y = torch.addcmul((r.unsqueeze(-2) @ state).squeeze(-2), bonus, v)
    S = torch.addcmul(state * torch.exp(logw).unsqueeze(-1), k.unsqueeze(-1), v.unsqueeze(-2))
    return y, S


__all__ = [
    "wkv6",
    "wkv6_step",
    "wkv6_reference",
    "wkv6_chunked",
    "resolve_backend",
    "BACKENDS",
    "DEFAULT_CHUNK",
    "DEFAULT_SUB_CHUNK",
]
