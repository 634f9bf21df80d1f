"""The WKV operator on NVIDIA GPUs (backend ``"cuda"``).

The kernel (``csrc/wkv_cuda.cu``) is the paper's time-sequential scan, one
thread per (batch row, channel), with three differences from the official one
(spec 5.6, 5.7): no compile-time sequence limit, a state carried in and out,
and gradients for that state.  It is built on first use with ``nvcc`` alone
(a few seconds; no PyTorch C++ headers, so no header/compiler mismatches) into
``~/.cache/rwkvkit/kernels`` and loaded with :mod:`ctypes`.  A machine without
a GPU never tries; where the build fails, :func:`get_implementation` returns
None after ONE warning and the dispatcher falls back to the ``"torch"`` backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .types import WKVState, check_inputs

_SOURCE = Path(__file__).resolve().parent / "csrc" / "wkv_cuda.cu"
_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None  # why the build failed, once it has
_warned = False


class KernelBuildError(RuntimeError):
    """The CUDA kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (one file per source/GPU/compiler)."""
    return Path.home() / ".cache" / "rwkvkit" / "kernels"


def find_nvcc() -> str | None:
    """The CUDA compiler PyTorch would use (its CUDA_HOME), else the one on PATH."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch without cpp_extension
        CUDA_HOME = None
    if CUDA_HOME:
        cand = Path(CUDA_HOME) / "bin" / "nvcc"
        if cand.exists():
            return str(cand)
    return shutil.which("nvcc")


def _arch_flags(capability: tuple[int, int] | None = None) -> list[str]:
    major, minor = capability or torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    # Machine code for this GPU plus its PTX, so a newer driver can still JIT it.
    return [f"-gencode=arch=compute_{cc},code=[sm_{cc},compute_{cc}]"]


