"""The ``rwkvkit`` command line.  ``python -m rwkvkit`` is the same program.

Each verb lives in a module of :mod:`rwkvkit.commands` that defines
``register(subparsers)``; the parser it adds sets ``func`` to a function taking
the parsed arguments and returning an exit code.  Errors caused by input
(:class:`~rwkvkit.errors.RwkvkitError`) are printed as one line on stderr with
exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__
from .errors import RwkvkitError

# One module per group of verbs, in the order they appear in --help.
COMMAND_MODULES = [
    "rwkvkit.commands.checkpoint",  # info, convert
    "rwkvkit.commands.train",  # prepare, train
    "rwkvkit.commands.generate",  # generate, chat
    "rwkvkit.commands.serve",  # serve
    "rwkvkit.commands.eval",  # eval, bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkvkit",
        description="RWKV language models (RWKV-4 and RWKV-7): inspect, convert, run, train, serve and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RwkvkitError as exc:
        print(f"rwkvkit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rwkvkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
