"""Shared fixtures.

Data written by others (rwkv.cpp's tiny models, tokenizers, corpora) is read
from ``../shared/data`` next to the checkout, or from ``$RWKVKIT_SHARED_DATA``.
On a user's machine a test that needs a missing file, optional package or
compiled extension is skipped with the reason; in CI (``CI`` set to true, 1 or
yes, as ``.ci/run`` does) it fails, so nothing the suite should check can hide
behind a skip.  Use :func:`skip_or_fail` and :func:`importorskip` for such
skips, never ``pytest.skip`` / ``pytest.importorskip`` directly.

``RWKVKIT_TEST_ISA=scalar|avx2|avx512`` forces the SIMD kernel family of the
fused C++ decoder for the whole run (``.ci/run`` runs the speed-path tests a
second time with avx2, so an AVX-512 machine checks both paths).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RWKVKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

ISA_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2}
FORCED_ISA = os.environ.get("RWKVKIT_TEST_ISA", "").strip().lower() or None
# The kernel family tests return to after forcing another one (-1: the best).
DEFAULT_ISA = ISA_NAMES.get(FORCED_ISA, -1) if FORCED_ISA else -1

# The rwkv package reads these at import time; set them before any test imports it.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


# The C++ extensions the tests load, each built by its own lazy loader.  A
# fresh checkout compiles all of them (a minute or more in total); started in
# the background at session start they compile on the second core while the
# first tests run, and a test that needs one waits for it on torch's build lock.
_PREBUILD = (
    "import rwkvkit.runtime.infer_cpu as m; m.load_extension()",
    "import rwkvkit.ops.cpu as m; m.get_implementation(); "
    "import rwkvkit.ops.wkv7.cpu as m; m.load_extension(); "
    "import rwkvkit.ops.wkv6.cpu as m; m.load_extension()",
)


def pytest_sessionstart(session):
    if os.environ.get("RWKVKIT_TEST_PREBUILD", "1") == "0":
        return
    import subprocess
    import sys

    for code in _PREBUILD:
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def skip_or_fail(msg: str) -> None:
    """Skip the test for something missing here; fail instead in CI."""
    if IN_CI:
        pytest.fail(f"{msg} (a skip is a failure in CI)", pytrace=False)
    pytest.skip(msg)


def importorskip(name: str):
    """pytest.importorskip, except that a missing package fails in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"the optional package {name} is not installed ({exc})")


def shared_file(relative: str) -> Path:
    """Path of a fixture under the shared data folder; skip (or fail in CI) if absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        skip_or_fail(f"fixture {path} is missing (set RWKVKIT_SHARED_DATA to the folder holding shared/data)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _forced_isa():
    """RWKVKIT_TEST_ISA: run every test with that kernel family of the fused decoder."""
    if FORCED_ISA is None:
        yield
        return
    if FORCED_ISA not in ISA_NAMES:
        pytest.exit(f"RWKVKIT_TEST_ISA must be one of {', '.join(ISA_NAMES)}, got {FORCED_ISA!r}", returncode=4)
    from rwkvkit.runtime import infer_cpu

    if infer_cpu.load_extension() is None:
        pytest.exit("RWKVKIT_TEST_ISA is set but the fused CPU decoder cannot be built", returncode=4)
    got = infer_cpu.set_isa(ISA_NAMES[FORCED_ISA])
    if got != ISA_NAMES[FORCED_ISA]:
        pytest.exit(f"RWKVKIT_TEST_ISA={FORCED_ISA}: this CPU does not support that kernel family", returncode=4)
    yield
    infer_cpu.set_isa(-1)


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
