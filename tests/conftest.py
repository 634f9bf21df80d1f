"""Shared fixtures.

Data written by others (rwkv.cpp's tiny models, tokenizers, corpora) is read
from ``../shared/data`` next to the checkout, or from ``$RWKVKIT_SHARED_DATA``.
On a user's machine a test that needs a missing file is skipped with the
reason; in CI (``CI=true``) it fails, so a missing fixture cannot hide.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RWKVKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() == "true"

# The rwkv package reads these at import time; set them before any test imports it.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


def shared_file(relative: str) -> Path:
    """Path of a fixture under the shared data folder; skip (or fail in CI) if absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        msg = f"fixture {path} is missing (set RWKVKIT_SHARED_DATA to the folder holding shared/data)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def _threads():
    # Tiny test models run fastest on one thread (no cross-thread syncs), and
    # results do not depend on the thread count of the machine.
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