def build(capability: tuple[int, int] | None = None, directory: Path | None = None) -> Path:
    """Compile the kernel library (cached); return its path.

    ``capability`` is the GPU's (major, minor) compute capability, by default
    the current device's; ``directory`` defaults to :func:`cache_dir`.  Raises
    :class:`KernelBuildError` with the compiler's message on failure.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("no CUDA compiler (nvcc) found: install the CUDA toolkit or set CUDA_HOME")
    flags = _FLAGS + _arch_flags(capability)
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run {nvcc}: {e}") from e
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = (directory or cache_dir()) / f"wkv_cuda_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    cmd = [nvcc, *flags, str(_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise KernelBuildError(f"nvcc failed ({' '.join(cmd)}): {' | '.join(msg[-5:])}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f"nvcc timed out: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.rwkvkit_wkv_chunk.restype = I
    lib.rwkvkit_wkv_chunk.argtypes = []
    lib.rwkvkit_wkv_forward.restype = I
    lib.rwkvkit_wkv_forward.argtypes = [I, I, I, I] + [P] * 13
    lib.rwkvkit_wkv_backward.restype = I
    lib.rwkvkit_wkv_backward.argtypes = [I, I, I, I] + [P] * 17
    lib.rwkvkit_wkv_step.restype = I
    lib.rwkvkit_wkv_step.argtypes = [I, I, I] + [P] * 12
    lib.rwkvkit_cuda_error_string.restype = ctypes.c_char_p
    lib.rwkvkit_cuda_error_string.argtypes = [I]


def load_library() -> ctypes.CDLL:
    """The loaded kernel library; builds it on first call.  Raises KernelBuildError."""
    global _lib, _failed
    with _lock:
        if _lib is not None:
            return _lib
        if _failed is not None:
            raise KernelBuildError(_failed)
        if not torch.cuda.is_available():
            raise KernelBuildError("no CUDA device is available")
        try:
            lib = ctypes.CDLL(str(build()))
            _declare(lib)
        except (KernelBuildError, OSError, AttributeError) as e:
            _failed = str(e)
            raise KernelBuildError(_failed) from e
        _lib = lib
        return lib


def get_implementation():
    """``wkv_cuda`` if the kernel can run here, else None.

    Never builds without a GPU.  A failed build warns once (with the reason) and
    returns None, so the dispatcher uses the ``"torch"`` backend instead.
    """
    global _warned
    if not torch.cuda.is_available():
        return None
    try:
        load_library()
    except KernelBuildError as e:
        if _warned:
            return None
        _warned = True
        warnings.warn(
            f"rwkvkit: the CUDA WKV kernel could not be built ({e}); "
            "falling back to the slower PyTorch 'torch' backend.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return wkv_cuda


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"rwkvkit CUDA WKV {what} failed: {lib.rwkvkit_cuda_error_string(code).decode()}")


class _WKVFunction(torch.autograd.Function):
    """Autograd wrapper: inputs are already contiguous, on one GPU, k/v fp32 or bf16."""

    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        lib = load_library()
        B, T, C = k.shape
        chunk = lib.rwkvkit_wkv_chunk()
        need_grad = any(ctx.needs_input_grad)
        y = torch.empty(B, T, C, device=k.device, dtype=torch.float32)
        out = [torch.empty(B, C, device=k.device, dtype=torch.float32) for _ in range(3)]
        nc = (T + chunk - 1) // chunk
        ck = torch.empty(3, B, nc, C, device=k.device, dtype=torch.float32) if need_grad and nc else None
        stream = torch.cuda.current_stream(k.device).cuda_stream
        code = lib.rwkvkit_wkv_forward(
            int(k.dtype == torch.bfloat16), B, T, C,
            _ptr(w), _ptr(u), _ptr(k), _ptr(v), _ptr(aa), _ptr(bb), _ptr(pp),
            _ptr(y), _ptr(out[0]), _ptr(out[1]), _ptr(out[2]), _ptr(ck), stream,
        )  # fmt: skip
        _check(lib, code, "forward")
        if need_grad:
            ctx.save_for_backward(w, u, k, v, ck)
        return y, out[0], out[1], out[2]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_aa, g_bb, g_pp):
        lib = load_library()
        w, u, k, v, ck = ctx.saved_tensors
        B, T, C = k.shape
        dev = k.device
        gy, g_aa, g_bb, g_pp = (g.float().contiguous() for g in (gy, g_aa, g_bb, g_pp))
        gk = torch.empty_like(k)
        gv = torch.empty_like(v)
        gw_part = torch.empty(B, C, device=dev, dtype=torch.float32)
        gu_part = torch.empty(B, C, device=dev, dtype=torch.float32)
        gs = [torch.empty(B, C, device=dev, dtype=torch.float32) for _ in range(3)]
        if T == 0:
            return torch.zeros_like(w), torch.zeros_like(u), gk, gv, g_aa, g_bb, g_pp
        stream = torch.cuda.current_stream(dev).cuda_stream
        code = lib.rwkvkit_wkv_backward(
            int(k.dtype == torch.bfloat16), B, T, C,
            _ptr(w), _ptr(u), _ptr(k), _ptr(v), _ptr(ck), _ptr(gy), _ptr(g_aa), _ptr(g_bb), _ptr(g_pp),
            _ptr(gk), _ptr(gv), _ptr(gw_part), _ptr(gu_part), _ptr(gs[0]), _ptr(gs[1]), _ptr(gs[2]), stream,
        )  # fmt: skip
        _check(lib, code, "backward")
        return gw_part.sum(0), gu_part.sum(0), gk, gv, gs[0], gs[1], gs[2]


def wkv_cuda(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
) -> tuple[torch.Tensor, WKVState]:
    """The WKV operator on a GPU, same contract as :func:`rwkvkit.ops.wkv_reference`.

    k, v [B, T, C] in float32 or bfloat16 (float16 is computed as float32) on
    one CUDA device; w, u [C] and the state are used in float32.  Returns y
    [B, T, C] float32 and the final (aa, bb, pp).  Differentiable in every input,
    the state included.  float64 inputs (gradient checks) go to the reference.
    """
    B, T, C = check_inputs(w, u, k, v, state)
    if k.device.type != "cuda":
        raise ValueError(f"wkv backend 'cuda' needs CUDA tensors, got k on {k.device}")
    if k.dtype == torch.float64:
        from .reference import wkv_reference

        return wkv_reference(w, u, k, v, state)
    dt = torch.bfloat16 if (k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16) else torch.float32
    dev = k.device
    w, u = (x.to(device=dev, dtype=torch.float32).contiguous() for x in (w, u))
    k, v = (x.to(dt).contiguous() for x in (k, v))
    if state is None:
        # No gradient is wanted for an empty context: nothing to differentiate.
        aa = torch.zeros(B, C, device=dev, dtype=torch.float32)
        bb = torch.zeros(B, C, device=dev, dtype=torch.float32)
        pp = torch.full((B, C), -1e30, device=dev, dtype=torch.float32)
    else:
        aa, bb, pp = (s.to(device=dev, dtype=torch.float32).contiguous() for s in state)
    with torch.cuda.device(dev):
        y, aa, bb, pp = _WKVFunction.apply(w, u, k, v, aa, bb, pp)
    return y, (aa, bb, pp)


def wkv_step_cuda(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKVState
) -> tuple[torch.Tensor, WKVState]:
    """One token of the recurrence (same contract as :func:`rwkvkit.ops.wkv_step`) in one launch.

    k, v [B, C] float32 or bfloat16 on a GPU, w, u [C] and the state float32.
    Not differentiable: the caller uses it for inference only.
    """
    lib = load_library()
    B, C = k.shape
    dev = k.device
    bf16 = k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
    dt = torch.bfloat16 if bf16 else torch.float32
    w, u = (x.to(device=dev, dtype=torch.float32).contiguous() for x in (w, u))
    k, v = (x.to(dt).contiguous() for x in (k, v))
    aa, bb, pp = (s.to(device=dev, dtype=torch.float32).contiguous() for s in state)
    y = torch.empty(B, C, device=dev, dtype=torch.float32)
    out = [torch.empty(B, C, device=dev, dtype=torch.float32) for _ in range(3)]
    with torch.cuda.device(dev):
        code = lib.rwkvkit_wkv_step(
            int(bf16), B, C, _ptr(w), _ptr(u), _ptr(k), _ptr(v), _ptr(aa), _ptr(bb), _ptr(pp),
            _ptr(y), _ptr(out[0]), _ptr(out[1]), _ptr(out[2]), torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
    _check(lib, code, "step")
    return y, (out[0], out[1], out[2])
