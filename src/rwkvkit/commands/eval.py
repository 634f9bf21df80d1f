"""``rwkvkit eval`` (perplexity, LAMBADA) and ``rwkvkit bench`` (RWKV against a
Transformer: time per token, memory, prompt speed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RwkvkitError
from .common import add_model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity / bits per byte of a file, or LAMBADA accuracy and perplexity",
        description="Evaluate a model. --task ppl: perplexity and bits per byte of a text file or a token "
        "file from `rwkvkit prepare`, read in windows with the RNN state carried (constant memory, any length). "
        "--task lambada: last-word accuracy and target perplexity with the protocol of the RWKV papers' script "
        "(context after a prefix token: 0 for World-vocabulary models as in the RWKV-7 script, else the newline; the target is a space and the last word). For the "
        "lm-evaluation-harness tasks run `python -m rwkvkit.lm_eval_adapter --model rwkvkit --model_args path=MODEL "
        "--tasks TASKS` (pip install \"rwkvkit[eval]\"; docs/eval.md).",
        epilog="examples: rwkvkit eval -m model.pth --task ppl --data book.txt --json out.json\n"
        "          rwkvkit eval -m RWKV-4-Pile-169M.pth --task lambada --data lambada_test.jsonl --tokenizer 20B",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--task", required=True, choices=["ppl", "lambada"], help="what to measure")
    p.add_argument("--data", metavar="FILE", default=None, help="ppl: a text file, or a prepared token folder / its .bin split / a binidx pair; lambada: a jsonl of {\"text\": ...} (default: lambada_test.jsonl in ., data/ or ../shared/data/)")
    p.add_argument("--tokenizer", "-t", metavar="NAME|PATH", default=None, help="bytes, world, 20B or a tokenizer file (default: a file in the model's folder, a token file's own, else the one the vocabulary size implies)")
    p.add_argument("--window", type=int, default=1024, metavar="N", help="ppl: tokens per model call; the state is carried between windows, so it changes speed and memory (about N x vocabulary x 8 bytes), not the result (default 1024)")
    p.add_argument("--split", default="val", help="ppl on a prepared token folder: the split to read (default val)")
    p.add_argument("--bos", type=int, default=None, metavar="ID", help="ppl: feed this start token first so the file's first token is scored too (default: score from the second token)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="ppl: the first N tokens only; lambada: the first N passages only")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="lambada: passages per model call (default 16)")
    p.add_argument("--pad-token", type=int, default=None, metavar="ID", help="lambada: the token read before each context (default: 0, end-of-text, for the World vocabulary as in the RWKV-7 script; else the tokenizer's newline, 187 for 20B)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON to FILE ('-' for stdout instead of the summary line)")
    p.add_argument("--per-sample", action="store_true", help="lambada: include every passage's log-probability and correctness in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)

    from ..eval.bench import GENERATIONS, SHAPES

    p = sub.add_parser(
        "bench",
        help="RWKV against a same-size GPT-2: time and memory per generated token, prompt speed, plots",
        description="Generate N tokens with an RWKV model and with a GPT-2 (transformers, random weights, fp32, "
        "KV cache) of the same width, depth and vocabulary, timing every token and sampling the process "
        "memory (each model runs in its own process); also time prompts of growing length. Prints a table "
        "(per-token times are medians over windows of tokens), writes bench.json and draws the cumulative-time, "
        "per-token-time, memory and prompt plots as PNGs (needs matplotlib).",
        epilog="examples: rwkvkit bench --shape 169m --tokens 4096 --out bench-169m\n"
        "          rwkvkit bench --generation 7 --shape 0.1b --tokens 1024 --out bench-v7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--generation", default="4", choices=sorted(GENERATIONS), help="RWKV generation of the random model: 4 or 7 (default 4; a --model file says its own)")
    g.add_argument("--shape", default=None, choices=sorted(SHAPES), help="shape with random weights: RWKV-4 Pile (169m ... 7b), RWKV-7 World (0.1b ... 2.9b, vocab 65536) or tiny "
                   "(default: 169m for --generation 4, 12 layers, 768 wide, 50277 ids; 0.1b for 7, 12 x 768, 65536 ids)")
    g.add_argument("--model", "-m", metavar="PATH", default=None, help="benchmark this checkpoint instead (fp32); the GPT-2 takes its shape")
    g.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    g.add_argument("--width", type=int, default=None, help="override the shape's width (a multiple of 64 for GPT-2's heads)")
    g.add_argument("--vocab", type=int, default=None, help="override the shape's vocabulary")
    g.add_argument("--skip-transformer", action="store_true", help="RWKV only")
    g = p.add_argument_group("measurement")
    g.add_argument("--tokens", "-n", type=int, default=4096, metavar="N", help="tokens to generate (default 4096)")
    g.add_argument("--prompt-lengths", default="16,64,256,1024,4096", metavar="L,L,...", help="prompt lengths to time (default 16,64,256,1024,4096; empty for none)")
    g.add_argument("--threads", type=int, default=None, help="torch threads in each model's process (default: torch's choice)")
    g.add_argument("--median-window", type=int, default=64, metavar="W", help="per-token times in the table are medians over the W tokens ending at each row (default 64)")
    g.add_argument("--in-process", action="store_true", help="run both models in this process (faster to start; memory figures then include both)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", metavar="DIR", default="bench", help="folder for bench.json and the PNGs (default ./bench)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_bench)


def _print_json(obj, dest: str | None) -> None:
    if dest is None:
        return
    text = json.dumps(obj, indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return
    from ..io_utils import atomic_path

    with atomic_path(Path(dest)) as tmp:
        tmp.write_text(text)
    print(f"wrote {dest}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    from ..tokenizer import tokenizer_for_model
    from .common import load_model_arg, one_thread_for_small_models

    if args.window < 1:
        raise RwkvkitError(f"--window must be at least 1, got {args.window}")
    if args.batch_size < 1:
        raise RwkvkitError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise RwkvkitError(f"--limit must be at least 1, got {args.limit}")
    if args.task == "ppl" and args.data is None:
        raise RwkvkitError("--task ppl needs --data FILE (a text file or a prepared token folder)")
    if args.data is not None and not Path(args.data).exists():
        raise RwkvkitError(f"--data '{args.data}' does not exist")
    model = load_model_arg(args.model, dtype=args.dtype, device=args.device)
    one_thread_for_small_models(model)
    progress = not args.no_progress
    if args.task == "ppl":
        from ..eval.perplexity import is_token_file, perplexity

        tok = args.tokenizer
        if tok is not None or not is_token_file(args.data):
            tok = tokenizer_for_model(model, args.model, args.tokenizer)
        res = perplexity(model, args.data, tok, window=args.window, split=args.split, bos=args.bos, limit_tokens=args.limit, progress=progress)
        out = res.to_dict()
    else:
        from ..eval.lambada import find_lambada, lambada, read_lambada

        path = Path(args.data) if args.data is not None else find_lambada()
        tok = tokenizer_for_model(model, args.model, args.tokenizer)
        texts = read_lambada(path, limit=args.limit)
        res = lambada(model, tok, texts, pad_id=args.pad_token, batch_size=args.batch_size, progress=progress, data=str(path))
        out = res.to_dict(per_sample=args.per_sample)
    out["model"] = str(args.model)
    if args.json != "-":
        print(res.summary())
    _print_json(out, args.json)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from ..eval.bench import BenchOptions, run

    try:
        lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
    except ValueError:
        raise RwkvkitError(f"--prompt-lengths must be comma-separated integers, got {args.prompt_lengths!r}") from None
    opts = BenchOptions(
        shape=args.shape,
        generation=args.generation,
        model=args.model,
        layers=args.layers,
        width=args.width,
        vocab=args.vocab,
        transformer=not args.skip_transformer,
        tokens=args.tokens,
        prompt_lengths=lengths,
        threads=args.threads,
        median_window=args.median_window,
        isolate=not args.in_process,
        seed=args.seed,
        out=args.out,
        plots=not args.no_plots,
        progress=not args.no_progress,
    )
    run(opts)
    return 0
