"""An OpenAI-compatible HTTP server with continuous batching and a prefix state cache.

    from rwkvkit.serve import Engine, EngineConfig, create_app, run
    engine = Engine(model, tokenizer, EngineConfig(max_batch=64))
    run(create_app(engine, "my-model"), host="127.0.0.1", port=8000)

- :mod:`.engine`: the scheduler thread (batched RNN steps for every active
  sequence, prefill with the parallel form, limits);
- :mod:`.cache`: the prefix state cache (bounded bytes, LRU);
- :mod:`.app`: the FastAPI endpoints and the chat format.

FastAPI and uvicorn are an optional extra: ``pip install 'rwkvkit[serve]'``.
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import RwkvkitError
from .app import ChatTemplate, create_app
from .cache import PrefixCache
from .engine import Engine, EngineConfig, GenRequest, QueueFull


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """(uvicorn.Server, bound socket) for ``app``; port 0 picks a free port
    (read it from ``sock.getsockname()[1]``).  Run with ``server.run(sockets=[sock])``."""
    try:
        import uvicorn
    except ImportError:
        raise RwkvkitError("serving needs uvicorn: pip install 'rwkvkit[serve]' (or pip install fastapi uvicorn)") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RwkvkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5)
    return uvicorn.Server(config), sock


__all__ = [
    "ChatTemplate",
    "Engine",
    "EngineConfig",
    "GenRequest",
    "PrefixCache",
    "QueueFull",
    "create_app",
    "make_server",
    "is_loopback",
]
