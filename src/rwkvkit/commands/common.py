"""Helpers shared by the command-line verbs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointError, RwkvkitError


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model PATH``, ``--dtype`` and ``--device``, as every model-taking verb spells them."""
    parser.add_argument("--model", "-m", required=required, metavar="PATH", help="checkpoint: .pth, .safetensors, rwkv.cpp .bin, HF or rwkvkit folder")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast the weights (default: the file's dtype)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")


def load_model_arg(path: "str | Path", **kw):
    """Load the model named by a ``--model`` flag, for a command line.

    Takes the keywords of :func:`rwkvkit.load` (``dtype``, ``device``,
    ``rescale_every``, ``ln0_fold_dtype``) and turns every input problem,
    including a bad dtype or device name, into one-line
    :class:`~rwkvkit.errors.RwkvkitError`; shows a progress bar while reading
    large checkpoints.
    """
    from ..checkpoint import load
    from ..config import dtype_from_name

    if path is None or str(path) == "":
        raise CheckpointError("no model given: pass --model PATH")
    dtype = kw.pop("dtype", None)
    if dtype is not None:
        try:
            dtype = dtype_from_name(dtype)
        except ValueError as exc:
            raise RwkvkitError(str(exc)) from None
    device = kw.pop("device", None)
    if device is not None:
        import torch

        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise RwkvkitError(f"invalid --device {device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RwkvkitError(f"--device {device} asked for, but no CUDA GPU is available")
    kw.setdefault("progress", True)
    return load(path, dtype=dtype, device=device, **kw)
