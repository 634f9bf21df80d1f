"""``rwkvkit generate`` and ``rwkvkit chat``: text from a model, on the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RwkvkitError

# Loading files larger than this prints a note (and rwkv.cpp files a progress bar).
BIG_MODEL_BYTES = 200 * 1024 * 1024


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and tokenizer")
    g.add_argument(
        "--model",
        "-m",
        metavar="PATH",
        default=None,
        help="checkpoint: .pth, .safetensors, rwkv.cpp .bin, HF or rwkvkit folder "
        "(default: the small Tiny Shakespeare model shipped with rwkvkit)",
    )
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast the weights (default: the file's dtype; float32 for the shipped model)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    g.add_argument(
        "--tokenizer",
        "-t",
        metavar="NAME|PATH",
        default=None,
        help="bytes, world, 20B, or a tokenizer file (.json for `tokenizers`, .txt World vocabulary); "
        "default: a tokenizer file in the model's folder, else the one its vocabulary size implies "
        "(256 bytes, 50277/50304 20B, 65536 world)",
    )
    g.add_argument(
        "--download-tokenizer",
        action="store_true",
        help="if the 20B tokenizer file is not found locally, fetch it once from the Hugging Face hub (needs huggingface_hub and a network) and cache it",
    )


def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens, metavar="N", help=f"most tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy and deterministic; higher = more varied (default 1.0)")
    g.add_argument("--top-p", type=float, default=0.85, metavar="P", help="keep the most likely tokens whose probabilities add up to P; 1 = off (default 0.85, as the rwkv package)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep only the K most likely tokens; 0 = off (default)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P", help="keep tokens at least P times as likely as the best one; 0 = off (default)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X", help="subtract X from the logit of every token already generated (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X", help="subtract X per (decayed) earlier occurrence of a token (default 0)")
    g.add_argument("--penalty-decay", type=float, default=0.996, metavar="D", help="occurrence counts are multiplied by D at every step (default 0.996, as the rwkv package)")
    g.add_argument("--ban", type=int, action="append", default=[], metavar="ID", help="never generate token ID (repeatable)")
    g.add_argument("--stop-token", type=int, action="append", default=None, metavar="ID", help="stop when token ID is generated, without printing it (repeatable; default: the tokenizer's end-of-text token)")
    g.add_argument("--seed", type=int, default=None, help="seed of the random draws, for reproducible output (default: random)")
    g.add_argument("--rwkv-top-p-quirk", action="store_true", help="reproduce the rwkv package's top_p = 1.0 -> greedy behaviour")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue a prompt with a model and print the text as it is generated. "
        "Without --model the small Tiny Shakespeare model shipped with rwkvkit is used.",
        epilog='example: rwkvkit generate --prompt "ROMEO:" --max-tokens 300 --temperature 0.8 --seed 1',
    )
    _add_model_flags(p)
    g = p.add_argument_group("prompt and output")
    g.add_argument("--prompt", "-p", default=None, help="the text to continue (default: read all of stdin)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT appears; it is not printed (repeatable)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    g.add_argument("--state-in", metavar="FILE", default=None, help="start from a state saved by --state-out or chat's /save instead of an empty context")
    g.add_argument("--state-out", metavar="FILE", default=None, help="save the state after the prompt and the generated text (safetensors)")
    _add_sampling_flags(p, max_tokens=200)
    p.set_defaults(func=run_generate)

    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (the state is kept between turns)",
        description="A terminal chat. Each turn is sent as '<user>: <message>' followed by a blank line and "
        "'<bot>:'; the reply ends at a blank line. World-vocabulary models (RWKV-5/6/7 World and G1, vocabulary "
        "65536) get their own format by default: 'System: ...' before the conversation, messages stripped with "
        "blank lines collapsed; other models read --system as it is. The model's state is kept between turns, so the whole "
        "conversation is remembered without being re-read. Commands: /reset, /save FILE, /load FILE, /help, /quit. "
        "Works with piped stdin (one message or command per line).",
        epilog="example: rwkvkit chat --user ROMEO --bot JULIET --temperature 0.8",
    )
    _add_model_flags(p)
    g = p.add_argument_group("conversation")
    g.add_argument("--user", default="User", help="the user's name in the transcript (default User)")
    g.add_argument("--bot", default="Assistant", help="the model's name in the transcript (default Assistant)")
    g.add_argument("--system", default=None, metavar="TEXT", help="text read once before the conversation (kept by /reset); as 'System: TEXT' in the world format")
    g.add_argument(
        "--chat-format",
        default="auto",
        choices=["auto", "world", "plain"],
        help="world: the RWKV World/G1 format (spec: 'User: ...\\n\\nAssistant:', 'System: ...', blank lines in messages collapsed); "
        "plain: '<user>: <message>\\n\\n<bot>:' as typed, --system read as it is; auto (default): world for models "
        "with the World vocabulary (65536), plain otherwise",
    )
    g.add_argument("--think", action="store_true", help="G1 reasoning models: open a ' <think' block after the bot's name")
    _add_sampling_flags(p, max_tokens=300)
    p.set_defaults(func=run_chat)


# ----------------------------------------------------------------- helpers
def _load(args, huge_pages: bool = False):
    """(model, tokenizer) for the flags; the tokenizer is checked against the model."""
    from ..generate import SHIPPED_MODEL
    from ..tokenizer import tokenizer_for_model
    from .common import load_model_arg, one_thread_for_small_models

    path = args.model
    dtype = args.dtype
    if path is None:
        path = SHIPPED_MODEL
        if not (Path(path) / "model.safetensors").is_file():
            raise RwkvkitError(f"the shipped model is missing from {path} (a broken installation?): pass --model PATH")
        dtype = dtype or "float32"  # stored in fp16 to keep the package small
    p = Path(path)
    big = False
    if p.exists():
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        if size > BIG_MODEL_BYTES:
            big = True
            print(f"loading {p} ({size / 2**30:.2f} GiB)...", file=sys.stderr, flush=True)
    model = load_model_arg(path, dtype=dtype, device=args.device, huge_pages=huge_pages)
    if big:  # which weights and kernels decode (rwkvkit.runtime.decode_kernel)
        print(f"decoding with the {getattr(model, 'decode_kernel', 'PyTorch step')}", file=sys.stderr, flush=True)
    one_thread_for_small_models(model)
    tok = tokenizer_for_model(model, path, args.tokenizer, download=args.download_tokenizer)
    return model, tok


def _options(args, stop=()) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay,
        banned_tokens=tuple(args.ban),
        stop_tokens=tuple(args.stop_token) if args.stop_token is not None else None,
        seed=args.seed,
        rwkv_top_p_quirk=args.rwkv_top_p_quirk,
        stop=tuple(stop),
    )


def _load_state(path, model):
    """A saved state of any generation, checked against ``model`` (one clear
    line for a state of another generation or shape)."""
    from ..state import StateBase

    st = StateBase.load(path)
    model.check_state(st)
    if st.batch_size != 1:
        raise RwkvkitError(f"state file '{path}' holds {st.batch_size} sequences, expected 1")
    return st


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------- generate
def run_generate(args: argparse.Namespace) -> int:
    from ..generate import GenerationConfig, stream

    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise RwkvkitError("no prompt: pass --prompt TEXT or pipe the text on stdin")
        prompt = sys.stdin.read()
    if prompt == "":
        raise RwkvkitError("the prompt is empty: give at least one character")
    opts = _options(args, args.stop)
    GenerationConfig.from_kwargs(**opts).validate()  # flag errors before loading a model
    if args.state_out:
        _check_state_out(args.state_out)
    model, tok = _load(args)
    state = _load_state(args.state_in, model) if args.state_in else None
    pieces = stream(model, tok, prompt, state=state, want_state=bool(args.state_out), **opts)
    if args.echo:
        _write(prompt)
    for piece in pieces:
        _write(piece)
    _write("\n")
    if args.state_out:
        # The text is already out; a state that cannot be written is an error
        # of its own, after it, not a traceback that hides it.
        try:
            pieces.result.state.save(args.state_out)
        except OSError as exc:
            raise RwkvkitError(f"the text was generated but the state could not be saved to '{args.state_out}': {_os_reason(exc)}") from None
        print(f"state saved to {args.state_out}", file=sys.stderr)
    return 0


def _os_reason(exc: OSError) -> str:
    """An OSError as words (its errno text), without the temp file's name."""
    return exc.strerror or str(exc)


