"""The run folder (``--out``) of ``rwkvkit train``: refusing to overwrite a
previous run, taking a resumed run's options from the folder, and reading
``metrics.jsonl`` the way a crash may have left it.

A run folder holds ``train_config.json`` (the options of the last invocation),
``latest.json`` and ``checkpoints/step-N/`` (each with the options in its
``trainer.pt``), ``metrics.jsonl`` and the exported ``model/``, ``adapter/``,
``state.safetensors`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from ..errors import RwkvkitError
from .config import TrainConfig

# What a run writes into OUT (the folder may hold other files of the user's).
RUN_FILES = ("train_config.json", "latest.json", "metrics.jsonl", "loss.png", "state.safetensors")
RUN_FOLDERS = ("checkpoints", "model", "adapter")

# Options of one invocation only: never taken from the folder.
NOT_CARRIED = frozenset({"out", "resume", "overwrite", "stop_after", "time_limit"})
# Options that say how the run goes on, not what it computes: a resumed run
# takes a given one as given, else the folder's.  max_steps may grow (the
# schedule is recomputed for the new length); precision, device and backend
# may change with the machine.
CHANGEABLE = frozenset(
    {
        "progress", "plot", "threads", "device", "wkv_backend", "precision", "grad_checkpoint", "parallel",
        "keep_checkpoints", "save_every", "val_every", "val_windows", "max_steps", "merge_lora",
    }
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# What makes OUT a run worth keeping: a checkpoint or an exported model (a run
# that failed before its first checkpoint left only options and metrics).
_KEPT_FILES = ("latest.json", "state.safetensors")


def previous_run(out: Path) -> list[str]:
    """The names of a previous run's results found in ``out`` (checkpoints,
    exported model); empty if there are none."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [n for n in _KEPT_FILES if (out / n).is_file()]
    found += [n + "/" for n in RUN_FOLDERS if (out / n).is_dir() and any((out / n).iterdir())]
    return found


def check_out(cfg: TrainConfig) -> None:
    """Refuse an ``--out`` holding a previous run unless --resume or --overwrite says what to do with it."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise RwkvkitError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if out.exists() and not out.is_dir():
        raise RwkvkitError(f"--out '{out}' is a file, not a folder")
    if cfg.resume or cfg.overwrite:
        return
    found = previous_run(out)
    if found:
        raise RwkvkitError(
            f"--out '{out}' holds a previous run ({', '.join(found)}): pass --resume to continue it, "
            "a new --out to keep it, or --overwrite to replace it"
        )


def clear_previous_run(out: Path) -> None:
    """Delete what a previous run wrote into ``out`` (--overwrite); other files stay."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def saved_config(out: Path) -> dict[str, Any]:
    """The options a run in ``out`` was started with (train_config.json, else
    the latest checkpoint's trainer.pt), as a dict of TrainConfig fields."""
    out = Path(out)
    path = out / "train_config.json"
    data: Any = None
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
    if not isinstance(data, dict) and (out / "latest.json").is_file():
        import torch

        try:
            latest = json.loads((out / "latest.json").read_text())
            data = torch.load(out / latest["path"] / "trainer.pt", map_location="cpu", weights_only=False)["config"]
        except Exception:  # noqa: BLE001 - any unreadable file: no saved options
            data = None
    if not isinstance(data, dict):
        if not (out / "latest.json").is_file():
            raise RwkvkitError(f"--resume: '{out}' has no latest.json (no checkpoint was written there)")
        raise RwkvkitError(f"--resume: '{out}' has no readable train_config.json or checkpoint options")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    # Keys of an older rwkvkit that no longer exist are dropped; options added
    # since (generation, the RWKV-7 ranks) keep their defaults, which are what
    # the older trainer built.
    return {k: v for k, v in data.items() if k in known}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def resume_config(cfg: TrainConfig, given: Iterable[str] | None = None) -> TrainConfig:
    """``cfg`` completed from the run folder's saved options.

    ``given``: the options the user set (command line or config file); None
    (the Python API) counts those that differ from TrainConfig's defaults.  A
    given option that changes what the run computes must equal the saved one,
    or the run is refused naming it; :data:`CHANGEABLE` options are taken as
    given, :data:`NOT_CARRIED` ones never come from the folder.  Calling it again on its own result changes nothing."""
    saved = saved_config(Path(cfg.out))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values = dataclasses.asdict(cfg)
    if given is None:
        given = [n for n, v in values.items() if not _same(v, defaults[n])]
    given = set(given)
    clashes = []
    merged = dict(values)
    for name, default in defaults.items():
        if name in NOT_CARRIED:
            continue
        have = saved.get(name, default)
        if name not in given:
            merged[name] = have
        elif name not in CHANGEABLE and not _same(values[name], have):
            if name == "data" and Path(str(values[name])).resolve() == Path(str(have)).resolve():
                continue
            clashes.append(f"{_flag(name)} {values[name]!r} (the run has {have!r})")
    if clashes:
        raise RwkvkitError(
            f"--resume: {'; '.join(clashes)} differ{'s' if len(clashes) == 1 else ''} from the run in '{cfg.out}': "
            "drop the flag to continue the run as it was, or start a new run with a new --out"
        )
    if "max_steps" in given and merged["max_steps"] != saved.get("max_steps", merged["max_steps"]):
        print(f"rwkvkit train: --max-steps {merged['max_steps']} (the run had {saved['max_steps']}): "
              "the learning-rate schedule is recomputed for the new length", file=sys.stderr)
    out = TrainConfig(**merged)
    out._resumed = True  # type: ignore[attr-defined]  # train() does not merge it again
    return out


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not a JSON object (a write cut
    short by a crash or a full disk) is skipped."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
