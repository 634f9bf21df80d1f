"""Checkpoint readers and writers: every format a user is likely to hold, for every supported generation.

Formats are recognised by their content, never by the file name:

- ``pth``: BlinkDL's official ``torch.save``'d dict (fp32/fp16/bf16), also
  Lightning files whose keys carry a ``_forward_module.`` prefix;
- ``safetensors``: one ``.safetensors`` file with the official key names;
- ``hf``: a Hugging Face folder (``config.json`` with ``model.safetensors``
  or ``pytorch_model.bin``, sharded or not): transformers' ``RwkvForCausalLM``
  (RWKV-4, model_type "rwkv"), the RWKV org's remote-code
  ``Rwkv5ForCausalLM`` / ``Rwkv6ForCausalLM`` (RWKV-5.2 / RWKV-6, model_type
  "rwkv5" / "rwkv6") or fla's ``RWKV7ForCausalLM`` (RWKV-7, model_type
  "rwkv7", the fla-hub layout);
- ``rwkvcpp``: an rwkv.cpp ``.bin`` (FP32, FP16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0;
  see :mod:`rwkvkit.rwkvcpp`), dequantised on load;
- ``rwkvkit``: rwkvkit's own folder, ``config.json`` (the
  :class:`~rwkvkit.config.ModelConfig` plus a format marker) beside
  ``model.safetensors``.

Every reader yields a dict with the official key names (spec 3.1); the
generation is detected from the names (:func:`rwkvkit.models.detect`), the
architecture is inferred from the shapes and every key is checked against the
generation's ``expected_shapes``.  Generations and variants rwkvkit does not
run are recognised from their keys and refused with a message naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from . import models, rwkvcpp
from .config import ModelConfig, dtype_from_name, dtype_name
from .errors import CheckpointError, RwkvkitError, ShapeError, UnsupportedModelError
from .io_utils import atomic_dir, atomic_path

FORMAT_MARKER = "rwkvkit"
# 2: config.json names its "generation" (version 1 folders are RWKV-4 and still load).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Output formats of `convert`.
TARGETS = ("rwkvkit", "hf", "pth", "safetensors", "rwkvcpp")

_LIGHTNING_PREFIX = "_forward_module."
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_UNSET: Any = object()

# ------------------------------------------------------------------ HF names
# The one declarative table between official names and transformers'
# RwkvForCausalLM names (spec 3.6).  Placeholders: {i} a block index, {p}
# weight|bias, {m} a projection name.  No reshapes, transposes or casts.
HF_NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.{p}", "rwkv.blocks.0.pre_ln.{p}"),
    ("blocks.{i}.ln1.{p}", "rwkv.blocks.{i}.ln1.{p}"),
    ("blocks.{i}.ln2.{p}", "rwkv.blocks.{i}.ln2.{p}"),
    ("blocks.{i}.att.time_decay", "rwkv.blocks.{i}.attention.time_decay"),
    ("blocks.{i}.att.time_first", "rwkv.blocks.{i}.attention.time_first"),
    ("blocks.{i}.att.time_mix_k", "rwkv.blocks.{i}.attention.time_mix_key"),
    ("blocks.{i}.att.time_mix_v", "rwkv.blocks.{i}.attention.time_mix_value"),
    ("blocks.{i}.att.time_mix_r", "rwkv.blocks.{i}.attention.time_mix_receptance"),
    ("blocks.{i}.att.{m}.weight", "rwkv.blocks.{i}.attention.{m}.weight"),
    ("blocks.{i}.ffn.time_mix_k", "rwkv.blocks.{i}.feed_forward.time_mix_key"),
    ("blocks.{i}.ffn.time_mix_r", "rwkv.blocks.{i}.feed_forward.time_mix_receptance"),
    ("blocks.{i}.ffn.{m}.weight", "rwkv.blocks.{i}.feed_forward.{m}.weight"),
    ("ln_out.{p}", "rwkv.ln_out.{p}"),
    ("head.weight", "head.weight"),
)
# fla's RWKV7ForCausalLM names (rwkv5-7 spec 2.6; fla-org/flash-linear-attention
# fla/models/rwkv7, fla/layers/rwkv7).  The third field says how the tensor
# changes on the way to HF: "T" transposed (fla's LoRA is two nn.Linear, so
# w1 (C, D) is lora.0.weight (D, C)), "vec" (1, 1, C) -> (C,), "x" kept
# (1, 1, C) (a (C,) one is accepted on reading), None unchanged.  {x} is a
# LoRA (w, a, v, g), {y} one with a bias (w, a, v: their x0), {c} a mix.
HF7_NAME_TABLE: tuple[tuple[str, str, "str | None"], ...] = (
    ("emb.weight", "model.embeddings.weight", None),
    ("blocks.0.ln0.{p}", "model.layers.0.pre_norm.{p}", None),
    ("blocks.{i}.ln1.{p}", "model.layers.{i}.attn_norm.{p}", None),
    ("blocks.{i}.ln2.{p}", "model.layers.{i}.ffn_norm.{p}", None),
    ("blocks.{i}.att.x_{c}", "model.layers.{i}.attn.x_{c}", "x"),
    ("blocks.{i}.att.{x}1", "model.layers.{i}.attn.{x}_lora.lora.0.weight", "T"),
    ("blocks.{i}.att.{x}2", "model.layers.{i}.attn.{x}_lora.lora.2.weight", "T"),
    ("blocks.{i}.att.{y}0", "model.layers.{i}.attn.{y}_lora.lora.2.bias", "vec"),
    ("blocks.{i}.att.k_k", "model.layers.{i}.attn.k_k", "vec"),
    ("blocks.{i}.att.k_a", "model.layers.{i}.attn.k_a", "vec"),
    ("blocks.{i}.att.r_k", "model.layers.{i}.attn.r_k", None),
    ("blocks.{i}.att.receptance.weight", "model.layers.{i}.attn.r_proj.weight", None),
    ("blocks.{i}.att.key.weight", "model.layers.{i}.attn.k_proj.weight", None),
    ("blocks.{i}.att.value.weight", "model.layers.{i}.attn.v_proj.weight", None),
    ("blocks.{i}.att.output.weight", "model.layers.{i}.attn.o_proj.weight", None),
    ("blocks.{i}.att.ln_x.{p}", "model.layers.{i}.attn.g_norm.{p}", None),
    ("blocks.{i}.ffn.x_k", "model.layers.{i}.ffn.x_k", "vec"),
    ("blocks.{i}.ffn.key.weight", "model.layers.{i}.ffn.key.weight", None),
    ("blocks.{i}.ffn.value.weight", "model.layers.{i}.ffn.value.weight", None),
    ("ln_out.{p}", "model.norm.{p}", None),
    ("head.weight", "lm_head.weight", None),
)
# The RWKV org's remote-code Rwkv5ForCausalLM (RWKV-5.2 only; RWKV/rwkv-5-world-*
# modeling_rwkv5.py): transformers' RWKV-4 names plus the gate, ln_x, time_faaaa
# (H, N) and time_decay (H, N).  No shape changes.  {n} is a projection, the
# gate included.
HF5_NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.{p}", "rwkv.blocks.0.pre_ln.{p}"),
    ("blocks.{i}.ln1.{p}", "rwkv.blocks.{i}.ln1.{p}"),
    ("blocks.{i}.ln2.{p}", "rwkv.blocks.{i}.ln2.{p}"),
    ("blocks.{i}.att.time_decay", "rwkv.blocks.{i}.attention.time_decay"),
    ("blocks.{i}.att.time_faaaa", "rwkv.blocks.{i}.attention.time_faaaa"),
    ("blocks.{i}.att.time_mix_k", "rwkv.blocks.{i}.attention.time_mix_key"),
    ("blocks.{i}.att.time_mix_v", "rwkv.blocks.{i}.attention.time_mix_value"),
    ("blocks.{i}.att.time_mix_r", "rwkv.blocks.{i}.attention.time_mix_receptance"),
    ("blocks.{i}.att.time_mix_g", "rwkv.blocks.{i}.attention.time_mix_gate"),
    ("blocks.{i}.att.{n}.weight", "rwkv.blocks.{i}.attention.{n}.weight"),
    ("blocks.{i}.att.ln_x.{p}", "rwkv.blocks.{i}.attention.ln_x.{p}"),
    ("blocks.{i}.ffn.time_mix_k", "rwkv.blocks.{i}.feed_forward.time_mix_key"),
    ("blocks.{i}.ffn.time_mix_r", "rwkv.blocks.{i}.feed_forward.time_mix_receptance"),
    ("blocks.{i}.ffn.{m}.weight", "rwkv.blocks.{i}.feed_forward.{m}.weight"),
    ("ln_out.{p}", "rwkv.ln_out.{p}"),
    ("head.weight", "head.weight"),
)
# The RWKV org's remote-code Rwkv6ForCausalLM (RWKV/rwkv-6-world-*
# modeling_rwkv6.py; rwkv5-7 spec 2.6): the official parameter names and shapes
# under rwkv.blocks.{i}.attention / .feed_forward ({t} a time_* parameter).
HF6_NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.{p}", "rwkv.blocks.0.pre_ln.{p}"),
    ("blocks.{i}.ln1.{p}", "rwkv.blocks.{i}.ln1.{p}"),
    ("blocks.{i}.ln2.{p}", "rwkv.blocks.{i}.ln2.{p}"),
    ("blocks.{i}.att.{t}", "rwkv.blocks.{i}.attention.{t}"),
    ("blocks.{i}.att.{n}.weight", "rwkv.blocks.{i}.attention.{n}.weight"),
    ("blocks.{i}.att.ln_x.{p}", "rwkv.blocks.{i}.attention.ln_x.{p}"),
    ("blocks.{i}.ffn.{t}", "rwkv.blocks.{i}.feed_forward.{t}"),
    ("blocks.{i}.ffn.{m}.weight", "rwkv.blocks.{i}.feed_forward.{m}.weight"),
    ("ln_out.{p}", "rwkv.ln_out.{p}"),
    ("head.weight", "head.weight"),
)
_PLACEHOLDERS = {
    "i": r"(?P<i>\d+)",
    "p": r"(?P<p>weight|bias)",
    "m": r"(?P<m>key|value|receptance|output)",
    "n": r"(?P<n>key|value|receptance|output|gate)",
    "t": r"(?P<t>time_(?:maa_[xwkvrg]|maa_w[12]|decay|decay_w[12]|faaaa))",
    "c": r"(?P<c>[rwkvag])",
    "x": r"(?P<x>[wavg])",
    "y": r"(?P<y>[wav])",
}


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", pattern)
    rx = "".join(re.escape(s) if n % 2 == 0 else _PLACEHOLDERS[s] for n, s in enumerate(parts))
    return re.compile(rx + r"\Z")


@dataclass(frozen=True)
class HFLayout:
    """One Hugging Face architecture: its config names and its name table."""

    generation: str
    model_type: str
    architecture: str
    to_hf: list  # [(official regex, HF template, change)]
    from_hf: list  # [(HF regex, official template, change)]


def _layout(generation: str, model_type: str, architecture: str, table) -> HFLayout:
    rows = [tuple(row) + (None,) * (3 - len(row)) for row in table]
    return HFLayout(
        generation,
        model_type,
        architecture,
        [(_compile(a), b, c) for a, b, c in rows],
        [(_compile(b), a, c) for a, b, c in rows],
    )


# generation -> the layout rwkvkit writes; model_type -> the layout it reads.
HF_LAYOUTS = {
    "4": _layout("4", "rwkv", "RwkvForCausalLM", HF_NAME_TABLE),
    "5.2": _layout("5.2", "rwkv5", "Rwkv5ForCausalLM", HF5_NAME_TABLE),
    "6": _layout("6", "rwkv6", "Rwkv6ForCausalLM", HF6_NAME_TABLE),
    "7": _layout("7", "rwkv7", "RWKV7ForCausalLM", HF7_NAME_TABLE),
}
# fla renamed its model_type to "rwkv7_fla" in 2025; both mean the same layout.
HF_MODEL_TYPES = {
    "rwkv": HF_LAYOUTS["4"],
    "rwkv5": HF_LAYOUTS["5.2"],
    "rwkv6": HF_LAYOUTS["6"],
    "rwkv7": HF_LAYOUTS["7"],
    "rwkv7_fla": HF_LAYOUTS["7"],
}
_TO_HF = HF_LAYOUTS["4"].to_hf
_FROM_HF = HF_LAYOUTS["4"].from_hf


def _match(key: str, table):
    for rx, template, change in table:
        m = rx.match(key)
        if m:
            return template.format(**m.groupdict()), change
    return None, None


def _rename(key: str, table) -> str | None:
    return _match(key, table)[0]


def official_to_hf(key: str, generation: str = "4") -> str:
    """``blocks.3.att.time_mix_k`` -> ``rwkv.blocks.3.attention.time_mix_key``
    (RWKV-4); ``blocks.3.att.w1`` -> ``model.layers.3.attn.w_lora.lora.0.weight``
    (RWKV-7)."""
    out = _rename(key, HF_LAYOUTS[generation].to_hf) if generation in HF_LAYOUTS else None
    if out is None:
        raise CheckpointError(f"tensor '{key}' has no Hugging Face name")
    return out


def hf_to_official(key: str, model_type: str = "rwkv") -> str | None:
    """The inverse of :func:`official_to_hf`; None for a key outside the table."""
    layout = HF_MODEL_TYPES.get(model_type)
    return _rename(key, layout.from_hf) if layout else None


def _hf_change(t: torch.Tensor, change: "str | None", to_hf: bool, key: str) -> torch.Tensor:
    """Apply (or undo) the shape change of one table row; no value changes."""
    if change == "T":
        if t.dim() != 2:
            raise ShapeError(f"tensor '{key}' has shape {tuple(t.shape)}, expected a 2-D LoRA matrix")
        return t.t().contiguous()
    if change in ("vec", "x"):
        if to_hf:
            return t.reshape(-1) if change == "vec" else t.reshape(1, 1, -1)
        return t.reshape(1, 1, -1) if t.dim() != 3 else t
    return t


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], generation: str) -> dict[str, torch.Tensor]:
    """Official tensors -> the HF layout of ``generation``.  RWKV-7: layer 0's
    v0/v1/v2 (unused) are dropped, since fla's layer 0 has no v_lora."""
    layout = HF_LAYOUTS.get(generation)
    if layout is None:
        if generation in ("5", "5.1"):
            raise CheckpointError(
                f"the Hugging Face Rwkv5ForCausalLM holds RWKV-5.2 only (per-channel decay and time_faaaa), not RWKV-{generation}; "
                "write this model as pth, safetensors or rwkvkit instead"
            )
        raise CheckpointError(f"rwkvkit writes Hugging Face folders of {', '.join(models.NICKNAMES[g] for g in HF_LAYOUTS)}, not RWKV-{generation}")
    if generation == "5.2" and "blocks.0.att.time_first" in sd:
        raise CheckpointError(
            "the Hugging Face Rwkv5ForCausalLM holds the bonus as time_faaaa; this RWKV-5.2 model has time_first (log u): "
            "write it as pth, safetensors or rwkvkit instead"
        )
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if generation == "7" and key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        name, change = _match(key, layout.to_hf)
        if name is None:
            raise CheckpointError(f"tensor '{key}' has no Hugging Face name")
        out[name] = _hf_change(t, change, True, key).contiguous()
    return out


