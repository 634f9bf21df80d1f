"""``rwkvkit info`` and ``rwkvkit convert``: look at and re-write checkpoints."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint: format, generation, sizes, dtypes, state size",
        description="Describe a checkpoint of any supported format without building the model.",
    )
    p.add_argument("path", help="a .pth, .safetensors, rwkv.cpp .bin, or a Hugging Face / rwkvkit folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_info)

    p = sub.add_parser(
        "convert",
        help="re-write a checkpoint as rwkvkit, Hugging Face, official .pth / .safetensors or rwkv.cpp",
        description="Read SRC (any supported format) and write DST atomically in the format given by --to.",
    )
    p.add_argument("src", help="input checkpoint (any supported format)")
    p.add_argument("dst", help="output: a folder for rwkvkit/hf, a file for pth/safetensors/rwkvcpp")
    p.add_argument(
        "--to",
        required=True,
        choices=["rwkvkit", "hf", "pth", "safetensors", "rwkvcpp"],
        help="output format: rwkvkit folder; Hugging Face folder (RwkvForCausalLM for RWKV-4, fla's "
        "RWKV7ForCausalLM for RWKV-7); official .pth; one .safetensors file with the official names; rwkv.cpp .bin",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast the weights (default: unchanged)")
    p.add_argument(
        "--type",
        dest="rwkvcpp_type",
        default=None,
        choices=["FP32", "FP16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"],
        help="rwkv.cpp tensor type, only with --to rwkvcpp (default: FP16 for float16 weights, else FP32); "
        "quantised types apply to the per-layer matrices (not RWKV-7's LoRAs), as rwkv.cpp's quantizer does",
    )
    p.set_defaults(func=run_convert)


# Config fields that are LoRA ranks (RWKV-6: d_mix, d_decay; RWKV-7: d_decay, d_aaa, d_mv, d_gate) and their labels.
_LORA_RANKS = (("d_mix", "mix"), ("d_decay", "decay"), ("d_aaa", "a"), ("d_mv", "v"), ("d_gate", "gate"))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def _add_decode(info: dict) -> None:
    """info["decode"]: which weights and one-token kernels ``rwkvkit.load`` (default dtype) would use here."""
    if info.get("supported") is False:
        return
    import torch

    from ..models import NICKNAMES
    from ..runtime.infer_cpu import describe_checkpoint

    gen = next((g for g, nick in NICKNAMES.items() if nick == info["generation"]), None)
    if gen is None:
        return
    counts: dict[str, int] = {}
    for name, n in info["dtypes"].items():
        counts[name] = counts.get(name, 0) + n
    dtype = torch.float32
    if info["format"] != "rwkvcpp":  # rwkv.cpp files load as float32
        best = max(counts, key=counts.get) if counts else "float32"
        dtype = getattr(torch, best, torch.float32)
    info["decode"] = f"on this CPU with the file's dtype: {describe_checkpoint(gen.split('.')[0], dtype)}"


def run_info(args: argparse.Namespace) -> int:
    from ..checkpoint import inspect
    from ..models import NICKNAMES, REGISTRY

    info = inspect(args.path)
    _add_decode(info)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fmt = info["format"]
    if fmt == "rwkvcpp":
        fmt = f"rwkv.cpp (file version {info['format_version']})"
    rows = [("path", info["path"]), ("format", fmt), ("generation", info["generation"])]
    if info.get("supported") is False:
        runs = ", ".join(NICKNAMES[g] for g in sorted(REGISTRY) if "." not in g)  # 5.1/5.2 are RWKV-5
        rows.append(("supported", f"no: rwkvkit runs {runs} (found '{info['generation_evidence']}')"))
    for key in ("layers", "n_embd", "dim_att", "dim_ffn", "vocab"):
        if key in info:
            rows.append((key, str(info[key])))
    if "head_size" in info:
        width = info.get("dim_att", info["n_embd"])
        rows.append(("heads", f"{width // info['head_size']} x {info['head_size']} (head_size {info['head_size']})"))
    ranks = [(label, info[key]) for key, label in _LORA_RANKS if key in info]
    if ranks:
        rows.append(("LoRA ranks", ", ".join(f"{label} {value}" for label, value in ranks)))
    if "quantization" in info:
        rows.append(("quantization", info["quantization"]))
    rows.append(("dtypes", ", ".join(f"{k} ({v:,} values)" for k, v in info["dtypes"].items())))
    rows.append(("parameters", f"{info['parameters']:,}"))
    if "state_bytes_per_sequence" in info:
        rows.append(("state size", f"{info['state_bytes_per_sequence']:,} bytes per sequence"))
    for key in ("rescale_every", "ln0_fold_dtype"):
        if key in info:
            rows.append((key, str(info[key])))
    rows.append(("file size", f"{info['file_bytes']:,} bytes ({_human(info['file_bytes'])})"))
    if "decode" in info:
        rows.append(("decode", info["decode"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import convert

    out = convert(args.src, args.dst, args.to, dtype=args.dtype, rwkvcpp_type=args.rwkvcpp_type, progress=True)
    print(f"wrote {out} ({args.to})")
    return 0
