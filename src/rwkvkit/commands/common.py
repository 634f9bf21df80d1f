"""Helpers shared by the command-line verbs."""

from __future__ import annotations

import argparse
from pathlib import Path



def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model PATH``, ``--dtype`` and ``--device``, as every model-taking verb spells them."""
    parser.add_argument("--model", "-m", required=required, metavar="PATH", help="checkpoint: .pth, .safetensors, rwkv.cpp .bin, HF or rwkvkit folder; or a Hugging Face hub id "
                        "(RWKV/rwkv-4-169m-pile, or owner/name/FILE for one file of a repository), fetched once with rwkvkit[hub]")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast the weights (default: the file's dtype)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")


# Below this many parameters the CLI runs on one CPU thread (faster for tiny models).
SMALL_MODEL_PARAMS = 20_000_000


def one_thread_for_small_models(model) -> None:
    """A small model's forward is many tiny ops: a second thread only adds
    synchronisation, which costs 3-10x on a quiet machine and 20-70x on a busy
    one (measured: RWKV-7 834K, 1024 tokens, 0.08 s on 1 thread, 1.4-5.6 s on 2
    with the other core loaded)."""
    if model.device.type == "cpu" and model.num_parameters() < SMALL_MODEL_PARAMS:
        import torch

        torch.set_num_threads(1)


def load_model_arg(path: "str | Path", **kw):
    """Load the model named by a ``--model`` flag (see :func:`rwkvkit.checkpoint.load_user_model`)."""
    from ..checkpoint import load_user_model

    return load_user_model(path, **kw)