# ------------------------------------------------------------ what was read
@dataclass
class Checkpoint:
    """Tensors with official names, as read from a file, and what the file said."""

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    # Bytes on disk (all files of a folder).
    file_bytes: int
    # dtype name as stored -> number of elements (rwkv.cpp: its type names).
    stored: dict[str, int] = field(default_factory=dict)
    # rwkv.cpp: the header's main type and version; HF/rwkvkit: their config.json.
    details: dict[str, Any] = field(default_factory=dict)
    # Non-tensor entries of a .pth (e.g. the pip package's '_strategy').
    non_tensors: list[str] = field(default_factory=list)

    @property
    def default_dtype(self) -> torch.dtype:
        """The float dtype holding most elements; float32 for rwkv.cpp files.

        rwkv.cpp keeps 1-D tensors in FP32 even in its FP16 files and computes
        in fp32, so its files load as float32 whatever their storage type.
        """
        if self.format == "rwkvcpp":
            return torch.float32
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        best = max(counts, key=counts.get) if counts else torch.float32
        return best if best in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- detection
def detect_format(path: "str | os.PathLike") -> str:
    """``"pth"``, ``"safetensors"``, ``"hf"``, ``"rwkvkit"`` or ``"rwkvcpp"``, from the content."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: '{path}'")
    if path.is_dir():
        cfg_path = path / CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(
                f"folder '{path}' holds no model: expected {CONFIG} beside {WEIGHTS} (an rwkvkit or Hugging Face folder)"
            )
        cfg = _read_json(cfg_path)
        if cfg.get("format") == FORMAT_MARKER:
            return "rwkvkit"
        if "model_type" in cfg or "architectures" in cfg:
            return "hf"
        raise CheckpointError(
            f"'{cfg_path}' is neither an rwkvkit config (\"format\": \"{FORMAT_MARKER}\") nor a Hugging Face one (\"model_type\")"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if rwkvcpp.is_rwkvcpp(head):
        return "rwkvcpp"
    if head[:4] == b"PK\x03\x04":
        return "pth"  # torch.save's zip container
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pth"  # torch.save's legacy pickle container (PROTO opcode, protocol 2-5)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # u64 header length, then a JSON header
    raise CheckpointError(
        f"'{path}' is not a checkpoint rwkvkit knows (first bytes {head[:8].hex(' ')}): expected an official .pth "
        "(torch.save), a .safetensors file, an rwkv.cpp .bin ('ggmf' magic), or a folder with config.json"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read '{path}' as JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object")
    return data


# ---------------------------------------------------------------- generations
def detect_generation(tensors: Mapping[str, Any], non_tensors: Iterable[str] = ()) -> tuple[str, str | None]:
    """(generation, evidence key): ``("4", None)`` for plain RWKV-4,
    ``("7", "blocks.0.att.r_k")`` for RWKV-7, and for what rwkvkit does not run
    a label such as ``"RWKV-6 (Finch)"`` (see :func:`rwkvkit.models.detect`)."""
    gen, hit, label = models.detect(tensors, non_tensors)
    return (gen if gen in models.REGISTRY else label), hit


# Names only RWKV-5 has among the keys an RWKV-4 file could share with it.
_RWKV5_ONLY = (".att.time_faaaa", ".att.gate.weight", ".att.time_mix_g")


def _rwkv5_without_ln_x(tensors: Mapping[str, Any]) -> str | None:
    """The key showing that tensors read as RWKV-4 (no ``att.ln_x``) are an
    RWKV-5 model that lost its GroupNorm: an RWKV-5-only name, or a
    ``time_decay`` shaped per head ((H,), (H, N), rwkv.cpp's (H, N, 1)) rather
    than RWKV-4's (C_att,)."""
    keys = sorted(tensors)
    hit = next((k for k in keys if k.endswith(_RWKV5_ONLY)), None)
    if hit:
        return hit
    key = tensors.get("blocks.0.att.key.weight")
    decay = tensors.get("blocks.0.att.time_decay")
    if key is None or decay is None or len(key.shape) != 2 or len(decay.shape) == 0:
        return None
    per_head = len(decay.shape) > 1 or (decay.shape[0] < key.shape[0] and key.shape[0] % decay.shape[0] == 0)
    return "blocks.0.att.time_decay" if per_head else None


def _refuse_headless_rwkv5(path: Path, tensors: Mapping[str, Any]) -> None:
    hit = _rwkv5_without_ln_x(tensors)
    if hit:
        raise CheckpointError(
            f"'{path}' is an RWKV-5 checkpoint missing tensor 'blocks.0.att.ln_x.weight' (it has '{hit}' "
            f"with shape {tuple(tensors[hit].shape)}, but no per-head GroupNorm ln_x, which every RWKV-5 layer has): "
            "the file is incomplete"
        )


def _refuse_time_state(path: Path, tensors: Mapping[str, Any]) -> None:
    """State-tuned files (spec 2.3) carry ``att.time_state``, a trained initial
    WKV state per layer.  rwkvkit does not load it (its models start from the
    zero state); refuse it by name rather than drop it silently."""
    hit = next((k for k in sorted(tensors) if k.endswith(".att.time_state")), None)
    if hit:
        raise CheckpointError(
            f"'{path}' is a state-tuned checkpoint: '{hit}' (shape {tuple(tensors[hit].shape)}) is a trained initial WKV "
            "state, which rwkvkit does not load; remove the att.time_state tensors to run the base weights"
        )


def check_generation(ck: Checkpoint) -> str:
    """The generation of a checkpoint rwkvkit runs; UnsupportedModelError otherwise."""
    gen, key, label = models.detect(ck.tensors, ck.non_tensors)
    if gen == "4":
        _refuse_headless_rwkv5(ck.path, ck.tensors)
    if gen in models.REGISTRY:
        _refuse_time_state(ck.path, ck.tensors)
        return gen
    if gen == "pip":
        raise UnsupportedModelError(
            f"'{ck.path}' is {label} (it has the entry '{key}'): it holds pre-processed, transposed weights; "
            "load the original .pth instead"
        )
    runs = ", ".join(models.NICKNAMES[g] for g in sorted(models.REGISTRY))
    raise UnsupportedModelError(f"'{ck.path}' is an {label} model (it has the tensor '{key}'); rwkvkit runs {runs}")


# ------------------------------------------------------------------- readers
def _torch_load(path: Path) -> dict:
    """torch.load that never runs arbitrary pickled code and maps big files."""
    try:
        with warnings.catch_warnings():
            # torch warns about odd pickle protocols in corrupt files; the error below says it better.
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # The legacy (non-zip) container cannot be memory-mapped.
                if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                    raise
                with open(path, "rb") as fh:
                    if fh.read(4) == b"PK\x03\x04":
                        raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        text = str(exc)
        # torch wraps the real reason in paragraphs of advice: "... WeightsUnpickler error: <reason>\n\nCheck ..."
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        if detail:
            reason = " ".join(detail.group(1).split())
        else:
            reason = _first_line(exc).split(". ")[0]
        if "Unsupported global" in text:
            raise CheckpointError(
                f"'{path}' holds Python objects other than tensors, which rwkvkit does not unpickle ({reason[:200]})"
            ) from None
        raise CheckpointError(f"cannot read '{path}' as a PyTorch checkpoint, it is truncated or corrupt: {reason[:200]}") from None
    return obj


def _state_dict_from_pth(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a Lightning .ckpt
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict) and "emb.weight" not in obj:
        obj = obj["module"]  # a DeepSpeed model-states file
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    tensors: dict[str, torch.Tensor] = {}
    others: list[str] = []
    for key, value in obj.items():
        key = str(key)
        if key.startswith(_LIGHTNING_PREFIX):
            key = key[len(_LIGHTNING_PREFIX) :]
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            others.append(key)
    return tensors, others


def _check_tensor_entries(path: Path, tensors: Mapping[str, torch.Tensor], others: list[str]) -> None:
    gen, _, _ = models.detect(tensors, others)
    if others and gen != "pip":
        raise CheckpointError(f"'{path}' has non-tensor entries {sorted(others)[:5]}; expected a dict of tensors only")


def _read_pth(path: Path) -> Checkpoint:
    tensors, others = _state_dict_from_pth(path, _torch_load(path))
    _check_tensor_entries(path, tensors, others)
    return Checkpoint(path, "pth", tensors, _file_bytes(path), non_tensors=others)


def _safetensors_header(path: Path) -> dict:
    """Parse the JSON header, with errors that name what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"safetensors file '{path}' is truncated: {size} bytes, shorter than its 8-byte length prefix")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"safetensors file '{path}' is truncated: its header needs {n} bytes, the file has {size - 8} after the prefix")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"safetensors file '{path}' has a corrupt header: {_first_line(exc)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file '{path}' has a corrupt header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"safetensors file '{path}' is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header


def _read_safetensors_file(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    _safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if meta:
                    sl = f.get_slice(key)
                    out[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.uint8), device="meta")
                else:
                    out[key] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"cannot read safetensors file '{path}': {_first_line(exc)[:200]}") from None
    return out


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def _read_hf(path: Path, meta: bool) -> Checkpoint:
    cfg = _read_json(path / CONFIG)
    mtype = str(cfg.get("model_type", ""))
    archs = cfg.get("architectures") or []
    layout = HF_MODEL_TYPES.get(mtype)
    if layout is None:
        known = ", ".join(f"'{t}' ({lay.architecture})" for t, lay in HF_MODEL_TYPES.items())
        raise CheckpointError(f"'{path / CONFIG}' has model_type {mtype!r} (architectures {archs}); expected one of {known}")
    files: list[Path]
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        files = _shards(path, "model.safetensors.index.json")
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    elif (path / "pytorch_model.bin.index.json").is_file():
        files = _shards(path, "pytorch_model.bin.index.json")
    else:
        raise CheckpointError(f"Hugging Face folder '{path}' has no weights: expected one of {', '.join(_HF_WEIGHT_FILES)}")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        if detect_format(f) == "safetensors":
            part = _read_safetensors_file(f, meta)
        else:
            part, others = _state_dict_from_pth(f, _torch_load(f))
            if others:
                raise CheckpointError(f"'{f}' has non-tensor entries {sorted(others)[:5]}; expected a dict of tensors only")
        hf.update(part)
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in hf.items():
        m = re.match(r"(model\.layers\.\d+\.attn\.)x_x\Z", key) if layout.generation == "7" else None
        if m:  # fla's first RWKV-7 layout: the six mixes in one (6, C) tensor
            if t.dim() not in (2, 3) or t.shape[0] != 6:
                raise ShapeError(f"tensor '{key}' in '{path}' has shape {tuple(t.shape)}, expected (6, n_embd)")
            for i, c in enumerate("rwkvag"):
                tensors[hf_to_official(f"{m.group(1)}x_{c}", mtype)] = t[i].reshape(1, 1, -1)
            continue
        name, change = _match(key, layout.from_hf)
        if name is None:
            unknown.append(key)
        else:
            tensors[name] = _hf_change(t, change, False, key)
    if unknown:
        raise CheckpointError(
            f"Hugging Face folder '{path}' has unexpected tensors {sorted(unknown)[:5]} (not {layout.architecture} names)"
        )
    return Checkpoint(path, "hf", tensors, _file_bytes(path), details={"config": cfg})


def _shards(path: Path, index_name: str) -> list[Path]:
    index = _read_json(path / index_name)
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"'{path / index_name}' has no 'weight_map'")
    files = []
    for name in dict.fromkeys(wmap.values()):
        f = path / str(name)
        if not f.is_file():
            raise CheckpointError(f"shard '{f}' named in '{path / index_name}' is missing")
        files.append(f)
    return files


def _read_rwkvkit(path: Path, meta: bool) -> Checkpoint:
    cfg = _read_json(path / CONFIG)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"rwkvkit folder '{path}' has no {WEIGHTS}")
    version = cfg.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"'{path / CONFIG}' has format_version {version!r}; this rwkvkit reads versions {list(READABLE_FORMAT_VERSIONS)}"
        )
    tensors = _read_safetensors_file(weights, meta)
    return Checkpoint(path, "rwkvkit", tensors, _file_bytes(path), details={"config": cfg})


def _read_rwkvcpp(path: Path, meta: bool, progress: bool) -> Checkpoint:
    if meta:
        header, records = rwkvcpp.read_index(path)
        raw = {
            r.name: torch.empty(r.shape, dtype=torch.float16 if r.type_name == "FP16" else torch.float32, device="meta")
            for r in records
        }
    else:
        header, records, raw = rwkvcpp.read_raw(path, progress=progress)
    stored: dict[str, int] = {}
    for r in records:
        stored[r.type_name] = stored.get(r.type_name, 0) + r.numel
    details = {"version": header.version, "main_type": header.type_name, "n_vocab": header.n_vocab, "n_embed": header.n_embed, "n_layer": header.n_layer}
    ck = Checkpoint(path, "rwkvcpp", raw, _file_bytes(path), stored=stored, details=details)
    gen = models.detect(raw)[0]
    if gen == "4":  # before RWKV-4's transform misreads an RWKV-5 decay
        _refuse_headless_rwkv5(path, raw)
    if gen in rwkvcpp.TRANSFORMS:
        ck.tensors = rwkvcpp.to_official(raw, gen)
    return ck


def read(path: "str | os.PathLike", *, meta: bool = False, progress: bool = False) -> Checkpoint:
    """Read a checkpoint of any supported format into official-name tensors.

    ``meta=True`` reads shapes and dtypes only (meta tensors where the format
    allows it), which is what ``rwkvkit info`` needs.  No validation beyond the
    container: see :func:`load`.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "pth":
        ck = _read_pth(path)
    elif fmt == "safetensors":
        ck = Checkpoint(path, "safetensors", _read_safetensors_file(path, meta), _file_bytes(path))
    elif fmt == "hf":
        ck = _read_hf(path, meta)
    elif fmt == "rwkvkit":
        ck = _read_rwkvkit(path, meta)
    else:
        ck = _read_rwkvcpp(path, meta, progress)
    if not ck.stored:
        for t in ck.tensors.values():
            name = dtype_name(t.dtype)
            ck.stored[name] = ck.stored.get(name, 0) + t.numel()
    return ck


# ---------------------------------------------------------------- validation
def validate(tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: "str | os.PathLike") -> None:
    """Every expected key present with its exact shape, nothing else, floats only."""
    config.validate_tensors(tensors, str(source))


def infer_config(ck: Checkpoint) -> ModelConfig:
    """Generation check, sizes from shapes, then every key validated."""
    gen = check_generation(ck)
    try:
        cfg = models.config_from_state_dict(ck.tensors, gen)
    except CheckpointError as exc:
        raise type(exc)(f"'{ck.path}': {exc}") from None
    validate(ck.tensors, cfg, ck.path)
    if ck.format == "rwkvcpp":
        d = ck.details
        if (d["n_vocab"], d["n_embed"], d["n_layer"]) != (cfg.vocab_size, cfg.n_embd, cfg.n_layer):
            raise CheckpointError(
                f"rwkv.cpp file '{ck.path}' header says n_vocab={d['n_vocab']} n_embed={d['n_embed']} n_layer={d['n_layer']}, "
                f"but its tensors have {cfg.vocab_size}, {cfg.n_embd}, {cfg.n_layer}"
            )
        if hasattr(cfg, "rwkvcpp_compatible"):
            cfg = cfg.rwkvcpp_compatible()
    if ck.format == "hf":
        cfg = _hf_numerics(cfg, ck.details["config"])
    if ck.format == "rwkvkit":
        saved = {k: v for k, v in ck.details["config"].items() if k not in ("format", "format_version")}
        stored_cfg = models.config_from_dict(saved)
        if stored_cfg.generation != cfg.generation:
            raise CheckpointError(
                f"'{ck.path}': {CONFIG} says generation {stored_cfg.generation}, the weights are RWKV-{cfg.generation}"
            )
        numerics = set(getattr(cfg, "NUMERICS", ()))
        for f in dataclasses.fields(cfg):
            if f.name in numerics or f.name == "layer_norm_eps":
                continue
            if getattr(stored_cfg, f.name) != getattr(cfg, f.name):
                raise CheckpointError(
                    f"'{ck.path}': {CONFIG} says {f.name}={getattr(stored_cfg, f.name)}, the weights have {getattr(cfg, f.name)}"
                )
        cfg = stored_cfg
    return cfg


def _hf_numerics(cfg: ModelConfig, hf: Mapping[str, Any]) -> ModelConfig:
    """RWKV-5/6 from a Hugging Face folder: the GroupNorm eps of ``ln_x`` is
    ``1e-5 * head_size_divisor**2`` in the RWKV org's remote code (8 -> 64e-5,
    the trained models' and the `rwkv` package's value, spec 3.1).  A config
    without ``head_size_divisor`` keeps the model's default (64e-5)."""
    hsd = hf.get("head_size_divisor")
    if not hasattr(cfg, "group_norm_eps") or cfg.generation == "7" or hsd is None:
        return cfg
    if isinstance(hsd, bool) or not isinstance(hsd, (int, float)) or not hsd > 0:
        raise CheckpointError(f"config.json has head_size_divisor {hsd!r}; expected a positive number")
    return dataclasses.replace(cfg, group_norm_eps=1e-5 * float(hsd) ** 2)


# --------------------------------------------------------------------- load
_PROGRESS_BYTES = 256 * 2**20  # with progress=True, files above this size show a bar while loading


def load(
    path: "str | os.PathLike",
    *,
    dtype: "str | torch.dtype | None" = None,
    device: "str | torch.device | None" = None,
    rescale_every: "int | None" = None,
    ln0_fold_dtype: "str | None" = _UNSET,
    progress: bool = False,
    quantize: "str | None" = None,
    huge_pages: bool = False,
    filename: "str | None" = None,
    revision: "str | None" = None,
):
    """Load a checkpoint of any supported format and generation; returns the
    generation's model (:class:`rwkvkit.RWKV` for RWKV-4,
    :class:`rwkvkit.RWKV7` for RWKV-7) in eval mode, with the fastest
    one-token step this machine has attached (:func:`rwkvkit.runtime.accelerate`).

    ``quantize="int8"`` stores the matrices as int8 with per-row scales
    (:func:`rwkvkit.runtime.quantize_int8`) for fast CPU inference.
    ``huge_pages=True`` backs the weights with 2 MiB pages on the first
    decoded token (Linux 6.1+; see :mod:`rwkvkit.runtime`).

    ``dtype`` casts every weight.  By default the weights keep the file's
    float dtype (the one most values have; rwkv.cpp files load as float32),
    and the generation's decay parameters stored in float32 stay float32.  ``rescale_every`` (RWKV-4 only)
    and ``ln0_fold_dtype`` set numerical conventions (see :class:`~rwkvkit.RWKV4Config`);
    unset, an rwkvkit folder keeps the values it was saved with and every other
    format gets 0 and None (HF's ``rescale_every`` is not taken from its
    config.json: it changes logits only through the LayerNorm eps, and 0 is
    the exact model).  Raises :class:`~rwkvkit.errors.CheckpointError` (or a
    subclass) with one line naming the problem.

    A ``path`` that does not exist but reads as a Hugging Face hub id
    (``RWKV/rwkv-4-169m-pile``; ``filename`` picks one file of a repository of
    many, ``revision`` a branch, tag or commit) is fetched once into the hub's
    cache and loaded from there (:mod:`rwkvkit.hub`; needs ``rwkvkit[hub]``).
    A local path always wins.
    """
    try:  # argument errors first, before reading a large file
        target = dtype_from_name(dtype) if dtype is not None else None
        if ln0_fold_dtype not in (_UNSET, None):
            dtype_from_name(ln0_fold_dtype)
        if rescale_every is not None and (not isinstance(rescale_every, int) or rescale_every < 0):
            raise ValueError(f"rescale_every must be an integer >= 0, got {rescale_every!r}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    except ValueError as exc:
        raise RwkvkitError(str(exc)) from None
    from . import hub

    path = hub.resolve(path, filename, revision)
    ck = read(path, progress=progress)
    cfg = infer_config(ck)
    spec = models.spec(cfg.generation)
    has_fold = hasattr(cfg, "ln0_fold_dtype")
    fold = (cfg.ln0_fold_dtype if has_fold else None) if ln0_fold_dtype is _UNSET else ln0_fold_dtype
    if rescale_every is not None:
        if not hasattr(cfg, "rescale_every"):
            raise RwkvkitError(f"rescale_every applies to RWKV-4 only; '{path}' is RWKV-{cfg.generation}")
        cfg.rescale_every = rescale_every
    if has_fold:
        cfg.ln0_fold_dtype = None  # folded below, once the weights are in
    keep_fp32 = target is None
    if target is None:
        target = ck.default_dtype
    sd = {}
    # Reading a memory-mapped file happens here, tensor by tensor: a bar for big files.
    total = sum(v.numel() * v.element_size() for v in ck.tensors.values())
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(path).name}", leave=False,
               disable=not progress or total < _PROGRESS_BYTES)
    for k, v in ck.tensors.items():
        # Without an explicit dtype, decays and bonuses stored in fp32 stay fp32
        # (the WKV operator runs in fp32 anyway): casting them would change
        # what the file says for nothing.
        if keep_fp32 and v.dtype == torch.float32 and k.endswith(spec.FP32_PARAMS):
            sd[k] = v.contiguous()
        else:
            sd[k] = v.to(target).contiguous()
        bar.update(v.numel() * v.element_size())
    bar.close()
    # Built on the meta device and filled by assignment: no second copy of the
    # weights, and memory-mapped tensors stay mapped until first written.
    with torch.device("meta"):
        model = models.build(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        model.to(_device(device))
    model.eval()
    if fold is not None:
        model.fold_ln0(fold)
    from . import runtime

    if quantize == "int8":
        runtime.quantize_int8(model)
    runtime.accelerate(model, huge_pages=huge_pages)
    return model


def load_user_model(path: "str | os.PathLike | None", **kw):
    """:func:`load` for a path a person typed (a ``--model`` flag, lm-eval's ``path=``).

    Takes the keywords of :func:`load` and turns every input problem,
    including a bad dtype or device name, into one-line
    :class:`~rwkvkit.errors.RwkvkitError`; shows a progress bar while reading
    large checkpoints.
    """
    if path is None or str(path) == "":
        raise CheckpointError("no model given: pass --model PATH")
    dtype = kw.pop("dtype", None)
    if dtype is not None:
        try:
            dtype = dtype_from_name(dtype)
        except ValueError as exc:
            raise RwkvkitError(str(exc)) from None
    device = kw.pop("device", None)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise RwkvkitError(f"invalid --device {device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RwkvkitError(f"--device {device} asked for, but no CUDA GPU is available")
    kw.setdefault("progress", True)
    return load(path, dtype=dtype, device=device, **kw)


def _device(device: "str | torch.device") -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"invalid device {device!r}: {_first_line(exc)}") from None


# ---------------------------------------------------------------------- info
def inspect(path: "str | os.PathLike") -> dict[str, Any]:
    """What ``rwkvkit info`` prints: format, generation, sizes, dtypes, bytes.

    Reads shapes only (no dequantisation, no model).
    """
    ck = read(path, meta=True)
    label, evidence = detect_generation(ck.tensors, ck.non_tensors)
    info: dict[str, Any] = {"path": str(ck.path), "format": ck.format}
    if ck.format == "rwkvcpp":
        info["format_version"] = ck.details["version"]
        info["quantization"] = ck.details["main_type"]
        info["tensor_types"] = dict(sorted(ck.stored.items()))
    supported = label in models.REGISTRY
    info["generation"] = models.NICKNAMES[label] if supported else label
    if evidence:
        info["generation_evidence"] = evidence
    if supported:
        cfg = infer_config(ck)
        info.update(layers=cfg.n_layer, n_embd=cfg.n_embd, vocab=cfg.vocab_size)
        numerics = set(getattr(cfg, "NUMERICS", ()))
        for f in dataclasses.fields(cfg):
            if f.name not in ("n_layer", "n_embd", "vocab_size") and (f.name not in numerics or ck.format == "rwkvkit"):
                info[f.name] = getattr(cfg, f.name)
        info["parameters"] = sum(t.numel() for t in ck.tensors.values())
        info["state_bytes_per_sequence"] = cfg.state_bytes_per_sequence
    else:
        emb = ck.tensors.get("emb.weight")
        blocks = {int(m.group(1)) for k in ck.tensors for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
        if blocks:
            info["layers"] = max(blocks) + 1
        if emb is not None and emb.dim() == 2:
            info["vocab"], info["n_embd"] = int(emb.shape[0]), int(emb.shape[1])
        info["parameters"] = sum(t.numel() for t in ck.tensors.values())
        info["supported"] = False
    info["dtypes"] = dict(sorted(ck.stored.items()))
    info["file_bytes"] = ck.file_bytes
    return info


# --------------------------------------------------------------------- write
def _official_state_dict(model) -> dict[str, torch.Tensor]:
    from .runtime.quant import is_quantized

    if is_quantized(model):
        raise CheckpointError(
            "this model's weights are quantized to int8 (an inference-only form); "
            "save the model before quantize_int8, or load it again without quantize="
        )
    sd = model.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _check_folder_target(folder: Path) -> None:
    """A folder output replaces ``folder`` whole: only ever replace a model folder."""
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"'{folder}' exists and is a file; the output is a folder")
        if any(folder.iterdir()) and not (folder / CONFIG).is_file():
            raise CheckpointError(f"'{folder}' exists and is not a model folder (no {CONFIG}); refusing to replace it")


def _check_file_target(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder; the output is a file")


def save(model, folder: "str | os.PathLike") -> Path:
    """Write ``model`` as an rwkvkit folder (config.json + model.safetensors), atomically.

    An existing ``folder`` is replaced only if it is empty or holds a model
    (a config.json); the old one stays in place until the new one is complete.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    _check_folder_target(folder)
    sd = _official_state_dict(model)
    config = {"format": FORMAT_MARKER, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    with atomic_dir(folder) as tmp:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A transformers ``RwkvConfig`` (RWKV-4), the RWKV org's ``Rwkv5Config`` /
    ``Rwkv6Config`` (RWKV-5.2, RWKV-6) or fla's ``RWKV7Config`` (RWKV-7), as
    config.json, for ``config``."""
    if config.generation == "7":
        return _hf_config7(config, dtype)
    if config.generation in ("5.2", "6"):
        return _hf_config56(config, dtype)
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.dim_att,
        "intermediate_size": config.dim_ffn,
        "layer_norm_epsilon": config.layer_norm_eps,
        "context_length": 1024,
        "rescale_every": config.rescale_every,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": dtype_name(dtype),
    }


def _hf_config56(config, dtype: torch.dtype) -> dict[str, Any]:
    """The fields the RWKV org's remote-code ``Rwkv5Config`` / ``Rwkv6Config``
    read (RWKV/rwkv-5-world, RWKV/rwkv-6-world configuration and modeling files).

    ``head_size_divisor`` encodes the GroupNorm eps (eps = 1e-5 * divisor**2,
    8 for the official 64e-5).  Rwkv5ForCausalLM uses ``num_attention_heads``
    as the head size (hidden_size // num_attention_heads heads), so it is
    written as such.  Rwkv6ForCausalLM fixes the LoRA ranks from hidden_size
    (32/64, or 64/128 at 4096); the actual ranks are written as
    ``time_mix_extra_dim`` / ``time_decay_extra_dim`` for readers that take them.
    ``rescale_every`` 6 is what the RWKV org's configs say: transformers
    divides the weights at load time in fp16/bf16, the file is unscaled.
    """
    C, N = config.n_embd, config.head_size
    divisor = (config.group_norm_eps / 1e-5) ** 0.5
    if abs(divisor - round(divisor)) < 1e-9:
        divisor = int(round(divisor))
    out = {
        "architectures": ["Rwkv6ForCausalLM" if config.generation == "6" else "Rwkv5ForCausalLM"],
        "model_type": "rwkv6" if config.generation == "6" else "rwkv5",
        "vocab_size": config.vocab_size,
        "hidden_size": C,
        "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.dim_att,
        "head_size": N,
        "head_size_divisor": divisor,
        "intermediate_size": config.dim_ffn,
        "layer_norm_epsilon": config.layer_norm_eps,
        "context_length": 4096,
        "rescale_every": 6,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
    }
    if config.generation == "6":
        out["time_mix_extra_dim"] = config.d_mix
        out["time_decay_extra_dim"] = config.d_decay
    else:
        out["num_attention_heads"] = N
    return out


def _hf_config7(config, dtype: torch.dtype) -> dict[str, Any]:
    """fla's ``RWKV7Config`` fields (fla/models/rwkv7/configuration_rwkv7.py).

    fla's GroupNorm eps is ``head_dim * norm_eps`` (64e-5 for head_dim 64),
    rwkvkit's is ``group_norm_eps``; they agree for head size 64.
    """
    C, L, F_ = config.n_embd, config.n_layer, config.dim_ffn
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": config.vocab_size,
        "hidden_size": C,
        "num_hidden_layers": L,
        "head_dim": config.head_size,
        "num_heads": config.n_head,
        "decay_low_rank_dim": config.d_decay,
        "a_low_rank_dim": config.d_aaa,
        "v_low_rank_dim": config.d_mv,
        "gate_low_rank_dim": config.d_gate,
        "intermediate_size": F_,
        "hidden_ratio": F_ // C if F_ % C == 0 else F_ / C,
        "hidden_act": "sqrelu",
        "value_dim": [C] * L,
        "norm_eps": config.layer_norm_eps,
        "norm_bias": True,
        "norm_first": True,
        "fuse_norm": False,
        "attn_mode": "chunk",
        "attn": None,
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype),
    }


