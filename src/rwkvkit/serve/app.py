"""The HTTP side: OpenAI-compatible endpoints on FastAPI.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events in OpenAI's chunk format),
``GET /health`` and ``GET /metrics``.  Every error, including malformed JSON,
unknown fields and limits, is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` and a 4xx status (5xx only
for a failure of the server itself, without a traceback).
"""


import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..errors import RwkvkitError
from ..sampling import SamplingConfig
from .engine import Engine, EngineStopped, GenRequest, QueueFull

_log = logging.getLogger("rwkvkit.serve")

# How often a waiting non-streaming handler checks that its client is still there.
DISCONNECT_POLL_S = 0.25
# Bodies larger than this are refused while they are read (with or without a
# Content-Length), before they are parsed.
MAX_BODY_BYTES = 8 * 2**20
# JSON deeper than this is refused (no OpenAI request nests beyond a handful).
MAX_JSON_DEPTH = 64
# Seeds are torch generator seeds: 64-bit, negative ones as two's complement.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# What a 429 asks the client to wait, in seconds.
RETRY_AFTER_S = 1


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError:
        raise RwkvkitError(
            "serving needs FastAPI and uvicorn: pip install 'rwkvkit[serve]' (or pip install fastapi uvicorn)"
        ) from None


# ------------------------------------------------------------------ chat format
@dataclass
class ChatTemplate:
    """How chat messages become a prompt (the RWKV convention):

        System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}\\n\\nUser: ...\\n\\nAssistant:

    Message text is stripped and blank lines inside it become single newlines,
    so the separator only ever ends a turn; generation stops at the separator
    or at a new user line.
    """

    user: str = "User"
    assistant: str = "Assistant"
    system: str = "System"
    separator: str = "\n\n"

    def name(self, role: str) -> str:
        return {"user": self.user, "assistant": self.assistant, "system": self.system, "developer": self.system}[role]

    def clean(self, text: str) -> str:
        text = text.replace("\r\n", "\n").strip()
        return re.sub(r"\n{2,}", "\n", text) if self.separator == "\n\n" else text

    def segments(self, messages: list[tuple[str, str]]) -> list[str]:
        """The prompt as one string per message, then the assistant's cue."""
        segs = [f"{self.name(role)}: {self.clean(text)}{self.separator}" for role, text in messages]
        return segs + [f"{self.assistant}:"]

    def stops(self) -> tuple[str, ...]:
        return (self.separator, f"\n{self.user}:")


