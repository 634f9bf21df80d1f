"""Models from the Hugging Face hub by id.

``rwkvkit.load("RWKV/rwkv-4-169m-pile")``, ``rwkvkit generate --model
RWKV/rwkv-4-169m-pile``, ``rwkvkit.load("BlinkDL/rwkv-7-world",
filename="RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth")`` (on the command
line ``--model BlinkDL/rwkv-7-world/FILE``).

The files are fetched once through ``huggingface_hub`` (``pip install
"rwkvkit[hub]"``) into its standard cache (``HF_HOME``); later loads find them
there without the network.  A local file or folder of the same name always
wins: the hub is asked only for a path that does not exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# owner/name as the hub spells them (letters, digits, - _ .), then an
# optional path of a file inside the repository.
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<file>[^\\]+))?")
_CHECKPOINT_SUFFIXES = (".pth", ".safetensors", ".bin", ".pt")
# A transformers folder: its config, weights (safetensors preferred) and tokenizer.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "rwkv_vocab_v20230424.txt", "vocab.txt")
EXAMPLE = "RWKV/rwkv-4-169m-pile"


def parse_id(path: "str | os.PathLike") -> tuple[str, str | None] | None:
    """(repo id, file in it or None) if ``path`` has the form of a hub id, else None."""
    text = os.fspath(path)
    if not isinstance(text, str) or text.startswith((".", "/", "~")) or "//" in text or ":" in text:
        return None
    m = _ID.fullmatch(text)
    if m is None:
        return None
    file = m.group("file")
    if file is not None and any(part in ("", ".", "..") for part in file.split("/")):
        return None
    return m.group("repo"), file


def missing_path_error(path: "str | os.PathLike") -> CheckpointError:
    """The error for a path that exists neither here nor as a hub id."""
    return CheckpointError(
        f"no such file or folder: '{os.fspath(path)}' (a model on the Hugging Face hub is named by its id, "
        f"e.g. {EXAMPLE}, or owner/name/FILE for one file of a repository)"
    )


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def resolve(path: "str | os.PathLike", filename: str | None = None, revision: str | None = None) -> Path:
    """The local path of a model: ``path`` itself if it exists (``path/filename``
    for a local folder), else the hub repository it names, fetched once."""
    local = Path(os.fspath(path)).expanduser()
    if local.exists():
        return local / filename if filename else local
    parsed = parse_id(path)
    if parsed is None:
        raise missing_path_error(path)
    repo, file = parsed
    if filename and file:
        raise CheckpointError(f"'{path}' names a file already; do not pass filename={filename!r} too")
    file = filename or file
    hh = _hub()
    if hh is None:
        raise CheckpointError(
            f"no such file or folder: '{os.fspath(path)}'; to fetch it from the Hugging Face hub as {repo} "
            "install huggingface_hub: pip install \"rwkvkit[hub]\""
        )
    cached = _cached(hh, repo, file, revision)
    if cached is not None:
        return cached
    try:
        return _download(hh, repo, file, revision)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hub raises many types (HTTP, offline, not found)
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        raise CheckpointError(
            f"no such file or folder: '{os.fspath(path)}', and fetching {repo}{'/' + file if file else ''} from the "
            f"Hugging Face hub failed: {type(exc).__name__}: {why}"
        ) from None


def cached_path(path: "str | os.PathLike", filename: str | None = None) -> Path | None:
    """Where a hub id's files already are in the cache (no network), else None;
    a path that exists locally is not a hub id."""
    if Path(os.fspath(path)).expanduser().exists():
        return None
    parsed = parse_id(path)
    hh = _hub()
    if parsed is None or hh is None:
        return None
    return _cached(hh, parsed[0], filename or parsed[1], None)


def _cached(hh, repo: str, file: str | None, revision: str | None) -> Path | None:
    """The cached file or snapshot folder, without the network."""
    try:
        if file:
            return Path(hh.hf_hub_download(repo, file, revision=revision, local_files_only=True))
        folder = Path(hh.snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin)
        return None
    if (folder / "config.json").is_file():
        return folder
    found = _checkpoints(p.name for p in folder.iterdir() if p.is_file())
    return folder / found[0] if len(found) == 1 else None


def _checkpoints(files) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(_CHECKPOINT_SUFFIXES) and not f.endswith("training_args.bin"))


def _download(hh, repo: str, file: str | None, revision: str | None) -> Path:
    if file:
        return Path(hh.hf_hub_download(repo, file, revision=revision))
    files = list(hh.list_repo_files(repo, revision=revision))
    if "config.json" in files:  # a transformers folder: config, one set of weights, tokenizer
        st = [f for f in files if f.startswith("model") and (f.endswith(".safetensors") or f == "model.safetensors.index.json")]
        pt = [f for f in files if f.startswith("pytorch_model") and (f.endswith(".bin") or f.endswith(".bin.index.json"))]
        wanted = ["config.json"] + (st or pt) + [f for f in files if f in _HF_TOKENIZER_FILES]
        return Path(hh.snapshot_download(repo, revision=revision, allow_patterns=wanted))
    found = _checkpoints(files)
    if len(found) == 1:
        return Path(hh.hf_hub_download(repo, found[0], revision=revision))
    if not found:
        raise CheckpointError(f"the hub repository {repo} holds no config.json and no checkpoint file (.pth, .safetensors, .bin)")
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    raise CheckpointError(
        f"the hub repository {repo} holds {len(found)} checkpoints ({shown}): name one, "
        f"rwkvkit.load('{repo}', filename=FILE) or --model {repo}/FILE"
    )
