"""Lazy build and load of rwkvkit's CUDA kernel libraries for RWKV-5/6/7.

Each library is one ``.cu`` file under ``ops/csrc`` with an ``extern "C"``
interface, compiled on first use with ``nvcc`` alone (no PyTorch C++ headers)
into ``~/.cache/rwkvkit/kernels`` and loaded with :mod:`ctypes`, exactly like
the RWKV-4 kernel (:mod:`rwkvkit.ops.cuda`, whose nvcc lookup and arch flags
this reuses).  A machine without a GPU never builds; a failed build warns once
and the operator falls back to its ``"torch"`` backend.

The same sources also compile with a plain C++ compiler against
``csrc/cuda_emu.h`` (:func:`build_emulation`): every CUDA thread of a block
becomes a host thread, so the kernels' own code can be run and checked on a
machine without a GPU (tests/test_cuda_emulation.py).  The emulation is for
tests only: it is slow and never used by the operators.
"""

from __future__ import annotations

import contextlib

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
_FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17"]


class KernelBuildError(RuntimeError):
    """A CUDA kernel library could not be compiled or loaded."""


def _compile(cmd_head: list[str], source: Path, flags: list[str], key_extra: str, out_dir: Path, stem: str) -> Path:
    # The source, every shared header next to it, the flags and the compiler's version.
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("cuda_emu.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + key_extra.encode()).hexdigest()[:16]
    out = out_dir / f"{stem}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    cmd = [*cmd_head, *flags, str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise KernelBuildError(f"compiler failed ({' '.join(cmd)}): {' | '.join(msg[-8:])}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f"compiler timed out: {e}") from e
    except OSError as e:
        raise KernelBuildError(f"cannot run {cmd[0]}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class CudaLibrary:
    """One lazily built kernel library (``csrc/<name>.cu``) and its one-time warning."""

    def __init__(self, name: str, what: str, declare: Callable[[ctypes.CDLL], None]):
        self.name = name
        self.what = what  # e.g. "WKV-7" (for messages)
        self.source = CSRC / f"{name}.cu"
        self.declare = declare
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.failed: str | None = None
        self.warned = False

    def build(self, capability: tuple[int, int] | None = None, directory: Path | None = None) -> Path:
        """Compile with nvcc for ``capability`` (default: the current GPU); return the .so path."""
        from .cuda import _arch_flags, cache_dir, find_nvcc

        nvcc = find_nvcc()
        if nvcc is None:
            raise KernelBuildError("no CUDA compiler (nvcc) found: install the CUDA toolkit or set CUDA_HOME")
        try:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"cannot run {nvcc}: {e}") from e
        flags = _FLAGS + _arch_flags(capability)
        return _compile([nvcc], self.source, flags, version, directory or cache_dir(), self.name)

    def load(self) -> ctypes.CDLL:
        """The loaded library; builds it on first call.  Raises KernelBuildError."""
        with self._lock:
            if self.lib is not None:
                return self.lib
            if self.failed is not None:
                raise KernelBuildError(self.failed)
            if not torch.cuda.is_available():
                raise KernelBuildError("no CUDA device is available")
            try:
                lib = ctypes.CDLL(str(self.build()))
                self.declare(lib)
            except (KernelBuildError, OSError, AttributeError) as e:
                self.failed = str(e)
                raise KernelBuildError(self.failed) from e
            self.lib = lib
            return lib

    def available(self) -> bool:
        """True if the kernels can run here; never builds without a GPU; warns once on failure."""
        if not torch.cuda.is_available():
            return False
        try:
            self.load()
        except KernelBuildError as e:
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"rwkvkit: the CUDA {self.what} kernel could not be built ({e}); "
                    "falling back to the slower PyTorch 'torch' backend.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        return True

    def reset(self) -> None:
        """Forget the loaded library and any failure (tests)."""
        self.lib, self.failed, self.warned = None, None, False


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build_emulation(name: str, directory: Path) -> Path:
    """Compile ``csrc/<name>.cu`` as host C++ against cuda_emu.h (tests only)."""
    cxx = find_cxx()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found for the CUDA emulation build")
    flags = [
        "-O1", "-shared", "-fPIC", "-std=c++17", "-pthread", "-fno-strict-aliasing",
        "-x", "c++", "-DRWKVKIT_CUDA_EMULATION", f"-I{CSRC}", "-Wno-unknown-pragmas",
    ]  # fmt: skip
    return _compile([cxx], CSRC / f"{name}.cu", flags, "emulation", directory, f"{name}_emu")


def on_device(dev: torch.device):
    """Make ``dev`` current for the launch (the kernels run on the current device)."""
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def kernel_dtype(xs) -> torch.dtype:
    """bfloat16 when every input is bfloat16, else float32 (fp16 and mixed inputs are upcast)."""
    return torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in xs) else torch.float32


def stream_of(t: torch.Tensor) -> int | None:
    """The current CUDA stream handle for ``t``'s device (None for CPU tensors: the emulation)."""
    if t.device.type != "cuda":
        return None
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"rwkvkit CUDA {what} failed: {lib.rwkvkit_cuda_error_string(code).decode()}")
