"""Training data: text -> token file (``rwkvkit prepare``) -> batches of windows.

A prepared corpus is a folder::

    meta.json          tokenizer, vocab size, dtype, token and document counts
    train.bin          token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    train.docs.bin     uint64 start offset of every document in train.bin
    val.bin, val.docs.bin   the held-out split, same layout

Preparation streams: input is read in chunks of about a megabyte and tokens
are appended to the output files as they come, so memory does not grow with
the corpus.  The validation split is the last ``val_fraction`` of the input
by bytes (for one text file that is the usual "last 10%" split); the document
that straddles the cut is split in two at a line boundary.

Reading also accepts the Megatron ``binidx`` pair (``name.bin`` + ``name.idx``)
that RWKV-LM users already have.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import RwkvkitError
from ..io_utils import atomic_dir, jsonl_field

FORMAT = "rwkvkit-tokens"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
_CHUNK = 1 << 20


# ---------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """id = byte value (0..255), the tokenizer of byte-level models."""

    name = "bytes"
    vocab_size = 256
    eot_id = None

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(name: str):
    """``"bytes"`` here; anything else through :func:`rwkvkit.load_tokenizer`."""
    if name in ("bytes", "byte"):
        return ByteTokenizer()
    from ..tokenizer import load_tokenizer

    return load_tokenizer(name)


def _tokenizer_info(tok, name: str) -> tuple[str, int, int | None]:
    vocab = getattr(tok, "vocab_size", None)
    if callable(vocab):
        vocab = vocab()
    if not isinstance(vocab, int):
        raise RwkvkitError(f"tokenizer {name!r} does not report an integer vocab_size")
    eot = getattr(tok, "eot_id", None)
    if eot is None:
        eot = getattr(tok, "eos_id", None)
    return str(getattr(tok, "name", name)), vocab, eot


def _encode(tok, data: bytes, where: str) -> np.ndarray:
    if isinstance(tok, ByteTokenizer):
        return tok.encode_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if hasattr(tok, "encode_bytes"):  # byte-level vocabularies (World) take any bytes
            return np.asarray(tok.encode_bytes(data), dtype=np.int64)
        raise RwkvkitError(f"{where} is not valid UTF-8 (byte {exc.start} of a chunk); use --tokenizer bytes for binary text") from None
    return np.asarray(tok.encode(text), dtype=np.int64)


# ------------------------------------------------------------------- inputs
def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, and the text files (``*.txt, *.text, *.md, *.jsonl``) under
    folders named, in sorted order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise RwkvkitError(f"folder '{p}' holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise RwkvkitError(f"input '{p}' does not exist")
    if not out:
        raise RwkvkitError("no input files given")
    return out


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _char_boundary(data: bytes, cut: int) -> int:
    """Move ``cut`` back so it does not fall inside a UTF-8 sequence."""
    while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def _text_chunks(path: Path) -> Iterator[bytes]:
    """The file in ~1 MiB pieces that end at a newline (or a UTF-8 boundary)."""
    with open(path, "rb") as fh:
        rest = b""
        while True:
            block = fh.read(_CHUNK)
            if not block:
                if rest:
                    yield rest
                return
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                cut = _char_boundary(data, len(data) - 3) if len(data) > 3 else len(data)
            yield data[:cut]
            rest = data[cut:]


# ------------------------------------------------------------------- writing
class _SplitWriter:
    """Appends token ids and document starts of one split to its two files."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.tokens = open(folder / f"{split}.bin", "wb")
        self.docs = open(folder / f"{split}.docs.bin", "wb")
        self.dtype = dtype
        self.n_tokens = 0
        self.n_docs = 0
        self._open_doc = False

    def begin_doc(self) -> None:
        self.docs.write(struct.pack("<Q", self.n_tokens))
        self.n_docs += 1
        self._open_doc = True

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            self.tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
            self.n_tokens += len(ids)

    def end_doc(self, sep: int | None) -> None:
        if self._open_doc and sep is not None:
            self.write(np.array([sep]))
        self._open_doc = False

    def close(self) -> None:
        self.tokens.close()
        self.docs.close()


