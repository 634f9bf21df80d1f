"""Tokenizers behind one small protocol, and :func:`load_tokenizer`.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size`` (one more than the largest id it can produce), ``eos_id`` (the
end-of-text id, or None) and ``stream_decoder()`` for printing text while it is
generated.  Three kinds exist:

- ``"bytes"``: one id per UTF-8 byte, vocabulary 256 (rwkv.cpp's tiny models,
  rwkvkit's shipped model);
- ``"world"``: the RWKV World vocabulary ``rwkv_vocab_v20230424.txt``, greedy
  longest match over UTF-8 bytes (spec 7.2), ids equal to the ``rwkv``
  package's ``TRIE_TOKENIZER``.  Encoding uses the Rust ``pyrwkv-tokenizer``
  package when it is installed (``pip install "rwkvkit[tokenizers]"``; 8-14x
  the ``rwkv`` package's speed, see benchmarks/bench_tokenizer.py) and a
  pure-Python trie otherwise (about 2x the ``rwkv`` package's);
- a Hugging Face ``tokenizers`` JSON file, e.g. ``"20B"``: the GPT-NeoX
  tokenizer of the RWKV-4 Pile models (spec 7.1).

Streaming: generated tokens can end in the middle of a multi-byte character.
Decoders of every kind work on bytes through an incremental UTF-8 decoder, so
an incomplete character is held back until its last byte arrives, and a
replacement character is printed only for bytes that can never become valid.
"""

from __future__ import annotations

import ast
import codecs
import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import RwkvkitError

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
TWENTY_B_FILE = "20B_tokenizer.json"
# Hugging Face repository whose tokenizer.json is the 20B tokenizer with the
# 50277 ids of the RWKV-4 Pile models (used only by ``download=True``).
TWENTY_B_HUB_REPO = "RWKV/rwkv-4-169m-pile"
# Names a model folder may carry its tokenizer under, in order of preference.
FOLDER_TOKENIZER_FILES = ("tokenizer.json", TWENTY_B_FILE, WORLD_VOCAB)
# Vocabulary sizes of the published model families -> tokenizer name: bytes
# (rwkv.cpp's tiny models, the shipped model), the 20B tokenizer of the RWKV-4
# Pile models (50277) and of the RWKV-7 Pile models (padded to 50304,
# rwkv5-7 spec 9), and the World vocabulary of every RWKV-5/6/7 World and G1
# model (65536 rows for 65530 ids).
KNOWN_VOCAB_SIZES = {256: "bytes", 50277: "20B", 50304: "20B", 65536: "world"}
# A model may have a few more output rows than its tokenizer has ids (World
# models: 65536 rows, 65530 ids); more than this many is a wrong pairing.
MAX_UNUSED_ROWS = 1024


def user_cache_dir() -> Path:
    """Where tokenizer files fetched once are kept: ``~/.cache/rwkvkit``."""
    return Path.home() / ".cache" / "rwkvkit"


