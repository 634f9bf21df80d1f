"""Atomic writes: nothing a user had is lost if a write is interrupted."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
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


# The names atomic_dir leaves next to its target while it works: the folder
# being written (``.NAME.PID.XXXX.tmp``) and, where the OS cannot exchange two
# paths atomically, the previous folder during the two renames
# (``.NAME.old-PID``).  A crash can leave either; the next write recovers them.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# SYS_renameat2 for the architectures whose libc may lack the wrapper (< glibc 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276,
                  "ppc64le": 357, "ppc64": 357, "s390x": 347, "i386": 353, "i686": 353}
_renameat2_fn = None  # resolved lazily: a callable, or False when unavailable


def _renameat2():
    global _renameat2_fn
    if _renameat2_fn is not None:
        return _renameat2_fn
    _renameat2_fn = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import platform

        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, ImportError):
        return False
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int

        def call(a: bytes, b: bytes, flags: int) -> int:
            return fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    else:
        nr = _SYS_RENAMEAT2.get(platform.machine().lower())
        syscall = getattr(libc, "syscall", None)
        if nr is None or syscall is None:
            return False
        syscall.restype = ctypes.c_long

        def call(a: bytes, b: bytes, flags: int) -> int:
            return syscall(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                           ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags))

    def renameat2(a: Path, b: Path, flags: int) -> None:
        if call(os.fsencode(str(a)), os.fsencode(str(b)), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(a), None, str(b))

    _renameat2_fn = renameat2
    return renameat2


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE).
    False where the OS or the filesystem has no such operation (nothing was
    changed then); other errors raise OSError."""
    import errno

    fn = _renameat2()
    if not fn:
        return False
    try:
        fn(a, b, _RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
            return False
        raise
    return True


def _owner_gone(pid_text: str | None) -> bool:
    """Whether the process that left a work folder has ended, so that the
    folder is a leftover of a crash (None: an older rwkvkit's unnumbered one)."""
    if pid_text is None:
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return False  # no safe liveness probe (os.kill(pid, 0) signals on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def recover_dir(target: Path) -> list[Path]:
    """Clean up what an interrupted :func:`atomic_dir` left next to ``target``:
    if ``target`` is missing and a previous folder is parked as
    ``.NAME.old-PID`` (a crash between the two renames), put it back; remove
    parked folders and half-written ``.NAME.PID.*.tmp`` folders whose process
    has ended.  Returns the paths removed or restored."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    import re

    touched: list[Path] = []
    name = re.escape(target.name)
    # mkdtemp's random part is [a-z0-9_]; it never holds a dot, so a sibling
    # target whose name extends this one (NAME.v2) never matches.
    tmp_re = re.compile(rf"\.{name}\.(?:(\d+)\.)?[a-z0-9_]+\.tmp")
    old_re = re.compile(rf"\.{name}\.old-(\d+)")
    olds, tmps = [], []
    for entry in parent.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        m = old_re.fullmatch(entry.name)
        if m is not None:
            if _owner_gone(m.group(1)):
                olds.append(entry)
            continue
        m = tmp_re.fullmatch(entry.name)
        if m is not None and _owner_gone(m.group(1)):
            tmps.append(entry)
    if olds and not target.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        _fsync_dir(parent)
        olds.remove(newest)
        touched.append(newest)
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True)
        touched.append(p)
    return touched


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success put it in place
    of ``target``.  Where the OS can exchange two paths atomically (Linux
    renameat2) ``target`` is never missing: readers see the old folder or the
    new one.  Elsewhere the old folder is parked under a temporary name for the
    moment between two renames (and put back if the second fails).  A crash
    can leave a work folder behind; the next write to ``target`` recovers it
    (see :func:`recover_dir`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=str(target.parent)))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                if f.stat().st_mode & 0o777 == 0o600:
                    os.chmod(f, _default_mode())
        os.chmod(tmp, _default_mode(directory=True))
        _fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            if not target.is_dir() or target.is_symlink():
                raise FileExistsError(f"'{target}' exists and is not a folder")
            if exchange_paths(tmp, target):
                # tmp now holds the previous folder; the new one is in place.
                _fsync_dir(target.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
            _fsync_dir(target.parent)
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