# ----------------------------------------------------------------- app factory
def _json_problem(data: Any) -> tuple[str, str | None] | None:
    """(message, field path) for parsed JSON that is too deep or holds a string
    that is not valid Unicode (a lone surrogate from a \\ud800 escape); None if fine.
    Iterative, so no depth can overflow the stack."""
    todo: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while todo:
        obj, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None
        where = ".".join(str(p) for p in path) or None
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                return f"{where or 'body'}: the text holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode", where
        elif isinstance(obj, dict):
            for key, value in obj.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return "a field name holds a lone surrogate, which is not valid Unicode", where
                todo.append((value, (*path, key), depth + 1))
        elif isinstance(obj, list):
            todo.extend((value, (*path, i), depth + 1) for i, value in enumerate(obj))
    return None


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Host header names this server.  IP literals and
    localhost are always fine (DNS rebinding needs a domain name that an
    attacker controls); other names only when listed (``*`` allows any)."""
    if not host_header:
        return True  # HTTP/1.0 without Host: not a browser
    if "*" in allowed:
        return True
    h = host_header.strip().lower()
    if h.startswith("["):  # [ipv6]:port
        name = h[1 : h.find("]")] if "]" in h else h
    else:
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    name = name.rstrip(".")
    if name == "localhost" or name in allowed:
        return True
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Guard:
    """Pure ASGI middleware in front of every route: the Host header (DNS
    rebinding), the API key, and the body size, counted while the body is
    read, so a chunked body without Content-Length is refused too.  The body
    is read here (at most MAX_BODY_BYTES) and handed on; after it, the
    application receives the client's own messages, so a disconnect is seen."""

    def __init__(self, app, *, api_key: str | None, allowed_hosts: tuple[str, ...], error_response):
        self.app, self.api_key, self.allowed_hosts, self.error_response = app, api_key, allowed_hosts, error_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        refuse = None
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            refuse = self.error_response(
                421, f"the Host header {headers.get('host')!r} does not name this server (start it with --allowed-host NAME to allow it)",
                "invalid_request_error", code="host_not_allowed")
        elif self.api_key is not None and scope["method"] != "OPTIONS":
            scheme, _, value = headers.get("authorization", "").partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value or not hmac.compare_digest(value.encode(), self.api_key.encode()):
                refuse = self.error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "authentication_error",
                                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if refuse is None:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                refuse = self._too_large()
        if refuse is not None:
            return await refuse(scope, receive, send)
        body = bytearray()
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    return await self._too_large()(scope, receive, send)
                if not message.get("more_body", False):
                    break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception:  # errors escaping the handlers: never a traceback to the client
            _log.exception("unexpected error while serving %s", scope.get("path"))
            if not started:
                await self.error_response(500, "internal server error", "server_error")(scope, receive, send)

    def _too_large(self):
        return self.error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, chat_template: ChatTemplate | None = None,
               allowed_hosts=(), cors_origins=()):
    """The FastAPI application serving ``engine`` under the name ``model_name``.

    The engine is started and stopped with the application (its lifespan).
    ``api_key``: required as ``Authorization: Bearer KEY`` (an empty key is an
    error).  ``allowed_hosts``: domain names the Host header may carry besides
    IP addresses and localhost (``*``: any).  ``cors_origins``: browser origins
    allowed to call the API (none by default).
    """
    _require_fastapi()
    if api_key is not None and not api_key.strip():
        raise RwkvkitError("the API key is empty: give a non-empty key, or none to serve without one")
    allowed_hosts = tuple(h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip())
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    template = chat_template or ChatTemplate()
    tok = engine.tok
    created = int(time.time())

    # ------------------------------------------------------------- schemas
    class Strict(BaseModel):
        # strict: "0.5" is not a number and true is not an integer (JSON
        # integers are still accepted for floats).
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Strict):
        include_usage: bool = False
        continuous_usage_stats: bool = False

    class Sampling(Strict):
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0, le=2)
        top_p: float = Field(default=1.0, ge=0, le=1)
        n: int = Field(default=1, ge=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        presence_penalty: float = Field(default=0.0, ge=-2, le=2)
        frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
        seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
        user: str | None = None
        logit_bias: dict[str, float] | None = None
        # rwkvkit extensions (send them with the openai client's extra_body).
        top_k: int = Field(default=0, ge=0)
        min_p: float = Field(default=0.0, ge=0, le=1)

    class CompletionBody(Sampling):
        # A batch of one prompt as lm-eval sends it ([[ids]]) is accepted too.
        prompt: Union[str, list[str], list[int], list[list[int]]]
        echo: bool = False
        # The legacy completions log-probabilities: the k (0..5) most likely
        # tokens at each position; with echo the prompt's tokens are scored too.
        logprobs: int | None = Field(default=None, ge=0, le=5)
        best_of: int | None = None
        suffix: None = None

    class TokenizeBody(Strict):
        prompt: str
        add_special_tokens: bool = False
        model: str | None = None

    class DetokenizeBody(Strict):
        tokens: list[int]
        model: str | None = None

    class ContentPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[ContentPart], None] = None
        name: str | None = None

    class ChatBody(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = Field(default=None, ge=0, le=20)

    # -------------------------------------------------------------- errors
    class ApiError(Exception):
        def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                     headers: dict | None = None):
            self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
            self.headers = headers

    def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="rwkvkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg")))
            return error_response(400, msg, "invalid_request_error")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field '{'.'.join(loc)}' (not supported by this server)"
        elif first.get("type") == "missing":
            msg = f"missing required field '{'.'.join(loc)}'"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error_response(400, msg, "invalid_request_error", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error", 401: "authentication_error"}
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, kinds.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        _log.exception("unexpected error while serving %s", request.url.path)
        return error_response(500, "internal server error", "server_error")

    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts, error_response=error_response)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # Outermost, so that preflight requests (which carry no API key) are answered.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)

    # ----------------------------------------------------------- helpers
    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "not_found_error", "model", "model_not_found")

    def build_request(body: Sampling, ids: list[int], stops: tuple[str, ...], max_tokens: int | None, snapshots=()) -> GenRequest:
        user_stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(user_stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
        if any(s == "" for s in user_stops):
            raise ApiError(400, "stop: stop sequences must be non-empty", param="stop")
        try:
            bias = tuple(sorted((int(key), float(value)) for key, value in (body.logit_bias or {}).items()))
        except ValueError:
            raise ApiError(400, f"logit_bias: keys must be token ids, got {sorted(body.logit_bias)}", param="logit_bias") from None
        try:  # ranges and vocabulary: SamplingConfig's own check, here to name the field
            SamplingConfig(logit_bias=bias).validate(engine.vocab)
        except RwkvkitError as exc:
            raise ApiError(400, str(exc), param="logit_bias") from None
        sampling = SamplingConfig(
            logit_bias=bias,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            # OpenAI's penalties count every earlier occurrence without decay.
            penalty_decay=1.0,
        )
        limit = engine.config.max_tokens_limit
        mt = max_tokens if max_tokens is not None else min(limit, 256)
        if mt > limit:
            raise ApiError(400, f"max_tokens is {mt}, this server allows at most {limit}", param="max_tokens")
        if len(ids) > engine.config.max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {len(ids)} tokens, this server accepts at most {engine.config.max_prompt_tokens}", param="prompt", code="context_length_exceeded"
            )
        if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:
            raise ApiError(400, f"seed: choice i uses seed + i, so seed + n - 1 must be at most {SEED_MAX}", param="seed")
        if body.n > engine.config.max_batch:
            raise ApiError(400, f"n is {body.n}, this server allows at most {engine.config.max_batch}", param="n")
        want_logprobs = getattr(body, "logprobs", None)
        top_logprobs = getattr(body, "top_logprobs", None)
        if top_logprobs is not None and not want_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return GenRequest(
            logprobs=(top_logprobs or 0) if want_logprobs else None,
            ids=ids,
            sampling=sampling,
            max_tokens=mt,
            emit=lambda e: None,
            n=body.n,
            stop=tuple(stops) + tuple(user_stops),
            stop_tokens=frozenset([tok.eos_id]) if tok.eos_id is not None else frozenset(),
            seed=body.seed,
            snapshots=tuple(snapshots),
        )

    # Events from the scheduler thread reach the event loop through one shared
    # outbox: at most one wake-up of the loop per decode step, however many
    # requests the step served (a call_soon_threadsafe per event would wake
    # it once per sequence).
    outbox: list = []
    outbox_lock = threading.Lock()
    outbox_state = {"scheduled": False}

    def drain() -> None:
        with outbox_lock:
            items = outbox[:]
            outbox.clear()
            outbox_state["scheduled"] = False
        for queue, event in items:
            queue.put_nowait(event)

    def submit(req: GenRequest) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:
            with outbox_lock:
                outbox.append((queue, event))
                wake = not outbox_state["scheduled"]
                outbox_state["scheduled"] = True
            if wake:
                try:
                    loop.call_soon_threadsafe(drain)
                except RuntimeError:  # the event loop is closed: nobody is listening
                    req.cancel()

        req.emit = emit
        try:
            engine.submit(req)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None
        except RwkvkitError as exc:
            raise ApiError(400, str(exc)) from None
        return queue

    async def events(req: GenRequest, queue: asyncio.Queue, request: Request | None):
        """Yield the engine's events until every choice is done; a client that
        goes away (non-streaming: polled) cancels the request.  Text that
        queued up while the consumer was busy comes out merged (one SSE chunk
        instead of many when the server is loaded)."""
        done = 0
        next_poll = time.monotonic() + DISCONNECT_POLL_S
        while done < req.n:
            if request is None:
                first = await queue.get()
            else:
                # Polled on a clock, not only when no event came: a request
                # that keeps producing text must notice its client leaving too.
                try:
                    first = await asyncio.wait_for(queue.get(), max(0.0, next_poll - time.monotonic()))
                except asyncio.TimeoutError:
                    first = None
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        req.cancel()
                        return
                if first is None:
                    continue
            batch = [first]
            while not queue.empty():
                batch.append(queue.get_nowait())
            merged: list[dict] = []
            for event in batch:
                if event["type"] == "error":
                    raise ApiError(503 if "shutting down" in event["message"] else 500, event["message"], "server_error")
                prev = merged[-1] if merged else None
                if event["type"] == "text" and prev is not None and prev["type"] == "text" and prev["index"] == event["index"]:
                    merged[-1] = {**prev, "text": prev["text"] + event["text"]}
                else:
                    merged.append(event)
            for event in merged:
                if event["type"] == "done":
                    done += 1
                yield event

    def usage(req: GenRequest, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": len(req.ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(req.ids) + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
        }

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def body_of(request: Request, cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        problem = _json_problem(data)
        if problem is not None:
            raise ApiError(400, problem[0], param=problem[1])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None

    def streaming(gen, req: GenRequest):
        async def wrapped():
            try:
                async for chunk in gen:
                    yield chunk
            except ApiError as exc:
                yield sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}})
            finally:
                # Normal end: a no-op.  Client gone: the generator is closed
                # here and the sequence leaves the batch at the next step.
                req.cancel()

        return StreamingResponse(wrapped(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ----------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        ok = engine.running
        body = {"status": "ok" if ok else "unavailable", "model": model_name}
        if not ok and engine.error:
            body["error"] = engine.error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return engine.stats()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "rwkvkit"}]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "rwkvkit"}

    # The tokenizer endpoints of vLLM's server, which lm-eval's
    # local-completions model finds and uses (tokenizer_backend=remote), so
    # that it scores with the server's own tokenizer.
    def eos_token() -> str | None:
        if tok.eos_id is None:
            return None
        text = tok.token_bytes(tok.eos_id).decode("utf-8", errors="replace")
        return text if text and list(tok.encode(text)) == [tok.eos_id] else None

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eos_token": eos_token(), "bos_token": None,
                "pad_token": None, "model_max_length": engine.config.max_prompt_tokens}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request, TokenizeBody)
        if body.model is not None:
            check_model(body.model)
        ids = list(tok.encode(body.prompt))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request, DetokenizeBody)
        if body.model is not None:
            check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise ApiError(400, f"token {bad[0]} is outside the vocabulary 0..{tok.vocab_size - 1}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionBody)
        check_model(body.model)
        if body.best_of not in (None, body.n):
            raise ApiError(400, "best_of is not supported (leave it out or equal to n)", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (a list of several prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if prompt == "":
                raise ApiError(400, "the prompt is empty", param="prompt")
            ids, prompt_text = tok.encode(prompt), prompt
        else:
            ids = list(prompt)
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < tok.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary 0..{tok.vocab_size - 1}", param="prompt")
            prompt_text = tok.decode(ids)
        req = build_request(body, ids, (), body.max_tokens)
        if body.logprobs is not None:
            if body.stream:
                raise ApiError(400, "logprobs with stream is not supported on /v1/completions: leave out one of them", param="logprobs")
            req.logprobs = body.logprobs
            if body.echo:
                req.prompt_logprobs = body.logprobs
        queue = submit(req)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = prompt_text if body.echo else ""

        def token_text(tid: int) -> str:
            return tok.token_bytes(tid).decode("utf-8", errors="replace")

        # logprobs: the prompt's (with echo) and each choice's tokens, in the
        # legacy completions format (top_logprobs as {token: logprob}).
        scored: dict = {"prompt": None}
        picked: list[list[tuple[int, float, list]]] = [[] for _ in range(req.n)]

        def logprobs_of(i: int):
            if req.logprobs is None:
                return None
            toks, lps, tops = [], [], []
            if body.echo:
                p = scored["prompt"] or {"logprobs": [None] * len(ids), "top": [None] * len(ids)}
                toks += list(ids)
                lps += p["logprobs"]
                tops += [None if t is None else {token_text(a): b for a, b in t} for t in p["top"]]
            for tid, lp, top in picked[i]:
                toks.append(tid)
                lps.append(lp)
                tops.append({token_text(a): b for a, b in top})
            strings = [token_text(t) for t in toks]
            offset = 0 if body.echo else len(prompt_text)
            offsets = []
            for text in strings:
                offsets.append(offset)
                offset += len(text)
            return {"tokens": strings, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        def chunk(index: int, text: str, finish=None) -> dict:
            return {
                "id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            async def gen():
                total = 0
                if prefix:
                    for i in range(req.n):
                        yield sse(chunk(i, prefix))
                async for ev in events(req, queue, None):
                    if ev["type"] == "text":
                        yield sse(chunk(ev["index"], ev["text"]))
                    elif ev["type"] == "done":
                        total += ev["completion_tokens"]
                        yield sse(chunk(ev["index"], "", ev["finish_reason"]))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": [], "usage": usage(req, total)})
                yield "data: [DONE]\n\n"

            return streaming(gen(), req)

        texts = [[prefix] for _ in range(req.n)]
        reasons: list[str | None] = [None] * req.n
        total = 0
        try:
            async for ev in events(req, queue, request):
                if ev["type"] == "text":
                    texts[ev["index"]].append(ev["text"])
                elif ev["type"] == "logprob":
                    picked[ev["index"]].append((ev["token"], ev["logprob"], ev["top"]))
                elif ev["type"] == "prompt_logprobs":
                    scored["prompt"] = ev
                elif ev["type"] == "done":
                    reasons[ev["index"]] = ev["finish_reason"]
                    total += ev["completion_tokens"]
        finally:
            req.cancel()
        return {
            "id": rid, "object": "text_completion", "created": now, "model": model_name,
            "choices": [{"index": i, "text": "".join(texts[i]), "logprobs": logprobs_of(i), "finish_reason": reasons[i]} for i in range(req.n)],
            "usage": usage(req, total),
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request, ChatBody)
        check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both with different values", param="max_tokens")
        msgs = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            msgs.append((m.role, text))
        segments = template.segments(msgs)
        ids: list[int] = []
        snapshots = []
        for seg in segments:
            ids.extend(tok.encode(seg))
            snapshots.append(len(ids))
        # Snapshots at the end of every message: a later turn of the same
        # conversation, or another conversation with the same system prompt,
        # starts from one of them.
        req = build_request(body, ids, template.stops(), body.max_completion_tokens or body.max_tokens, snapshots[:-1])
        queue = submit(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> dict:
            return {
                "id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }

        def token_entry(tid: int, lp: float) -> dict:
            raw = tok.token_bytes(tid)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

        def logprob_entry(ev: dict) -> dict:
            return {**token_entry(ev["token"], ev["logprob"]), "top_logprobs": [token_entry(t, lp) for t, lp in ev["top"]]}

        # Streaming: entries wait for the next chunk of their choice.
        pending: list[list[dict]] = [[] for _ in range(req.n)]

        def take_pending(index: int):
            if req.logprobs is None:
                return None
            out, pending[index] = pending[index], []
            return {"content": out}

        # The model writes "Assistant: reply": the space after the colon is
        # part of the format, not of the reply.
        started = [False] * req.n

        def content(index: int, text: str) -> str:
            if not started[index]:
                text = text.lstrip()
                started[index] = bool(text)
            return text

        if body.stream:
            async def gen():
                total = 0
                for i in range(req.n):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                async for ev in events(req, queue, None):
                    if ev["type"] == "logprob":
                        pending[ev["index"]].append(logprob_entry(ev))
                    elif ev["type"] == "text":
                        text = content(ev["index"], ev["text"])
                        if text:
                            yield sse(chunk(ev["index"], {"content": text}, logprobs=take_pending(ev["index"])))
                    elif ev["type"] == "done":
                        total += ev["completion_tokens"]
                        yield sse(chunk(ev["index"], {}, ev["finish_reason"], logprobs=take_pending(ev["index"])))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name, "choices": [], "usage": usage(req, total)})
                yield "data: [DONE]\n\n"

            return streaming(gen(), req)

        texts: list[list[str]] = [[] for _ in range(req.n)]
        reasons: list[str | None] = [None] * req.n
        total = 0
        try:
            async for ev in events(req, queue, request):
                if ev["type"] == "logprob":
                    pending[ev["index"]].append(logprob_entry(ev))
                elif ev["type"] == "text":
                    texts[ev["index"]].append(content(ev["index"], ev["text"]))
                elif ev["type"] == "done":
                    reasons[ev["index"]] = ev["finish_reason"]
                    total += ev["completion_tokens"]
        finally:
            req.cancel()
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])}, "logprobs": take_pending(i), "finish_reason": reasons[i]}
                for i in range(req.n)
            ],
            "usage": usage(req, total),
        }

    # The endpoints read their bodies themselves (body_of: JSON limits, 400s
    # shaped like OpenAI's), so FastAPI's generated schema lacks them: add the
    # request models, so that app.openapi() describes the API (the schema is
    # not served; the test suite fuzzes the API from it).
    body_models = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody,
                   "/tokenize": TokenizeBody, "/detokenize": DetokenizeBody}

    def openapi_schema() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, cls in body_models.items():
            sch = cls.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(sch.pop("$defs", {}))
            schemas[cls.__name__] = sch
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{cls.__name__}"}}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi_schema
    return app