class Tokenizer:
    """Base class: subclasses set ``name``, ``vocab_size``, ``eos_id`` and
    implement :meth:`encode` and :meth:`token_bytes` (or override
    :meth:`stream_decoder`)."""

    name: str = "tokenizer"
    vocab_size: int = 0
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for special tokens such as end-of-text)."""
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder that turns tokens into text one at a time (see StreamDecoder)."""
        return StreamDecoder(self)

    def check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise RwkvkitError(f"token id {token_id} is outside the {self.name} tokenizer's range 0..{self.vocab_size - 1}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the text that is certain
    now, ``flush()`` whatever is left at the end.

    It never returns a U+FFFD for an incomplete character that a later token
    completes: an unfinished UTF-8 sequence stays in the incremental decoder
    until it is completed or proven invalid.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _encode_text(text: str) -> bytes:
    if not isinstance(text, str):
        raise RwkvkitError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        # surrogateescape: bytes that were not valid UTF-8 when read (e.g.
        # from a file opened with errors="surrogateescape") come back as is.
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as exc:
        raise RwkvkitError(
            f"text contains a lone surrogate {text[exc.start]!r} at index {exc.start}, which has no UTF-8 encoding"
        ) from None


# ------------------------------------------------------------------- bytes
class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte (id = byte value), vocabulary 256, no end-of-text."""

    name = "bytes"
    vocab_size = 256
    eos_id = None
    _TABLE = [bytes([i]) for i in range(256)]

    def encode(self, text: str) -> list[int]:
        return list(_encode_text(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def token_bytes(self, token_id: int) -> bytes:
        return self._TABLE[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return bytes(ids)
        except ValueError:
            bad = next(i for i in ids if not 0 <= i < 256)
            raise RwkvkitError(f"token id {bad} is not a byte (the bytes tokenizer has ids 0..255)") from None


# ------------------------------------------------------------------- world
def parse_world_vocab(path: "str | os.PathLike") -> list[bytes]:
    """Read a World vocabulary file into a table id -> bytes (index 0 = b"").

    Each line is ``<id> <python str or bytes literal> <byte length>`` (spec
    7.2).  Literals are read with :func:`ast.literal_eval` (never ``eval``),
    all at once for speed; ids, lengths and uniqueness are checked.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RwkvkitError(f"cannot read World vocabulary '{path}': {exc}") from None
    ids: list[int] = []
    literals: list[str] = []
    lengths: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            a, b = line.index(" "), line.rindex(" ")
            ids.append(int(line[:a]))
            lengths.append(int(line[b + 1 :]))
            literals.append(line[a + 1 : b])
        except ValueError:
            raise RwkvkitError(f"'{path}' line {n}: expected '<id> <literal> <length>', got {line[:60]!r}") from None
        if a == b:
            raise RwkvkitError(f"'{path}' line {n}: expected '<id> <literal> <length>', got {line[:60]!r}")
    try:
        values = ast.literal_eval("[" + ",\n".join(literals) + "]")
    except (SyntaxError, ValueError) as exc:
        raise RwkvkitError(f"'{path}' holds a token literal that is not a Python str/bytes literal (line {getattr(exc, 'lineno', '?')})") from None
    if not ids:
        raise RwkvkitError(f"World vocabulary '{path}' is empty")
    table: list[bytes] = [b""] * (max(ids) + 1)
    seen: dict[bytes, int] = {}
    for i, v, length in zip(ids, values, lengths):
        if isinstance(v, str):
            v = v.encode("utf-8")
        if not isinstance(v, bytes):
            raise RwkvkitError(f"'{path}': token {i} is a {type(v).__name__} literal, expected str or bytes")
        if len(v) != length:
            raise RwkvkitError(f"'{path}': token {i} has {len(v)} bytes but the line says {length}")
        if i <= 0:
            raise RwkvkitError(f"'{path}': token id {i} is reserved (ids start at 1; 0 is end-of-text)")
        if table[i]:
            raise RwkvkitError(f"'{path}': token id {i} appears twice")
        if v in seen:
            raise RwkvkitError(f"'{path}': tokens {seen[v]} and {i} have the same bytes {v!r}")
        seen[v] = i
        table[i] = v
    return table


def find_world_vocab() -> Path:
    """The World vocabulary shipped inside an installed package."""
    import importlib.util

    for pkg in ("pyrwkv_tokenizer", "rwkv"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidate = Path(loc) / WORLD_VOCAB
                if candidate.is_file():
                    return candidate
    cached = user_cache_dir() / WORLD_VOCAB
    if cached.is_file():
        return cached
    raise RwkvkitError(
        f"the World vocabulary {WORLD_VOCAB} was not found: install it with "
        f"`pip install \"rwkvkit[tokenizers]\"` (package pyrwkv-tokenizer), put the file in {user_cache_dir()}, "
        "or pass its path as the tokenizer"
    )


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: greedy longest match over UTF-8 bytes.

    Ids equal those of the ``rwkv`` package's ``TRIE_TOKENIZER`` on any text
    (tests/test_tokenizer.py checks a large mixed corpus).  ``encode`` uses the
    Rust ``pyrwkv-tokenizer`` when it is installed and reads the same vocabulary
    file, the pure-Python trie of :meth:`encode_bytes` otherwise.
    """

    name = "world"
    eos_id = 0

    def __init__(self, vocab_path: "str | os.PathLike | None" = None, *, use_fast: bool = True):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else find_world_vocab()
        self.table = parse_world_vocab(self.vocab_path)
        self.vocab_size = len(self.table)
        self._trie: dict | None = None
        self._fast = self._load_fast() if use_fast else None

    def _load_fast(self):
        try:
            import pyrwkv_tokenizer
        except ImportError:
            return None
        try:
            fast = pyrwkv_tokenizer.WorldTokenizer(str(self.vocab_path))
        except Exception:  # the Rust reader refuses a file our parser accepted
            return None
        # Trust it only if it read the same vocabulary.
        if fast.vocab_size() != self.vocab_size:
            return None
        return fast

    @property
    def backend(self) -> str:
        """``"pyrwkv-tokenizer"`` or ``"python"``: which encoder runs."""
        return "pyrwkv-tokenizer" if self._fast is not None else "python"

    def _build_trie(self) -> dict:
        # Nested dicts keyed by byte; key -1 holds the id of the token that
        # ends at that node.
        root: dict = {}
        for i, tok in enumerate(self.table):
            if not tok:
                continue
            node = root
            for byte in tok:
                nxt = node.get(byte)
                if nxt is None:
                    nxt = node[byte] = {}
                node = nxt
            node[-1] = i
        return root

    def encode(self, text: str) -> list[int]:
        if self._fast is not None and isinstance(text, str):
            try:
                return self._fast.encode(text)
            except UnicodeEncodeError:
                pass  # surrogate-escaped bytes: the exact Python path below takes them
        return self.encode_bytes(_encode_text(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest match over raw bytes (need not be valid UTF-8)."""
        if self._trie is None:
            self._trie = self._build_trie()
        root = self._trie
        out: list[int] = []
        i, n = 0, len(data)
        while i < n:
            node = root
            j = i
            best, end = -1, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                tid = node.get(-1)
                if tid is not None:
                    best, end = tid, j
            if best < 0:  # every single byte is a token, so only a broken vocabulary gets here
                raise RwkvkitError(f"byte {data[i]:#04x} has no token in '{self.vocab_path}'")
            out.append(best)
            i = end
        return out

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.table[token_id]
        except IndexError:
            raise RwkvkitError(f"token id {token_id} is outside the World vocabulary (0..{self.vocab_size - 1})") from None


# -------------------------------------------------------- HF tokenizers JSON
def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2): one printable character per byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped,
    in increasing order, to the characters from U+0100 on.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(0x100 + extra)
            extra += 1
    return {c: b for b, c in mapping.items()}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (the 20B tokenizer, or any other).

    ``encode`` is ``tokenizers``' own (no special tokens are added).  Token
    bytes come from the byte-level alphabet when the file uses a ByteLevel
    decoder, so decoding and streaming work on bytes; special tokens (such as
    ``<|endoftext|>``) decode to nothing, as ``tokenizers``' ``decode`` does by
    default.  Other decoders stream by decoding the pending tokens as text.
    """

    eos_id: int | None = None

    def __init__(self, path: "str | os.PathLike", name: str | None = None):
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise RwkvkitError(
                "reading a tokenizer .json file needs the `tokenizers` package: pip install \"rwkvkit[tokenizers]\""
            ) from None
        self.path = Path(path)
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as exc:
            raise RwkvkitError(f"cannot read tokenizer file '{self.path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.name = name or self.path.name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special}
        for candidate in ("<|endoftext|>", "</s>", "<eos>"):
            tid = self._tok.token_to_id(candidate)
            if tid is not None:
                self.eos_id = tid
                break
        self._table: list[bytes] | None = None
        if self._decoder_is_byte_level():
            self._table = self._build_table(added)

    def _decoder_is_byte_level(self) -> bool:
        import json

        try:
            spec = json.loads(self._tok.to_str()).get("decoder") or {}
        except ValueError:
            return False
        return spec.get("type") == "ByteLevel"

    def _build_table(self, added) -> list[bytes]:
        inv = _byte_level_decoder()
        table: list[bytes] = []
        for i in range(self.vocab_size):
            if i in self._special:
                table.append(b"")
                continue
            s = added[i].content if i in added else self._tok.id_to_token(i)
            if s is None:
                table.append(b"")
                continue
            try:
                table.append(bytes(inv[c] for c in s))
            except KeyError:
                # Not in the byte alphabet (e.g. the added whitespace-run
                # tokens): the token's own UTF-8, as tokenizers' ByteLevel
                # decoder does.
                table.append(s.encode("utf-8"))
        return table

    def encode(self, text: str) -> list[int]:
        _encode_text(text)  # same input checks as the other tokenizers
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        if self._table is None:
            return self._tok.decode([token_id], skip_special_tokens=True).encode("utf-8")
        try:
            return self._table[token_id]
        except IndexError:
            raise RwkvkitError(f"token id {token_id} is outside the tokenizer '{self.name}' (0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        if self._table is None:
            return self._tok.decode(list(ids), skip_special_tokens=True)
        return super().decode(ids)

    def stream_decoder(self) -> StreamDecoder:
        if self._table is None:
            return _TextDiffDecoder(self)
        return StreamDecoder(self)


class _TextDiffDecoder(StreamDecoder):
    """Streams a tokenizer without a byte table: decode the pending tokens and
    emit the new text unless it ends in an unfinished character."""

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._done = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self._done :]
        self._done = len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self._ids)
        new = text[self._done :]
        self._done = len(text)
        return new


# --------------------------------------------------------------- 20B lookup
def find_20b(search: Sequence["str | os.PathLike"] = (), *, download: bool = False) -> Path:
    """The 20B tokenizer file: in the given folders (a checkpoint's own
    folder), in :func:`user_cache_dir`, or fetched once from the Hugging Face
    hub when ``download`` is true (needs ``huggingface_hub`` and a network)."""
    for folder in search:
        folder = Path(folder)
        if not folder.is_dir():  # a checkpoint file: look beside it
            folder = folder.parent
        for name in ("tokenizer.json", TWENTY_B_FILE):
            if (folder / name).is_file():
                return folder / name
    cached = user_cache_dir() / TWENTY_B_FILE
    if cached.is_file():
        return cached
    if download:
        return _download_20b(cached)
    raise RwkvkitError(
        f"the 20B tokenizer file was not found: put {TWENTY_B_FILE} (from the RWKV-LM repository, or tokenizer.json "
        f"of {TWENTY_B_HUB_REPO}) in {user_cache_dir()} or in the model's folder, pass its path as the tokenizer, "
        "or allow a download (--download-tokenizer)"
    )


def _download_20b(target: Path) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RwkvkitError("downloading the 20B tokenizer needs huggingface_hub: pip install huggingface_hub") from None
    import shutil

    from .io_utils import atomic_path

    try:
        fetched = hf_hub_download(TWENTY_B_HUB_REPO, "tokenizer.json")
    except Exception as exc:
        raise RwkvkitError(f"could not download the 20B tokenizer from {TWENTY_B_HUB_REPO}: {str(exc).splitlines()[0]}") from None
    with atomic_path(target) as tmp:
        shutil.copyfile(fetched, tmp)
    return target


# -------------------------------------------------------------- the loader
def load_tokenizer(
    name_or_path: "str | os.PathLike | Tokenizer",
    *,
    model_path: "str | os.PathLike | None" = None,
    download: bool = False,
) -> Tokenizer:
    """A tokenizer by name or file.

    - ``"bytes"``: :class:`ByteTokenizer`;
    - ``"world"``: :class:`WorldTokenizer` with the vocabulary shipped in
      ``pyrwkv-tokenizer`` or ``rwkv``;
    - ``"20B"``: the GPT-NeoX tokenizer, found in ``model_path``'s folder
      (Hugging Face RWKV folders carry ``tokenizer.json``), in
      :func:`user_cache_dir`, or downloaded once when ``download`` is true;
    - a path: ``.json`` -> ``tokenizers`` file, ``.txt`` -> World-format
      vocabulary, a folder -> the tokenizer file inside it.

    Raises :class:`~rwkvkit.errors.RwkvkitError` saying where to put a file
    when none is found.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    key = str(name_or_path)
    low = key.lower()
    if low in ("bytes", "byte"):
        return ByteTokenizer()
    if low == "world":
        return WorldTokenizer()
    if low in ("20b", "neox", "gpt-neox-20b"):
        search = [model_path] if model_path is not None else []
        return HFTokenizer(find_20b(search, download=download), name="20B")
    path = Path(key).expanduser()
    if path.is_dir():
        for name in FOLDER_TOKENIZER_FILES:
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise RwkvkitError(f"folder '{path}' holds no tokenizer file (looked for {', '.join(FOLDER_TOKENIZER_FILES)})")
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.suffix == ".txt":
            return WorldTokenizer(path)
        raise RwkvkitError(f"tokenizer file '{path}' is neither .json (tokenizers) nor .txt (World vocabulary)")
    raise RwkvkitError(
        f"unknown tokenizer {key!r}: expected 'bytes', 'world', '20B', or the path of a .json/.txt tokenizer file"
    )


def tokenizer_for_model(model, model_path=None, name=None, *, download: bool = False) -> Tokenizer:
    """The tokenizer to use with ``model``: ``name`` if given, else a file in
    the model's folder, else the family its vocabulary size identifies
    (256 -> bytes, 50277 or 50304 -> 20B, 65536 -> world).  The pairing is checked with
    :func:`check_vocab`."""
    if name is not None:
        tok = load_tokenizer(name, model_path=model_path, download=download)
    else:
        tok = None
        if model_path is not None:
            folder = Path(model_path)
            if not folder.exists():  # a hub id: the files rwkvkit.load fetched
                from .hub import cached_path

                folder = cached_path(model_path) or folder
            folder = folder if folder.is_dir() else folder.parent
            for fname in FOLDER_TOKENIZER_FILES:
                if (folder / fname).is_file():
                    tok = load_tokenizer(folder / fname)
                    break
        if tok is None:
            V = model.config.vocab_size
            if V not in KNOWN_VOCAB_SIZES:
                raise RwkvkitError(
                    f"cannot tell the tokenizer of a model with a vocabulary of {V}: pass one (bytes, world, 20B or a file)"
                )
            tok = load_tokenizer(KNOWN_VOCAB_SIZES[V], model_path=model_path, download=download)
    check_vocab(tok, model.config.vocab_size)
    return tok


def is_world(tokenizer: "Tokenizer | None") -> bool:
    """Whether ``tokenizer`` is the RWKV World vocabulary (id 0 = end-of-text),
    the tokenizer of the World/G1 models whose chat format and LAMBADA prefix
    differ from the Pile models' (rwkv5-7 spec 9)."""
    return isinstance(tokenizer, WorldTokenizer)


def check_vocab(tokenizer: Tokenizer, model_vocab: int) -> None:
    """Refuse a tokenizer whose ids do not fit the model (before any text is made)."""
    if tokenizer.vocab_size > model_vocab:
        raise RwkvkitError(
            f"tokenizer '{tokenizer.name}' has ids up to {tokenizer.vocab_size - 1} but the model's vocabulary has "
            f"{model_vocab} entries: this is not the model's tokenizer"
        )
    if model_vocab - tokenizer.vocab_size > MAX_UNUSED_ROWS:
        raise RwkvkitError(
            f"the model has {model_vocab} output ids but tokenizer '{tokenizer.name}' only {tokenizer.vocab_size}: "
            "this is not the model's tokenizer"
        )


__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "ByteTokenizer",
    "WorldTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "tokenizer_for_model",
    "check_vocab",
    "is_world",
    "parse_world_vocab",
    "find_world_vocab",
    "find_20b",
    "user_cache_dir",
]
