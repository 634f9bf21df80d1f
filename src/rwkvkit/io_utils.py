"""Atomic writes: nothing a user had is lost if a write is interrupted."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask
    (mkstemp/mkdtemp create 0600/0700, which would hide files from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename
    it over ``target``; on any error remove it and leave ``target`` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success replace ``target``
    with it (the old folder, if any, is removed only after the new one is in
    place under a temporary name)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent)))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                if f.stat().st_mode & 0o777 == 0o600:
                    os.chmod(f, _default_mode())
        os.chmod(tmp, _default_mode(directory=True))
        old = None
        if target.exists():
            if not target.is_dir():
                raise FileExistsError(f"'{target}' exists and is not a folder")
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonl_field(path: Path, field: str) -> Iterator[tuple[str, int]]:
    """(the string ``field`` of each non-empty line's JSON object, bytes of that
    line) for a jsonl file; a bad line raises RwkvkitError naming file and line."""
    import json

    from .errors import RwkvkitError

    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RwkvkitError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise RwkvkitError(f"{path}:{lineno}: expected a JSON object with a string field {field!r}")
            yield obj[field], len(line)
