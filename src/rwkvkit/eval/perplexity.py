"""Perplexity and bits per byte of a text or token file (``rwkvkit eval --task ppl``).

The file is read, tokenized and scored piece by piece with the RNN state
carried between windows (:func:`~rwkvkit.eval.scoring.stream_nll`), so a file
of any length runs in constant memory and gives exactly what one pass over
the whole file would.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import RwkvkitError
from .scoring import byte_length_table, stream_nll

# Text is read in pieces of about this many bytes.
TEXT_CHUNK = 1 << 20
# A piece may end only at a newline with a non-space character on both sides:
# byte-level BPE pre-tokenizers (GPT-2, GPT-NeoX 20B) make such a "\n" a
# token of its own (a space before it could merge with it, a whitespace run
# after it too), so tokenizing piece by piece gives the ids of tokenizing the
# whole file (checked in tests for the 20B tokenizer and the World vocabulary).
_SAFE_CUT = re.compile(rb"(?<=[^\s])\n(?=[^\s])")


@dataclass
class PerplexityResult:
    """What ``rwkvkit eval --task ppl`` reports."""

    task: str
    data: str
    tokens: int  # tokens scored
    bytes: int | None  # UTF-8 bytes of the scored tokens
    nll: float  # total negative log-likelihood, nats
    ppl: float  # exp(nll / tokens): perplexity per token
    bits_per_token: float
    bits_per_byte: float | None
    window: int
    windows: int
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        bpb = f"{self.bits_per_byte:.4f}" if self.bits_per_byte is not None else "n/a"
        return (
            f"{self.data}: {self.tokens} tokens ({self.bytes if self.bytes is not None else '?'} bytes) in {self.windows} windows "
            f"of {self.window}: ppl {self.ppl:.4f}, {self.bits_per_token:.4f} bits/token, {bpb} bits/byte "
            f"({self.seconds:.1f} s, {self.tokens_per_second:.0f} tokens/s)"
        )


def text_pieces(path: "str | os.PathLike", chunk: int = TEXT_CHUNK) -> Iterator[bytes]:
    """The file's bytes in pieces of about ``chunk`` bytes, each cut after a
    newline between two non-space characters (where one exists)."""
    with open(path, "rb") as fh:
        rest = b""
        while True:
            block = fh.read(chunk)
            data = rest + block
            if not block:
                if data:
                    yield data
                return
            cut = 0
            for m in _SAFE_CUT.finditer(data, max(0, len(data) - chunk)):
                cut = m.end()
            if cut == 0:
                rest = data  # no safe cut yet: read more
                continue
            yield data[:cut]
            rest = data[cut:]


def _token_pieces(path: Path, tokenizer) -> Iterator[list[int]]:
    byte_level = hasattr(tokenizer, "encode_bytes")
    offset = 0
    for piece in text_pieces(path):
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not byte_level:
                raise RwkvkitError(
                    f"'{path}' is not valid UTF-8 (byte {offset + exc.start}); use a byte-level tokenizer (bytes, world)"
                ) from None
            yield tokenizer.encode_bytes(piece)
        else:
            yield tokenizer.encode(text)
        offset += len(piece)


def is_token_file(path: "str | os.PathLike") -> bool:
    """A prepared token folder (``rwkvkit prepare``), its meta.json or one of
    its ``.bin`` splits, or a Megatron binidx pair."""
    p = Path(path)
    if p.is_dir() or p.name == "meta.json":
        return True
    if p.suffix in (".bin", ".idx"):
        return (p.parent / "meta.json").is_file() or (p.with_suffix(".idx").is_file() and p.with_suffix(".bin").is_file())
    return False


def open_token_file(path: "str | os.PathLike", split: str, vocab_size: int):
    """(TokenData, tokenizer name recorded in the file or None)."""
    from ..train.data import load_tokens

    p = Path(path)
    if p.suffix == ".bin" and (p.parent / "meta.json").is_file() and not p.with_suffix(".idx").is_file():
        # val.bin of a prepared folder: its split is its name.
        split = p.name[: -len(".bin")]
        p = p.parent
    data = load_tokens(p, split=split, vocab_size=vocab_size)
    if data.vocab_size > vocab_size:
        raise RwkvkitError(
            f"'{path}' was tokenized with a vocabulary of {data.vocab_size}, larger than the model's {vocab_size}"
        )
    name = data.tokenizer if data.tokenizer not in ("unknown", "") else None
    return data, name


def perplexity(
    model,
    data: "str | os.PathLike",
    tokenizer=None,
    *,
    window: int = 1024,
    split: str = "val",
    bos: int | None = None,
    limit_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` on the file ``data``.

    ``data`` is a text file (tokenized piece by piece with ``tokenizer``, a
    :class:`~rwkvkit.tokenizer.Tokenizer` or a name for
    :func:`~rwkvkit.tokenizer.load_tokenizer`) or a token file from
    ``rwkvkit prepare`` (a folder, its meta.json, or ``val.bin``/``train.bin``;
    ``split`` picks the split of a folder), or a binidx pair.  Without a
    tokenizer, a token file's recorded tokenizer or the one the model's
    vocabulary implies is used (it only counts bytes for a token file).

    Every token after the first is scored (with ``bos``, the first too);
    ``limit_tokens`` stops after that many tokens of the file.
    """
    from ..tokenizer import Tokenizer, tokenizer_for_model

    path = Path(data)
    if not path.exists():
        raise RwkvkitError(f"data file '{path}' does not exist")
    V = model.config.vocab_size
    if is_token_file(path):
        tokens, recorded = open_token_file(path, split, V)
        stream = tokens.tokens
        total = len(stream)
        if tokenizer is None and recorded is not None:
            tokenizer = recorded
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer_for_model(model, None, tokenizer)
    else:
        if path.is_dir():
            raise RwkvkitError(f"'{path}' is a folder without meta.json: expected a text file or a prepared token folder")
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer_for_model(model, None, tokenizer)
        stream = _token_pieces(path, tok)
        total = None
    if limit_tokens is not None:
        if limit_tokens < 2:
            raise RwkvkitError(f"--limit must be at least 2 tokens, got {limit_tokens}")
        stream = _limit(stream, limit_tokens)
        total = limit_tokens if total is None else min(total, limit_tokens)
    table = byte_length_table(tok, V)
    from tqdm.auto import tqdm

    bar = tqdm(total=None if total is None else total - (bos is None), unit="tok", desc="ppl", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        res = stream_nll(model, stream, window=window, bos=bos, byte_lengths=table, progress=bar)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    bpt = res.nll / res.tokens / math.log(2)
    bpb = res.nll / res.bytes / math.log(2) if res.bytes else None
    return PerplexityResult(
        task="ppl",
        data=str(path),
        tokens=res.tokens,
        bytes=res.bytes,
        nll=res.nll,
        ppl=math.exp(res.nll / res.tokens),
        bits_per_token=bpt,
        bits_per_byte=bpb,
        window=window,
        windows=res.windows,
        seconds=dt,
        tokens_per_second=res.tokens / dt if dt > 0 else float("inf"),
    )


def _limit(stream, n: int) -> Iterator[np.ndarray]:
    if isinstance(stream, np.ndarray):
        yield stream[:n]
        return
    left = n
    for chunk in stream:
        chunk = np.asarray(chunk)[:left]
        left -= len(chunk)
        yield chunk
        if left <= 0:
            return