def _check_state_out(path: str) -> None:
    """Refuse a --state-out that can never be written before generating."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise RwkvkitError(f"--state-out '{path}' is a directory: give a file name such as {p / 'state.safetensors'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RwkvkitError(f"--state-out '{path}': '{parent}' is a file, not a folder")
            break


# -------------------------------------------------------------------- chat
CHAT_HELP = """commands:
  /reset       forget the conversation (keeps --system)
  /save FILE   save the conversation state to FILE
  /load FILE   continue from a state saved with /save
  /help        this text
  /quit        leave (also end of input)"""


def run_chat(args: argparse.Namespace) -> int:
    from ..generate import ChatFormat, GenerationConfig, chat_format_for, prefill, stream

    user, bot = args.user.strip(), args.bot.strip()
    if not user or not bot:
        raise RwkvkitError("--user and --bot must be non-empty names")
    opts = _options(args, stop=ChatFormat.stop)
    GenerationConfig.from_kwargs(**opts).validate()
    model, tok = _load(args)
    if args.chat_format == "auto":
        fmt = chat_format_for(model, tok, user=user, bot=bot, think=args.think)
    else:
        fmt = ChatFormat(user=user, bot=bot, style=args.chat_format, think=args.think)
    interactive = sys.stdin.isatty()
    base = prefill(model, tok, fmt.system_text(args.system)) if args.system and args.system.strip() else None
    state = base
    needs_break = False  # the last reply did not end with the blank line
    if interactive:
        print(f"chatting with {args.model or 'the shipped Tiny Shakespeare model'}; /help for commands", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            _write(f"{user}: ")
        line = sys.stdin.readline()
        if not line:
            break
        msg = line.rstrip("\n")
        if not msg.strip():
            continue
        if msg.startswith("/"):
            cmd, _, arg = msg.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/reset":
                state, needs_break = base, False
                print("(conversation reset)")
            elif cmd == "/save":
                if not arg:
                    print("usage: /save FILE")
                elif state is None:
                    print("(nothing to save yet)")
                else:
                    try:
                        state.save(arg)
                        print(f"(state saved to {arg})")
                    except (OSError, RwkvkitError) as exc:
                        # The conversation goes on; only the file was not written.
                        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
                        print(f"(cannot save to {arg}: {reason})")
            elif cmd == "/load":
                if not arg:
                    print("usage: /load FILE")
                else:
                    try:
                        state, needs_break = _load_state(arg, model), False
                        print(f"(state loaded from {arg})")
                    except (OSError, RwkvkitError) as exc:
                        print(f"(cannot load: {exc})")
            else:
                print(f"(unknown command {cmd}; /help lists them)")
            continue
        text = ("\n\n" if needs_break else "") + fmt.turn(msg)
        opts["seed"] = None if args.seed is None else args.seed + turn
        turn += 1
        pieces = stream(model, tok, text, state=state, want_state=True, **opts)
        _write(fmt.cue())
        for piece in pieces:
            _write(piece)
        _write("\n")
        state = pieces.result.state
        needs_break = pieces.result.finish_reason != "stop"
    return 0
