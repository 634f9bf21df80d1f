"""The rwkv.cpp model file ("ggmf" magic): reader, dequantisers, writer.

Layout (rwkv.cpp ``docs/FILE_FORMAT.md``; our notes in shared/data/README.md
section 1.2): a 24-byte header of six little-endian u32 -- magic 0x67676d66,
version (100 or 101), n_vocab, n_embed, n_layer, main data type -- then tensor
records until the end of the file, without padding:

    i32 n_dims, i32 name_length, i32 data_type, i32 ne[n_dims], name, data

``ne`` is in ggml order (fastest axis first), i.e. the PyTorch shape reversed,
and the data is the PyTorch tensor in row-major order.  Quantised types store
blocks of 32 consecutive elements along ``ne[0]``.

rwkv.cpp changes some tensors on conversion; :func:`to_official` undoes it
(rwkv5-7 spec 7.1).  RWKV-4: ``att.time_decay`` is stored as ``-exp(d)`` (the
per-step log-decay), and every ``.time_*`` tensor is squeezed, so
``time_mix_*`` are ``(C,)`` instead of ``(1, 1, C)``.  RWKV-5: ``time_decay``
is stored as the factor ``exp(-exp(d))`` and ``time_first`` as ``exp``, both
with a trailing 1 ((H, 1, 1), or (H, N, 1) for 5.2), as ``time_faaaa``.
RWKV-6: ``time_decay`` raw as (H, N, 1), the LoRA matrices transposed.  RWKV-7: the six
token-shift mixes are one ``att.x_rwkvag`` (6, 1, C), the LoRA matrices
``w1, w2, a1, a2, v1, v2, g1, g2`` are stored transposed, and layer 0 has no
``v0, v1, v2``.  Files carry no generation; it is read from the names.

Quantised layouts are those of ggml after 2023-05 (file version 101).  Version
100 files used an older, incompatible block layout for the quantised types
(e.g. an fp32 scale in Q4_0); those are refused rather than decoded wrongly.
FP32 and FP16 data are the same in both versions.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from .errors import CheckpointError, ShapeError

MAGIC = 0x67676D66  # "ggmf" read as a little-endian u32; b"fmgg" on disk
MAGIC_BYTES = struct.pack("<I", MAGIC)
VERSION_OLD_QUANT = 100
VERSION = 101

# rwkv.cpp type code -> (name, elements per block, bytes per block).
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("FP32", 1, 4),
    1: ("FP16", 1, 2),
    2: ("Q4_0", 32, 18),  # f16 d; u8 qs[16]
    3: ("Q4_1", 32, 20),  # f16 d; f16 m; u8 qs[16]
    7: ("Q5_0", 32, 22),  # f16 d; u8 qh[4]; u8 qs[16]
    8: ("Q5_1", 32, 24),  # f16 d; f16 m; u8 qh[4]; u8 qs[16]
    9: ("Q8_0", 32, 34),  # f16 d; i8 qs[32]
}
# Types that rwkv.cpp once wrote and later removed.
REMOVED_TYPES = {4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3"}
TYPE_CODES = {name: code for code, (name, _, _) in TYPES.items()}
QUANTIZED = frozenset(name for name, block, _ in TYPES.values() if block > 1)

_HEADER = struct.Struct("<6I")
_MAX_NAME = 1 << 16


@dataclass(frozen=True)
class Header:
    version: int
    n_vocab: int
    n_embed: int
    n_layer: int
    data_type: int

    @property
    def type_name(self) -> str:
        return TYPES.get(self.data_type, (REMOVED_TYPES.get(self.data_type, f"type {self.data_type}"),))[0]


@dataclass(frozen=True)
class Record:
    """One tensor record: where its data lies in the file and how it is coded."""

    name: str
    type_code: int
    shape: tuple[int, ...]  # PyTorch order (ne reversed)
    offset: int  # of the data, from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPES[self.type_code][0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def is_rwkvcpp(head: bytes) -> bool:
    return head[:4] == MAGIC_BYTES


def read_index(path: "str | os.PathLike") -> tuple[Header, list[Record]]:
    """Parse the header and every tensor record without reading tensor data.

    Raises :class:`CheckpointError` naming the file, and the tensor where it
    applies, when the file is truncated or malformed.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER.size)
        if len(raw) < _HEADER.size:
            raise CheckpointError(f"rwkv.cpp file '{path}' is truncated: {size} bytes, shorter than its 24-byte header")
        magic, version, n_vocab, n_embed, n_layer, data_type = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise CheckpointError(f"'{path}' is not an rwkv.cpp file: magic {magic:#010x}, expected {MAGIC:#010x}")
        if version not in (VERSION_OLD_QUANT, VERSION):
            raise CheckpointError(f"rwkv.cpp file '{path}' has format version {version}; rwkvkit reads versions 100 and 101")
        header = Header(version, n_vocab, n_embed, n_layer, data_type)
        records: list[Record] = []
        pos = _HEADER.size
        while pos < size:
            fh.seek(pos)
            fixed = fh.read(12)
            if len(fixed) < 12:
                raise CheckpointError(f"rwkv.cpp file '{path}' is truncated inside the record after tensor {len(records)} (offset {pos})")
            n_dims, name_len, type_code = struct.unpack("<3i", fixed)
            if not 1 <= n_dims <= 4 or not 0 < name_len < _MAX_NAME:
                raise CheckpointError(
                    f"rwkv.cpp file '{path}' is corrupt at offset {pos}: record with {n_dims} dims and a {name_len}-byte name"
                )
            ne_raw = fh.read(4 * n_dims)
            name_raw = fh.read(name_len)
            if len(ne_raw) < 4 * n_dims or len(name_raw) < name_len:
                raise CheckpointError(f"rwkv.cpp file '{path}' is truncated inside a tensor record header (offset {pos})")
            ne = struct.unpack(f"<{n_dims}i", ne_raw)
            try:
                name = name_raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"rwkv.cpp file '{path}' is corrupt at offset {pos}: tensor name is not UTF-8") from None
            if type_code in REMOVED_TYPES:
                raise CheckpointError(
                    f"tensor '{name}' in '{path}' uses {REMOVED_TYPES[type_code]}, a type rwkv.cpp has removed; re-quantize the model"
                )
            if type_code not in TYPES:
                raise CheckpointError(f"tensor '{name}' in '{path}' has unknown data type {type_code}")
            if any(d <= 0 for d in ne):
                raise CheckpointError(f"tensor '{name}' in '{path}' has a non-positive dimension {ne}")
            tname, block, block_bytes = TYPES[type_code]
            numel = 1
            for d in ne:
                numel *= d
            if block > 1:
                if version == VERSION_OLD_QUANT:
                    raise CheckpointError(
                        f"tensor '{name}' in '{path}' is {tname} in an rwkv.cpp version-100 file, whose quantized block "
                        "layout predates ggml's May-2023 format and is not supported; re-quantize it with a current rwkv.cpp"
                    )
                if ne[0] % block:
                    raise CheckpointError(f"tensor '{name}' in '{path}': {tname} row length {ne[0]} is not a multiple of {block}")
            nbytes = numel // block * block_bytes
            data_at = pos + 12 + 4 * n_dims + name_len
            if data_at + nbytes > size:
                raise CheckpointError(
                    f"rwkv.cpp file '{path}' is truncated: tensor '{name}' needs {nbytes} bytes at offset {data_at}, "
                    f"but the file ends at {size}"
                )
            records.append(Record(name, type_code, tuple(reversed(ne)), data_at, nbytes))
            pos = data_at + nbytes
    if not records:
        raise CheckpointError(f"rwkv.cpp file '{path}' holds a header but no tensors")
    return header, records


