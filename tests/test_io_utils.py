"""io_utils.atomic_dir: the target is never missing where the OS can exchange
two paths, a failed replacement leaves the old folder in place, and what a
crash leaves behind is recovered by the next write."""

from __future__ import annotations

import os
import sys

import pytest

from rwkvkit import io_utils
from rwkvkit.io_utils import atomic_dir, recover_dir

# A pid no process can have (above Linux's PID_MAX_LIMIT of 2**22).
DEAD_PID = 99_999_999


def _write(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(text)


def _siblings(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _watch_renames(monkeypatch, target, seen):
    """Record, after every os.rename/os.replace, whether target exists."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def spy(a, b, *args, _real=real, **kw):
            out = _real(a, b, *args, **kw)
            seen.append(os.path.exists(target))
            return out

        monkeypatch.setattr(os, name, spy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replacement_is_an_exchange_on_linux(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        _write(tmp, "one")
    seen: list[bool] = []
    _watch_renames(monkeypatch, target, seen)
    with atomic_dir(target) as tmp:
        _write(tmp, "two")
    # The old code parked the folder with a rename first: target missing after it.
    assert all(seen), "target was missing after a rename"
    assert (target / "a.txt").read_text() == "two"
    assert _siblings(target) == []


def test_exchange_paths_swaps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "A")
    _write(b, "B")
    if not io_utils.exchange_paths(a, b):
        assert not sys.platform.startswith("linux"), "renameat2(RENAME_EXCHANGE) unavailable on Linux"
        pytest.skip("no atomic exchange on this OS")
    assert (a / "a.txt").read_text() == "B" and (b / "a.txt").read_text() == "A"


def test_fallback_failure_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Without an exchange, a second rename that fails leaves the old folder
    in place (the old code left the target missing and the folder parked)."""
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        _write(tmp, "one")
    monkeypatch.setattr(io_utils, "exchange_paths", lambda a, b: False)
    real_rename, real_replace = os.rename, os.replace

    def failing(a, b, *args, **kw):
        if str(b) == str(target) and ".tmp" in str(a):
            raise OSError(5, "injected I/O error")
        return real_rename(a, b, *args, **kw)

    def failing_replace(a, b, *args, **kw):
        if str(b) == str(target) and ".tmp" in str(a):
            raise OSError(5, "injected I/O error")
        return real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "rename", failing)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        with atomic_dir(target) as tmp:
            _write(tmp, "two")
    assert (target / "a.txt").read_text() == "one"
    assert _siblings(target) == []


def test_fallback_replaces(tmp_path, monkeypatch):
    target = tmp_path / "out"
    monkeypatch.setattr(io_utils, "exchange_paths", lambda a, b: False)
    for text in ("one", "two"):
        with atomic_dir(target) as tmp:
            _write(tmp, text)
        assert (target / "a.txt").read_text() == text
        assert _siblings(target) == []


def test_crash_between_renames_is_recovered_by_the_next_write(tmp_path):
    """A crash after parking the old folder and before the new one arrived:
    the next write puts the old folder back first, so a write that then fails
    still leaves the user's folder where it was."""
    target = tmp_path / "out"
    _write(tmp_path / f".out.old-{DEAD_PID}", "previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("the next write fails too")
    assert (target / "a.txt").read_text() == "previous"
    assert _siblings(target) == []


def test_stale_work_folders_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out"
    _write(target, "current")
    _write(tmp_path / f".out.{DEAD_PID}.abc123_x.tmp", "half-written")  # crashed while writing
    _write(tmp_path / ".out.k2j4h5g6.tmp", "older rwkvkit's leftover")  # no pid: old naming
    _write(tmp_path / f".out.old-{DEAD_PID}", "parked")  # target exists: a stale park
    # Leftovers that are not ours to remove:
    _write(tmp_path / f".out.{os.getppid()}.zzzzzz.tmp", "a live writer's")
    _write(tmp_path / f".out.v2.{DEAD_PID}.abcdef.tmp", "another target's")
    with atomic_dir(target) as tmp:
        _write(tmp, "new")
    assert (target / "a.txt").read_text() == "new"
    assert _siblings(target) == sorted([f".out.{os.getppid()}.zzzzzz.tmp", f".out.v2.{DEAD_PID}.abcdef.tmp"])


def test_recover_dir_restores_newest_parked(tmp_path):
    target = tmp_path / "out"
    older, newer = tmp_path / f".out.old-{DEAD_PID}", tmp_path / f".out.old-{DEAD_PID - 1}"
    _write(older, "older")
    _write(newer, "newer")
    os.utime(older, (1_000_000, 1_000_000))
    recover_dir(target)
    assert (target / "a.txt").read_text() == "newer"
    assert _siblings(target) == []