def save_hf(model, folder: "str | os.PathLike") -> Path:
    """Write a Hugging Face folder, atomically: transformers' ``RwkvForCausalLM``
    for RWKV-4, the RWKV org's remote-code ``Rwkv5ForCausalLM`` (RWKV-5.2) and
    ``Rwkv6ForCausalLM`` (RWKV-6), fla's ``RWKV7ForCausalLM`` for RWKV-7.
    No remote code is written: transformers needs ``trust_remote_code`` and
    the RWKV org's modeling files to run a v5/v6 folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    _check_folder_target(folder)
    sd = state_dict_to_hf(_official_state_dict(model), model.config.generation)
    with atomic_dir(folder) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = hf_config(model.config, model.dtype)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def save_pth(model, path: "str | os.PathLike") -> Path:
    """Write an official-format .pth (BlinkDL key names and shapes), atomically."""
    path = Path(path)
    _check_file_target(path)
    sd = _official_state_dict(model)
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path


def save_safetensors(model, path: "str | os.PathLike") -> Path:
    """Write one ``.safetensors`` file with the official key names and shapes, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_file_target(path)
    sd = _official_state_dict(model)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return path


def save_rwkvcpp(model, path: "str | os.PathLike", type_name: str = "FP32") -> Path:
    """Write an rwkv.cpp file as its converter (FP32, FP16) or its quantizer
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) would, atomically."""
    path = Path(path)
    _check_file_target(path)
    sd = _official_state_dict(model)
    with atomic_path(path) as tmp:
        rwkvcpp.write_state_dict(tmp, sd, model.config.n_layer, type_name, generation=model.config.generation)
    return path


