"""``rwkvkit serve``: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import RwkvkitError


def register(sub: argparse._SubParsersAction) -> None:
    from .generate import _add_model_flags

    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with the OpenAI API (continuous batching, streaming)",
        description="Serve a model with the OpenAI endpoints GET /v1/models, POST /v1/completions and "
        "POST /v1/chat/completions (stream: true answers with server-sent events), plus GET /health and "
        "GET /metrics. Concurrent requests are decoded together in one batched RNN step; the states "
        "after prompt prefixes are cached for follow-up turns. Listens on 127.0.0.1 unless told otherwise. "
        "Needs the 'serve' extra: pip install 'rwkvkit[serve]'.",
        epilog="example: rwkvkit serve --model RWKV-4-Pile-169M.pth --port 8000 --api-key-env RWKVKIT_KEY",
    )
    _add_model_flags(p)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every request")
    g.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="read the API key from environment variable VAR (keeps it out of the process list)",
    )
    g.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a domain name clients may reach this server by (the Host header; repeatable; '*' allows any). "
        "IP addresses and localhost are always accepted; other names are refused, which stops DNS-rebinding attacks from web pages",
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example) whose pages may call this server from a browser (repeatable; default: none)",
    )
    g.add_argument("--served-model-name", default=None, metavar="NAME", help="the model id clients send (default: the model file or folder name)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level (default info)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-batch", type=int, default=64, metavar="N", help="sequences decoded together at most (default 64)")
    g.add_argument("--max-state-mb", type=float, default=None, metavar="MB", help="bound the running batch by its recurrent state memory in MiB: at most MB / (one sequence's state) sequences (an RWKV-7 0.1B state is 2.3 MiB, an RWKV-4 169M one 0.18 MiB; default: no bound)")
    g.add_argument("--max-queue", type=int, default=256, metavar="N", help="requests that may wait for a slot; more get HTTP 429 (default 256)")
    g.add_argument("--max-prompt-tokens", type=int, default=8192, metavar="N", help="longest prompt accepted (default 8192)")
    g.add_argument("--max-tokens-limit", type=int, default=4096, metavar="N", help="largest max_tokens a request may ask for (default 4096)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for the model (default: torch's choice); 1 is best on a busy machine")
    g.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="keep the weights on 4 KiB pages (default: 2 MiB pages on Linux 6.1+, ~8%% faster decoding after a one-off ~1 s per 600 MB)")
    g.add_argument("--cache-mb", type=float, default=256.0, metavar="MB", help="prefix state cache size in MiB; 0 disables it (default 256)")
    g = p.add_argument_group("chat format")
    g.add_argument("--chat-user", default="User", metavar="NAME", help="name of the user's turns (default User)")
    g.add_argument("--chat-assistant", default="Assistant", metavar="NAME", help="name of the model's turns (default Assistant)")
    g.add_argument("--chat-system", default="System", metavar="NAME", help="name of system messages (default System)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..serve import ChatTemplate, Engine, EngineConfig, create_app, is_loopback, make_server
    from ..serve.app import _require_fastapi
    from .generate import _load

    _require_fastapi()
    if not 0 <= args.port <= 65535:
        raise RwkvkitError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key
    if api_key is not None and not api_key.strip():
        raise RwkvkitError("--api-key is empty: give a non-empty key (or leave the flag out to serve without one)")
    if args.api_key_env:
        if api_key:
            raise RwkvkitError("give --api-key or --api-key-env, not both")
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise RwkvkitError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    for name in ("chat_user", "chat_assistant", "chat_system"):
        if not getattr(args, name).strip():
            raise RwkvkitError(f"--{name.replace('_', '-')} must be a non-empty name")
    config = EngineConfig(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        cache_bytes=int(args.cache_mb * 2**20),
        max_state_bytes=None if args.max_state_mb is None else int(args.max_state_mb * 2**20),
    )
    config.validate()
    if args.threads is not None:
        if args.threads < 1:
            raise RwkvkitError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    # A server decodes for a long time: the one-off cost of 2 MiB pages for the
    # weights (about 1 s per 600 MB) buys ~8% on every token (runtime.infer_cpu.use_huge_pages).
    model, tok = _load(args, huge_pages=args.huge_pages)
    name = args.served_model_name or (Path(args.model).name if args.model else "rwkvkit-shipped")
    template = ChatTemplate(user=args.chat_user.strip(), assistant=args.chat_assistant.strip(), system=args.chat_system.strip())
    allowed = list(args.allowed_host)
    if not is_loopback(args.host) and args.host not in ("0.0.0.0", "::"):
        allowed.append(args.host)  # the name it was started with
    app = create_app(Engine(model, tok, config), name, api_key=api_key, chat_template=template,
                     allowed_hosts=allowed, cors_origins=args.cors_origin)
    server, sock = make_server(app, args.host, args.port, args.log_level)
    host, port = sock.getsockname()[:2]
    if not is_loopback(args.host):
        warn = "" if api_key else " without an API key"
        print(f"warning: listening on {args.host}, reachable from other machines{warn}", file=sys.stderr)
    print(f"serving '{name}' on http://{host}:{port}/v1 (max batch {config.max_batch}); Ctrl-C stops", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
