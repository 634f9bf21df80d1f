"""``rwkvkit prepare`` and ``rwkvkit train``.

Every ``train`` flag is generated from :class:`rwkvkit.train.config.TrainConfig`,
so the help text, the config file keys and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text files / folders / jsonl into a token file for training",
        description=(
            "Tokenize INPUTS (text files, folders of *.txt/*.md/*.jsonl, or .jsonl files with one "
            "document per line) into OUT: train.bin / val.bin (uint16 or uint32 token ids), "
            "*.docs.bin (document starts) and meta.json. The validation split is the last "
            "--val-fraction of the input by bytes. Streams: memory does not grow with the corpus."
        ),
    )
    p.add_argument("inputs", nargs="+", help="text files, folders, or .jsonl files")
    p.add_argument("--out", "-o", required=True, help="output folder (written atomically)")
    p.add_argument("--tokenizer", default="bytes", help="bytes (id = byte value), or a name/path rwkvkit.load_tokenizer accepts (20B, world); default: bytes")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the input, taken from its end (default: 0.1)")
    p.add_argument("--text-field", default="text", help="field of a .jsonl object holding the text (default: text)")
    p.add_argument(
        "--separator",
        default="auto",
        help="token id appended after each document: auto (the tokenizer's end-of-text id, none for bytes), none, or an integer",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)

    from ..train.config import TrainConfig

    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (paper recipe; resumable; torchrun for many processes)",
        description=(
            "Train an RWKV-4, 5 (5.2), 6 or 7 model from scratch (--generation 4|5|6|7; the RWKV-4 paper's recipe, "
            "or the x052/x060/x070 trainer's init and optimiser groups), or fine-tune a checkpoint of any (--init-from; "
            "--tune full|lora|state). Writes OUT/checkpoints/, OUT/model (an rwkvkit folder), "
            "OUT/metrics.jsonl and OUT/loss.png. An OUT holding a previous run is refused unless --resume (continue it "
            "with its saved options) or --overwrite (replace it). Ctrl-C saves a checkpoint and stops; --resume continues. "
            "Under `torchrun --nproc_per_node N -m rwkvkit train ...` it runs data-parallel (DDP; gloo on "
            "CPU, nccl on GPU). Options can also come from --config FILE (.json or .toml, keys as below "
            "with - or _); flags given on the command line win."
        ),
    )
    t.add_argument("--config", default=None, metavar="FILE", help="a .json or .toml file of options (a toml file may use a [train] table)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    titles = {"data": "data and output", "model": "model", "tuning": "fine-tuning", "batch": "windows and batches",
              "optim": "optimiser and schedule", "speed": "device and speed", "run": "run control"}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group", "run")
        if group not in groups:
            groups[group] = t.add_argument_group(titles.get(group, group))
        g = groups[group]
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata["help"].replace("%", "%%")
        default = f.default
        shown = repr(default) if isinstance(default, str) else default
        kw: dict = {"default": None, "dest": f.name}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(default)
            kw["metavar"] = f.metadata.get("metavar") or {"int": "N", "float": "X", "str": "S"}[type(default).__name__]
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
                kw.pop("metavar")
        g.add_argument(flag, help=f"{helptext} (default: {shown})", **kw)
    t.set_defaults(func=run_train)


def run_prepare(args: argparse.Namespace) -> int:
    from ..errors import RwkvkitError
    from ..train.data import prepare

    sep = args.separator
    if sep == "none":
        sep = None
    elif sep != "auto":
        try:
            sep = int(sep)
        except ValueError:
            raise RwkvkitError(f"--separator must be auto, none or an integer token id, got {sep!r}") from None
    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        separator=sep,
        progress=not args.no_progress,
    )
    sp = meta["splits"]
    print(
        f"wrote {args.out}: {sp['train']['tokens']:,} train tokens ({sp['train']['documents']:,} documents), "
        f"{sp['val']['tokens']:,} validation tokens ({sp['val']['documents']:,}), {meta['dtype']}, tokenizer {meta['tokenizer']}"
    )
    return 0


def config_from_args(args: argparse.Namespace, given: set[str] | None = None):
    """The TrainConfig of the command line over --config; ``given`` (a set)
    receives the names of the options the user set in either."""
    from ..train.config import TrainConfig, make_config, read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if given is not None:
        given.update(file_values)
        given.update(name for name, v in flags.items() if v is not None)
    return make_config(file_values, **flags)


def _continue_hint(out: str) -> str:
    import os

    torchrun = "torchrun ... -m " if "LOCAL_RANK" in os.environ else ""
    return f"continue with: {torchrun}rwkvkit train --out {out} --resume"


def run_train(args: argparse.Namespace) -> int:
    import sys

    from ..errors import RwkvkitError
    from ..train import rundir
    from ..train.loop import train

    given: set[str] = set()
    cfg = config_from_args(args, given)
    if cfg.resume:
        if cfg.overwrite:
            raise RwkvkitError("--resume continues the run in --out and --overwrite deletes it: give one of them")
        if not cfg.out:
            raise RwkvkitError("--resume needs --out, the folder of the run to continue")
        cfg = rundir.resume_config(cfg, given)
    try:
        summary = train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped without a new checkpoint
        print(f"rwkvkit train: interrupted; the last checkpoint in {cfg.out} is intact; {_continue_hint(cfg.out)}", file=sys.stderr)
        return 130
    rank = summary.pop("rank", 0)
    if rank == 0:
        print(json.dumps(summary))
        if summary.get("stop") in ("interrupted", "stopped"):
            print(f"rwkvkit train: {summary['stop']} at step {summary['steps']}, checkpoint saved; {_continue_hint(cfg.out)}",
                  file=sys.stderr)
    return 0