def convert(
    src: "str | os.PathLike",
    dst: "str | os.PathLike",
    to: str,
    dtype: "str | torch.dtype | None" = None,
    rwkvcpp_type: "str | None" = None,
    progress: bool = False,
) -> Path:
    """Read ``src`` (any format), write ``dst`` in format ``to``, atomically.

    Weights are copied unchanged unless ``dtype`` casts them.  For ``rwkvcpp``,
    ``rwkvcpp_type`` picks the tensor type (FP32, FP16, Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0); by default FP16 when the weights are float16, else FP32.
    """
    if to not in TARGETS:
        raise CheckpointError(f"unknown output format {to!r}; expected one of {', '.join(TARGETS)}")
    if rwkvcpp_type is not None:
        if to != "rwkvcpp":
            raise CheckpointError(f"an rwkv.cpp tensor type ({rwkvcpp_type}) applies only to --to rwkvcpp, not --to {to}")
        if rwkvcpp_type not in rwkvcpp.TYPE_CODES:
            raise CheckpointError(f"unknown rwkv.cpp type {rwkvcpp_type!r}; expected one of {', '.join(rwkvcpp.TYPE_CODES)}")
    dst = Path(dst)
    # Check the destination before the (possibly long) read.
    _check_folder_target(dst) if to in ("rwkvkit", "hf") else _check_file_target(dst)
    model = load(src, dtype=dtype, progress=progress)
    if to == "rwkvkit":
        return save(model, dst)
    if to == "hf":
        return save_hf(model, dst)
    if to == "pth":
        return save_pth(model, dst)
    if to == "safetensors":
        return save_safetensors(model, dst)
    if rwkvcpp_type is None:
        rwkvcpp_type = "FP16" if model.dtype == torch.float16 else "FP32"
    return save_rwkvcpp(model, dst, rwkvcpp_type)