# ------------------------------------------------------------------ dequantise
_CHUNK = 4096  # blocks decoded at a time: keeps the temporaries in cache


def _f16(col: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 from little-endian IEEE half."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] uint8: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] uint8 holding (bit j) << 4 in column j."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _decode_blocks(blocks: np.ndarray, type_name: str, out: np.ndarray) -> None:
    """[n, block bytes] -> ``out`` [n, 32] float32.  Integer work stays in 8 bits;
    one multiply (and add) per element in float32, exact as in ggml."""
    d = _f16(blocks[:, 0:2])
    if type_name == "Q4_0":
        np.multiply(_nibbles(blocks[:, 2:18]).view(np.int8) - np.int8(8), d, out=out)
    elif type_name == "Q4_1":
        np.multiply(_nibbles(blocks[:, 4:20]), d, out=out)
        out += _f16(blocks[:, 2:4])
    elif type_name == "Q5_0":
        q = _nibbles(blocks[:, 6:22]) | _fifth_bits(blocks[:, 2:6])
        np.multiply(q.view(np.int8) - np.int8(16), d, out=out)
    elif type_name == "Q5_1":
        np.multiply(_nibbles(blocks[:, 8:24]) | _fifth_bits(blocks[:, 4:8]), d, out=out)
        out += _f16(blocks[:, 2:4])
    elif type_name == "Q8_0":
        np.multiply(np.ascontiguousarray(blocks[:, 2:34]).view(np.int8), d, out=out)
    else:  # pragma: no cover - TYPES and this switch are kept in step
        raise CheckpointError(f"no dequantizer for {type_name}")


def dequantize(raw: np.ndarray, type_name: str, numel: int) -> np.ndarray:
    """Decode ``numel`` elements of ggml type ``type_name`` from bytes ``raw``.

    Vectorised over blocks; returns a flat float32 array.  The formulas are
    ggml's reference ``dequantize_row_*`` (version-101 layouts):
    Q4_0 ``(q - 8) d``, Q4_1 ``q d + m``, Q5_0 ``(q - 16) d``, Q5_1 ``q d + m``,
    Q8_0 ``q d``; in the 4/5-bit types byte j of ``qs`` holds element j in its
    low nibble and element j + 16 in its high nibble, and bit j of ``qh`` is
    the fifth bit of element j.  Every step is exact in float32 (small
    integers times an fp16 scale), so the result equals ggml's bit for bit.
    """
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if type_name == "FP32":
        return raw.view("<f4").astype(np.float32, copy=True)
    if type_name == "FP16":
        return raw.view("<f2").astype(np.float32)
    _, block, block_bytes = TYPES[TYPE_CODES[type_name]]
    n_blocks = numel // block
    blocks = raw.reshape(n_blocks, block_bytes)  # [n_blocks, bytes per block]
    out = np.empty((n_blocks, block), dtype=np.float32)
    for i in range(0, n_blocks, _CHUNK):
        _decode_blocks(blocks[i : i + _CHUNK], type_name, out[i : i + _CHUNK])
    return out.reshape(-1)


def read_tensor(mm: np.ndarray, rec: Record) -> np.ndarray:
    """The tensor of ``rec`` as float32 (quantised) or its stored float type, shaped as in PyTorch."""
    raw = mm[rec.offset : rec.offset + rec.nbytes]
    if rec.type_name == "FP32":
        arr = raw.view("<f4").copy()  # copy: records are not 4-byte aligned
    elif rec.type_name == "FP16":
        arr = raw.view("<f2").copy()
    else:
        arr = dequantize(raw, rec.type_name, rec.numel)
    return arr.reshape(rec.shape)


def read_raw(path: "str | os.PathLike", progress: bool = False) -> tuple[Header, list[Record], dict[str, torch.Tensor]]:
    """Read and decode every tensor, with rwkv.cpp's own names and shapes."""
    from tqdm.auto import tqdm

    header, records = read_index(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, torch.Tensor] = {}
    for rec in tqdm(records, desc="reading rwkv.cpp tensors", unit="tensor", disable=None if progress else True, leave=False):
        if rec.name in tensors:
            raise CheckpointError(f"tensor '{rec.name}' appears twice in rwkv.cpp file '{path}'")
        tensors[rec.name] = torch.from_numpy(read_tensor(mm, rec))
    del mm
    return header, records, tensors


# --------------------------------------------------------------- transforms
def _to_official4(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo rwkv.cpp's RWKV-4 conversion: official key shapes and time_decay d.

    ``time_decay`` was stored as ``w = -exp(d)``; ``d = log(-w)`` in float64 so
    the round trip adds no rounding beyond float32's.  Squeezed ``time_mix_*``
    tensors get their ``(1, 1, C)`` shape back.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("att.time_decay"):
            w = t.double()
            if not w.is_meta and bool((w >= 0).any()):
                raise CheckpointError(
                    f"tensor '{name}' holds non-negative values; rwkv.cpp stores RWKV-4 decays as -exp(d) < 0"
                )
            t = torch.log(-w).to(t.dtype)
        elif ".time_mix_" in name and t.dim() == 1:
            t = t.reshape(1, 1, -1)  # (C,) -> (1, 1, C)
        out[name] = t
    return out


def _from_official4(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_official4`: what rwkv.cpp's converter stores."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("att.time_decay"):
            t = -torch.exp(t.double()).float()
        if ".time_" in name:
            t = t.squeeze()
        out[name] = t
    return out


# RWKV-7 (spec 7.1): rwkv.cpp's converter concatenates the six token-shift
# mixes into one (6, 1, C) tensor, stores the LoRA matrices transposed and
# writes no v0/v1/v2 for layer 0 (unused there: layer 0 makes v_first).
_MIX7 = ("r", "w", "k", "v", "a", "g")
_LORA7 = re.compile(r"(.*\.att\.)([wavg])([12])\Z")
# (1, 1, C) vectors that a file may hold squeezed to (C,).
_VEC7 = (".att.w0", ".att.a0", ".att.v0", ".att.k_k", ".att.k_a", ".ffn.x_k") + tuple(f".att.x_{m}" for m in _MIX7)
_LAYER0_V7 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def _to_official7(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo rwkv.cpp's RWKV-7 conversion: split ``att.x_rwkvag`` into
    ``x_r, x_w, x_k, x_v, x_a, x_g`` (each (1, 1, C), in that order),
    transpose the LoRA matrices back to (C, D) / (D, C) and give squeezed
    vectors their (1, 1, C) shape.  No value changes: exact."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".att.x_rwkvag"):
            if t.dim() not in (2, 3) or t.shape[0] != 6 or (t.dim() == 3 and t.shape[1] != 1):
                raise ShapeError(f"tensor '{name}' has shape {tuple(t.shape)}, expected (6, 1, n_embd)")
            prefix = name[: -len("x_rwkvag")]
            for i, m in enumerate(_MIX7):
                out[f"{prefix}x_{m}"] = t[i].reshape(1, 1, -1).contiguous()
            continue
        if _LORA7.match(name):
            if t.dim() != 2:
                raise ShapeError(f"tensor '{name}' has shape {tuple(t.shape)}, expected a 2-D LoRA matrix")
            t = t.t().contiguous()
        elif name.endswith(_VEC7) and t.dim() != 3:
            t = t.reshape(1, 1, -1)
        elif ".time_" in name:
            raise CheckpointError(f"tensor '{name}' is not an RWKV-7 name (RWKV-7 has no time_* tensors)")
        out[name] = t
    return out


def _from_official7(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_official7`: what rwkv.cpp's converter stores.

    The six mixes of a layer become one ``att.x_rwkvag`` at the place of
    ``att.x_r``; layer 0's unused v0/v1/v2 are left out, as in rwkv.cpp's files.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in _LAYER0_V7:
            continue
        m = re.match(r"(.*\.att\.)x_([rwkvag])\Z", name)
        if m:
            if m.group(2) != "r":
                continue  # written with x_r
            prefix = m.group(1)
            missing = [f"{prefix}x_{c}" for c in _MIX7 if f"{prefix}x_{c}" not in sd]
            if missing:
                raise CheckpointError(f"missing tensor '{missing[0]}' (rwkv.cpp stores the six mixes together)")
            out[prefix + "x_rwkvag"] = torch.cat([sd[f"{prefix}x_{c}"].reshape(1, 1, -1) for c in _MIX7], dim=0)
            continue
        if _LORA7.match(name):
            t = t.t().contiguous()
        if ".time_" in name:
            t = t.squeeze()
        out[name] = t
    return out


# RWKV-5 and RWKV-6 (spec 7.1).  rwkv.cpp's converter squeezes every
# ``.time_`` tensor and then gives the per-head ones a trailing 1: v5
# ``time_decay`` / ``time_first`` / ``time_faaaa`` are (H, 1, 1) for rwkv.cpp's
# "5.1" (the package's 5.0: per-head decay, no gate) and (H, N, 1) for 5.2; v6
# ``time_decay`` is (H, N, 1) instead of (1, 1, C_att) and ``time_faaaa``
# (H, N, 1).  Values: v5 ``time_decay`` is stored as the decay factor
# exp(-exp(d)), v5 ``time_first`` as exp(log u) = u, v6 ``time_decay`` raw.  The
# v6 LoRA matrices ``time_maa_w1``, ``time_decay_w1``, ``time_decay_w2`` are
# stored transposed and ``time_maa_w2`` (5, D, C) as (5, C, D).
_HEAD5 = (".att.time_decay", ".att.time_first", ".att.time_faaaa")
_LORA6_2D = (".att.time_maa_w1", ".att.time_decay_w1", ".att.time_decay_w2")


def _decay5(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.exp(d))


def _undecay5(w: torch.Tensor) -> torch.Tensor:
    return torch.log(-torch.log(w))


def _per_head(name: str, t: torch.Tensor) -> torch.Tensor:
    """(H, 1, 1) -> (H,), (H, N, 1) -> (H, N); (H,) and (H, N) are kept."""
    if t.dim() == 3 and t.shape[2] == 1:
        return t.reshape(t.shape[0]) if t.shape[1] == 1 else t.reshape(t.shape[0], t.shape[1])
    if t.dim() in (1, 2):
        return t
    raise ShapeError(f"tensor '{name}' has shape {tuple(t.shape)}, expected rwkv.cpp's (n_head, 1, 1) or (n_head, head_size, 1)")


def _to_official5(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo rwkv.cpp's RWKV-5 conversion: ``time_decay`` d = log(-log(w)) from
    the stored factor w, ``time_first`` log of the stored u, ``time_faaaa``
    unchanged; per-head tensors lose the trailing 1, ``time_mix_*`` get their
    (1, 1, C) shape back.  Both inverses are computed in float64 and rounded
    once to float32.  Writing the result again gives the stored bits back for
    every decay with d <= 0.5 (w >= 0.19; the fixtures' are 0.29-0.33, trained
    decays are mostly far slower); for faster decays float32 d cannot reach
    every float32 w (a step of d moves w by e^d |d| 2^-23 of itself) and the
    rewritten factor is the nearest one, within that relative step."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_HEAD5):
            t = _per_head(name, t)
            check = not t.is_meta and t.numel() > 0
            if name.endswith(".time_decay"):
                if check and not bool(((t > 0) & (t < 1)).all()):
                    raise CheckpointError(
                        f"tensor '{name}' holds values outside (0, 1); rwkv.cpp stores RWKV-5 decays as the factor exp(-exp(d))"
                    )
                t = _undecay5(t.double()).float()
            elif name.endswith(".time_first"):
                if check and not bool((t > 0).all()):
                    raise CheckpointError(f"tensor '{name}' holds values <= 0; rwkv.cpp stores RWKV-5 time_first as exp(time_first) > 0")
                t = torch.log(t.double()).float()
        elif ".time_mix_" in name and t.dim() == 1:
            t = t.reshape(1, 1, -1)
        out[name] = t
    return out


def _from_official5(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_official5`: what rwkv.cpp's converter stores.

    rwkv.cpp runs the package's 5.0 (its "5.1") and 5.2; a 5.1 model (gate
    with a per-head decay) is refused: rwkv.cpp reads a gate as 5.2 and would
    mis-read the per-head decay.
    """
    decay = sd.get("blocks.0.att.time_decay")
    if "blocks.0.att.gate.weight" in sd and decay is not None and decay.dim() == 1:
        raise CheckpointError(
            "rwkv.cpp runs RWKV-5 (no gate) and RWKV-5.2, not RWKV-5.1 (a gate with a per-head decay, spec 1); "
            "write this model as pth, safetensors or rwkvkit instead"
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith(_HEAD5):
            if name.endswith(".time_decay"):
                t = _decay5(t.double()).float()
            elif name.endswith(".time_first"):
                t = torch.exp(t.double()).float()
            t = t.reshape(t.shape[0], -1, 1)  # (H,) -> (H, 1, 1), (H, N) -> (H, N, 1)
        elif ".time_" in name:
            t = t.squeeze()
        out[name] = t
    return out


def _to_official6(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo rwkv.cpp's RWKV-6 conversion: transpose the LoRA matrices back,
    ``time_decay`` (H, N, 1) -> (1, 1, C_att), ``time_faaaa`` (H, N, 1) -> (H, N),
    squeezed mixes -> (1, 1, C).  No value changes: exact."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_LORA6_2D):
            if t.dim() != 2:
                raise ShapeError(f"tensor '{name}' has shape {tuple(t.shape)}, expected a 2-D LoRA matrix")
            t = t.t().contiguous()
        elif name.endswith(".att.time_maa_w2"):
            if t.dim() != 3 or t.shape[0] != 5:
                raise ShapeError(f"tensor '{name}' has shape {tuple(t.shape)}, expected rwkv.cpp's (5, n_embd, d_mix)")
            t = t.transpose(1, 2).contiguous()
        elif name.endswith(".att.time_decay"):
            t = t.reshape(1, 1, -1)
        elif name.endswith(".att.time_faaaa"):
            t = _per_head(name, t)
        elif ".time_maa_" in name and t.dim() == 1:
            t = t.reshape(1, 1, -1)
        out[name] = t
    return out


def _from_official6(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_official6`: what rwkv.cpp's converter stores."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith(_LORA6_2D):
            t = t.t().contiguous()
        elif name.endswith(".att.time_maa_w2"):
            t = t.transpose(1, 2).contiguous()
        elif name.endswith(".att.time_decay"):
            faaaa = sd.get(name[: -len("time_decay")] + "time_faaaa")
            if faaaa is None or faaaa.dim() != 2:
                raise CheckpointError(f"missing tensor '{name[: -len('time_decay')]}time_faaaa' (rwkv.cpp shapes time_decay per head)")
            t = t.reshape(faaaa.shape[0], faaaa.shape[1], 1)
        elif name.endswith(".att.time_faaaa"):
            t = t.reshape(t.shape[0], -1, 1)
        elif ".time_" in name:
            t = t.squeeze()
        out[name] = t
    return out


# generation -> (file tensors -> official state dict, official -> file tensors)
TRANSFORMS = {
    "4": (_to_official4, _from_official4),
    "5": (_to_official5, _from_official5),
    "5.1": (_to_official5, _from_official5),
    "5.2": (_to_official5, _from_official5),
    "6": (_to_official6, _from_official6),
    "7": (_to_official7, _from_official7),
}

# Names that rwkv.cpp's converter keeps in FP32 in an FP16 file even when they
# have two or more dimensions (spec 7.1), and the non-emb/head 2-D tensors its
# quantizer leaves unquantised, per generation.
_FP32_NAMES = {
    "4": (".time_",),
    # RWKV-5/6: every time_* tensor, v6's LoRA matrices included (spec 7.1).
    "5": (".time_",),
    "5.1": (".time_",),
    "5.2": (".time_",),
    "6": (".time_",),
    "7": (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0"),
}
_UNQUANTIZED = re.compile(r"\.att\.([wavg][12]|r_k)\Z")


def tensor_type(name: str, shape: tuple[int, ...], type_name: str, generation: str = "4") -> str:
    """The type rwkv.cpp's converter (FP32, FP16) or quantizer (Q*) gives a tensor
    of an rwkv.cpp-named state dict in a file of main type ``type_name``.

    FP16: tensors with >= 2 dims whose names contain none of the generation's
    FP32 markers (RWKV-7: the LoRA matrices are FP16; RWKV-5/6: every
    ``time_*`` tensor, RWKV-6's LoRAs included, stays FP32).  Quantised: 2-D
    tensors other than ``emb``, ``head``, and RWKV-7's LoRAs and ``r_k``
    (so RWKV-6's 2-D ``time_maa_w1``, ``time_decay_w1/w2`` are quantised,
    the 3-D ``time_maa_w2`` and RWKV-5's (H, N, 1) vectors are not).
    Everything else is FP32.
    """
    if type_name in QUANTIZED:
        if len(shape) == 2 and name not in ("emb.weight", "head.weight") and not _UNQUANTIZED.search(name):
            return type_name
        return "FP32"
    if type_name == "FP16" and len(shape) >= 2 and not any(m in name for m in _FP32_NAMES.get(generation, (".time_",))):
        return "FP16"
    return "FP32"


def _transforms(generation: str):
    if generation not in TRANSFORMS:
        raise CheckpointError(f"rwkv.cpp files of RWKV-{generation} are not supported; rwkvkit reads {sorted(TRANSFORMS)}")
    return TRANSFORMS[generation]


def to_official(tensors: Mapping[str, torch.Tensor], generation: str = "4") -> dict[str, torch.Tensor]:
    """Tensors of an rwkv.cpp file -> the official state dict of that generation."""
    return _transforms(generation)[0](tensors)


def from_official(sd: Mapping[str, torch.Tensor], generation: str = "4") -> dict[str, torch.Tensor]:
    """An official state dict -> the tensors rwkv.cpp's converter would store."""
    return _transforms(generation)[1](sd)


# -------------------------------------------------------------------- writing
def write(
    path: "str | os.PathLike",
    header: Header,
    records: Iterable[tuple[str, str, tuple[int, ...], bytes]],
) -> None:
    """Write an rwkv.cpp file from ``(name, type name, PyTorch shape, raw data)`` records.

    The data must already be coded in the named type (for quantised types, as
    ggml blocks of 32 along the last PyTorch axis).  Writes ``path`` directly;
    callers wanting atomicity pass a path from :func:`rwkvkit.io_utils.atomic_path`.
    """
    with open(path, "wb") as fh:
        fh.write(_HEADER.pack(MAGIC, header.version, header.n_vocab, header.n_embed, header.n_layer, header.data_type))
        for name, type_name, shape, data in records:
            code = TYPE_CODES[type_name]
            _, block, block_bytes = TYPES[code]
            numel = 1
            for s in shape:
                numel *= s
            if shape[-1] % block or len(data) != numel // block * block_bytes:
                raise ValueError(f"tensor '{name}': {len(data)} bytes do not code shape {shape} as {type_name}")
            key = name.encode("utf-8")
            ne = tuple(reversed(shape))
            fh.write(struct.pack(f"<3i{len(ne)}i", len(ne), len(key), code, *ne))
            fh.write(key)
            fh.write(data)


# ------------------------------------------------------------------- quantise
def _to_f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype("<f2").view(np.uint8)  # [n, 1] -> [n, 2]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes, element j low and j + 16 high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _quantize_blocks(x: np.ndarray, type_name: str) -> np.ndarray:
    """[n, 32] float32 -> [n, block bytes] uint8, as ggml's reference quantisers.

    The scale is computed in float32, its inverse applied in float32, values
    truncated toward zero after the rounding offset (ggml's ``(int8_t)(v + .5)``)
    and clamped; only then is the scale rounded to fp16 for storage.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        if type_name in ("Q4_0", "Q5_0"):
            levels = 8 if type_name == "Q4_0" else 16
            signed_max = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)  # [n, 1]
            d = signed_max / np.float32(-levels)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.minimum(np.trunc(x * inv + np.float32(levels + 0.5)), 2 * levels - 1).astype(np.uint8)
            head = [_to_f16_bytes(d)]
        elif type_name in ("Q4_1", "Q5_1"):
            levels = 15 if type_name == "Q4_1" else 31
            lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            d = (hi - lo) / np.float32(levels)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.minimum(np.trunc((x - lo) * inv + np.float32(0.5)), levels).astype(np.uint8)
            head = [_to_f16_bytes(d), _to_f16_bytes(lo)]
        elif type_name == "Q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            v = x * inv
            q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8).view(np.uint8)  # roundf
            return np.concatenate([_to_f16_bytes(d), q], axis=1)
        else:
            raise CheckpointError(f"cannot quantize to {type_name!r}; expected one of {', '.join(sorted(QUANTIZED))}")
    if type_name in ("Q5_0", "Q5_1"):
        qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # [n, 4]: bit j = fifth bit of element j
        return np.concatenate(head + [qh, _pack_nibbles(q & 0x0F)], axis=1)
    return np.concatenate(head + [_pack_nibbles(q)], axis=1)


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """Code a float tensor as ggml blocks of ``type_name`` along its last axis.

    Returns uint8 ``[..., last // 32 * block bytes]``, the bytes rwkv.cpp's
    quantizer writes (version-101 layouts).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if type_name not in QUANTIZED:
        raise CheckpointError(f"cannot quantize to {type_name!r}; expected one of {', '.join(sorted(QUANTIZED))}")
    _, block, block_bytes = TYPES[TYPE_CODES[type_name]]
    if x.shape[-1] % block:
        raise CheckpointError(f"cannot quantize a tensor of shape {x.shape} to {type_name}: the last axis must be a multiple of {block}")
    blocks = x.reshape(-1, block)  # [n_blocks, 32]
    out = np.empty((len(blocks), block_bytes), dtype=np.uint8)
    for i in range(0, len(blocks), _CHUNK):
        out[i : i + _CHUNK] = _quantize_blocks(blocks[i : i + _CHUNK], type_name)
    return out.reshape(*x.shape[:-1], x.shape[-1] // block * block_bytes)


def write_state_dict(
    path: "str | os.PathLike",
    sd: Mapping[str, torch.Tensor],
    n_layer: int,
    type_name: str = "FP32",
    generation: "str | None" = None,
) -> None:
    """Write an official-name state dict as rwkv.cpp would convert it.

    ``generation`` ("4", "5", "5.2", "6", "7", ...) is read from the keys when not given
    (:func:`rwkvkit.models.detect`).  ``type_name`` is FP32, FP16 or a
    quantised type; which tensors take it is rwkv.cpp's rule, per generation
    (:func:`tensor_type`).  The header is version 101, as rwkv.cpp writes.
    """
    if type_name not in TYPE_CODES:
        raise CheckpointError(f"unknown rwkv.cpp type {type_name!r}; expected one of {', '.join(TYPE_CODES)}")
    if generation is None:
        from . import models

        generation = models.detect(sd)[0]
    cpp = from_official(sd, generation)
    emb = cpp["emb.weight"]

    def records():
        for name, t in cpp.items():
            arr = t.detach().cpu().float().contiguous().numpy()
            kind = tensor_type(name, tuple(t.shape), type_name, generation)
            if kind in QUANTIZED:
                yield name, kind, tuple(t.shape), quantize(arr, kind).tobytes()
            elif kind == "FP16":
                yield name, "FP16", tuple(t.shape), arr.astype("<f2").tobytes()
            else:
                yield name, "FP32", tuple(t.shape), arr.astype("<f4").tobytes()

    header = Header(VERSION, int(emb.shape[0]), int(emb.shape[1]), n_layer, TYPE_CODES[type_name])
    write(path, header, records())
