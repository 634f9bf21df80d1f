"""Lazy builds of rwkvkit's C++ extensions (shared by ops/cpu.py and infer_cpu.py).

The extensions compile on first use with torch.utils.cpp_extension and are
cached in torch's extension folder; callers fall back to plain PyTorch when a
build fails, with one warning naming :func:`failure_cause`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def _put_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; a venv's bin (where the `ninja`
    # wheel puts it) is on PATH only when the venv is activated.
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja

        extra.append(ninja.BIN_DIR)
    except ImportError:
        pass
    path = os.environ.get("PATH", "")
    missing = [d for d in extra if d not in path.split(os.pathsep)]
    if missing:
        os.environ["PATH"] = os.pathsep.join(missing + [path])


def _is_cached(cpp_extension, name: str) -> bool:
    try:
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper; if it moves, just say nothing
        return True
    return any(folder.glob(f"{name}*.so"))


# A build that was killed leaves torch's `lock` file behind, and torch then
# waits for it forever.  A lock older than this is taken for such a leftover.
STALE_LOCK_SECONDS = 20 * 60


def _source_tag(sources: list[str], cflags: list[str]) -> str:
    """A short hash of the sources (their paths and contents, and the headers
    beside them) and the flags.  The path counts because torch's build files
    name it: two checkouts sharing a folder would rebuild over each other."""
    import hashlib

    h = hashlib.sha256(" ".join(cflags).encode())
    files = sorted({Path(s).resolve() for s in sources} | {f.resolve() for s in sources for f in Path(s).parent.glob("*.h")})
    for f in files:
        h.update(str(f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _clear_stale_lock(cpp_extension, name: str) -> None:
    import time

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except Exception:  # no lock (the usual case), or the private helper moved
        return
    if age > STALE_LOCK_SECONDS:
        print(f"rwkvkit: removing a build lock left {age / 60:.0f} minutes ago by an interrupted build: {lock}",
              file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)


def build_extension(name: str, sources: list[str], cflags: list[str], what: str):
    """Compile (or load the cached build of) an extension; raises on failure.

    The build folder is named after a hash of the sources (paths and contents)
    and flags, so two versions of the code (two checkouts, an upgrade) never
    rebuild over each other or load each other's half-built library.  A first compile takes tens
    of seconds, so it is announced on stderr once (a cache load is silent).
    """
    name = f"{name}_{_source_tag(sources, cflags)}"
    # torch logs "No CUDA runtime is found" when cpp_extension is imported on a
    # CPU-only machine: irrelevant here, and confusing in a user's terminal.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    _put_ninja_on_path()
    _clear_stale_lock(cpp_extension, name)
    if not _is_cached(cpp_extension, name):
        print(f"rwkvkit: compiling the {what} (first use on this machine; cached afterwards) ...", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def failure_cause(exc: BaseException) -> str:
    """One line naming why a build failed: the compiler's first error if any."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Error building")]
    line = errors[0] if errors else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}"