def prepare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tokenizer: str = "bytes",
    val_fraction: float = 0.1,
    text_field: str = "text",
    separator: int | None | str = "auto",
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into the folder ``out`` (written atomically).

    Each text file is one document, each line of a ``.jsonl`` file one document
    (its ``text_field``).  ``separator`` is appended after every document:
    ``"auto"`` is the tokenizer's end-of-text id (0 for the 20B and World
    tokenizers, none for bytes), ``None`` nothing.  Returns the metadata.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise RwkvkitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = collect_inputs(inputs)
    tok = get_tokenizer(tokenizer)
    tok_name, vocab, eot = _tokenizer_info(tok, tokenizer)
    sep = eot if separator == "auto" else separator
    if sep is not None and not 0 <= int(sep) < vocab:
        raise RwkvkitError(f"separator id {sep} is outside the vocabulary of {vocab}")
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")
    total = sum(f.stat().st_size for f in files)
    cut = int(total * (1.0 - val_fraction)) if val_fraction > 0 else total + 1
    from tqdm.auto import tqdm

    with atomic_dir(Path(out)) as tmp:
        writers = {s: _SplitWriter(tmp, s, dtype) for s in ("train", "val")}
        seen = 0  # input bytes consumed so far, decides the split
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress)
        try:
            for path in files:
                if _is_jsonl(path):
                    for text, nbytes in jsonl_field(path, text_field):
                        w = writers["train" if seen < cut else "val"]
                        w.begin_doc()
                        w.write(_check_ids(_encode(tok, text.encode("utf-8"), str(path)), vocab, path))
                        w.end_doc(sep)
                        seen += nbytes
                        bar.update(nbytes)
                    continue
                w = writers["train" if seen < cut else "val"]
                w.begin_doc()
                for data in _text_chunks(path):
                    if w is writers["train"] and seen + len(data) > cut:
                        # The held-out split starts inside this chunk: cut at
                        # the first line end after the boundary.
                        at = data.find(b"\n", cut - seen) + 1 or _char_boundary(data, cut - seen)
                        w.write(_check_ids(_encode(tok, data[:at], str(path)), vocab, path))
                        w.end_doc(sep)
                        seen += at
                        bar.update(at)
                        data = data[at:]
                        w = writers["val"]
                        w.begin_doc()
                    w.write(_check_ids(_encode(tok, data, str(path)), vocab, path))
                    seen += len(data)
                    bar.update(len(data))
                w.end_doc(sep)
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        if writers["train"].n_tokens == 0:
            raise RwkvkitError("the inputs produced no training tokens (empty files?)")
        meta = {
            "format": FORMAT,
            "version": 1,
            "tokenizer": tok_name,
            "vocab_size": vocab,
            "dtype": dtype.name,
            "separator": None if sep is None else int(sep),
            "val_fraction": val_fraction,
            "sources": [str(f) for f in files],
            "input_bytes": total,
            "splits": {s: {"tokens": w.n_tokens, "documents": w.n_docs} for s, w in writers.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _check_ids(ids: np.ndarray, vocab: int, path: Path) -> np.ndarray:
    if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise RwkvkitError(f"tokenizer produced an id outside [0, {vocab}) for {path}")
    return ids


# ------------------------------------------------------------------- reading
@dataclass
class TokenData:
    """One split of a prepared corpus: ``tokens`` is a read-only memmap."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    vocab_size: int
    tokenizer: str
    path: Path

    def __len__(self) -> int:
        return len(self.tokens)


_BINIDX_MAGIC = b"MMIDIDX\x00\x00"
_BINIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16}


def load_tokens(path: str | os.PathLike, split: str = "train", vocab_size: int | None = None) -> TokenData:
    """Open ``split`` of a prepared folder (or its meta.json), or a Megatron
    binidx pair given as ``name``, ``name.bin`` or ``name.idx`` (which has no
    split: the whole file is returned, and ``vocab_size`` must be given)."""
    p = Path(path)
    if p.name == "meta.json":
        p = p.parent
    if p.is_dir():
        meta_path = p / "meta.json"
        if not meta_path.is_file():
            raise RwkvkitError(f"'{p}' has no meta.json; prepare it with `rwkvkit prepare`")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise RwkvkitError(f"'{meta_path}' is not valid JSON ({exc.msg})") from None
        if meta.get("format") != FORMAT:
            raise RwkvkitError(f"'{meta_path}' is not an rwkvkit token file (format={meta.get('format')!r})")
        if split not in meta["splits"]:
            raise RwkvkitError(f"'{p}' has no split {split!r}; it has {sorted(meta['splits'])}")
        n = meta["splits"][split]["tokens"]
        bin_path = p / f"{split}.bin"
        dtype = np.dtype(meta["dtype"])
        if not bin_path.is_file() or bin_path.stat().st_size != n * dtype.itemsize:
            raise RwkvkitError(f"'{bin_path}' is missing or truncated: expected {n} tokens of {dtype.name}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        docs_path = p / f"{split}.docs.bin"
        docs = np.fromfile(docs_path, dtype="<u8") if docs_path.is_file() else np.zeros(0, np.uint64)
        return TokenData(tokens, docs, int(meta["vocab_size"]), str(meta["tokenizer"]), p)
    stem = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    idx, binf = stem.with_suffix(".idx"), stem.with_suffix(".bin")
    if idx.is_file() and binf.is_file():
        return _load_binidx(idx, binf, vocab_size)
    raise RwkvkitError(f"'{path}' is neither a prepared token folder nor a binidx pair (.bin + .idx)")


def _load_binidx(idx: Path, binf: Path, vocab_size: int | None) -> TokenData:
    """Megatron ``MMapIndexedDataset``: the .idx holds a 9-byte magic, version
    (u64 = 1), dtype code (u8), sequence count (u64), document count (u64), then
    sizes (int32), byte pointers (int64) and document indices (int64)."""
    with open(idx, "rb") as fh:
        head = fh.read(34)
    if len(head) < 34 or head[:9] != _BINIDX_MAGIC:
        raise RwkvkitError(f"'{idx}' is not a Megatron binidx index (bad magic)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _BINIDX_DTYPES or _BINIDX_DTYPES[code] not in (np.uint8, np.int16, np.int32, np.int64, np.uint16):
        raise RwkvkitError(f"'{idx}': unsupported binidx version {version} or dtype code {code}")
    dtype = np.dtype(_BINIDX_DTYPES[code])
    pointers = np.memmap(idx, dtype="<i8", mode="r", offset=34 + 4 * n_seq, shape=(n_seq,))
    n_tokens = binf.stat().st_size // dtype.itemsize
    tokens = np.memmap(binf, dtype=dtype, mode="r", shape=(n_tokens,))
    starts = (np.asarray(pointers) // dtype.itemsize).astype(np.uint64)
    if vocab_size is None:
        raise RwkvkitError(f"binidx data '{binf}' does not record its vocabulary; pass --vocab-size")
    return TokenData(tokens, starts, int(vocab_size), "unknown", binf)


# ------------------------------------------------------------------ batches
def window_offsets(n_tokens: int, window: int, count: int, seed: int, step: int, micro: int) -> np.ndarray:
    """Start offsets of ``count`` random windows of ``window`` tokens.

    A pure function of (seed, step, micro-step): the data position of a run is
    its step counter, so a resumed run draws exactly the windows an
    uninterrupted run would have drawn, and every process of a data-parallel
    run can draw the same global batch and take its own rows.
    """
    if n_tokens < window:
        raise RwkvkitError(f"the training data has {n_tokens} tokens, fewer than one window of {window}; lower --ctx-len")
    rng = np.random.Generator(np.random.PCG64([seed, step, micro]))
    return rng.integers(0, n_tokens - window + 1, size=count)


def get_batch(data: TokenData, offsets: np.ndarray, window: int) -> torch.Tensor:
    """[len(offsets), window] int64 token ids."""
    rows = [np.asarray(data.tokens[o : o + window], dtype=np.int64) for o in offsets]
    return torch.from_numpy(np.stack(rows))


def val_windows(n_tokens: int, window: int, max_windows: int) -> np.ndarray:
    """Non-overlapping windows from the start of the validation split."""
    n = min(max_windows, n_tokens // window) if window > 0 else 0
    return np.arange(n, dtype=np.int64) * window
