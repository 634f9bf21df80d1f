"""The scheduler: continuous batching of many generations on one model.

One thread owns the model.  Each iteration it

1. drops sequences whose client has gone away;
2. admits waiting requests while there are free slots: each prompt is
   prefilled alone with the parallel form (from the longest cached prefix,
   :mod:`.cache`), so a prompt's state never depends on its neighbours;
3. samples one token for every active sequence (each with its own settings,
   random generator and penalty counts) and feeds all of them to the model in
   a single batched RNN step (``model(tokens [B, 1], state)``).

Sequences join the batch as they are admitted and leave it as they finish
(``StateBase.concat`` / ``select``, the same for every generation's state), so
a short request never waits for a long one.  The batch is bounded by
``max_batch`` and by ``max_state_bytes``: an RWKV-7 state is 10-100x an RWKV-4
one (2.4 MB per sequence at 0.1B, 13x the 0.18 MB of the same-shape RWKV-4), so memory, not a count, is the
natural limit.  On the CPU the fused decoder computes each batch row with the same
instructions in the same order whatever the batch, so a request's tokens are
bit-for-bit those it gets alone; on other devices matrix products may round
differently with the batch size (greedy outputs can then differ only where two
tokens' logits tie to the last bit).

Results go back through a callback per request (called on the scheduler
thread; the HTTP layer hands them to its event loop).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import astuple, dataclass, field
from typing import Callable

import torch

from ..errors import RwkvkitError
from ..sampling import SamplingConfig, make_generators, sample, update_penalty_state
from ..generate import _StopMatcher  # the same hold-back rule as rwkvkit generate
from ..state import StateBase
from .cache import PrefixCache

_log = logging.getLogger("rwkvkit.serve")


class QueueFull(RwkvkitError):
    """Every slot is busy and the waiting queue is at its bound."""


class EngineStopped(RwkvkitError):
    """The scheduler is not running (shutting down, or failed)."""


@dataclass
class EngineConfig:
    """Limits of the scheduler."""

    # Sequences decoded together at most (a request with n choices takes n).
    max_batch: int = 64
    # Bytes of recurrent state the running batch may hold (None: no bound).
    # The batch is at most max_state_bytes // (one sequence's state bytes).
    max_state_bytes: int | None = None
    # Requests that may wait for a slot; more get QueueFull (HTTP 429).
    max_queue: int = 256
    # Longest prompt accepted, in tokens.
    max_prompt_tokens: int = 8192
    # Largest max_tokens a request may ask for.
    max_tokens_limit: int = 4096
    # Prefix state cache size in bytes (0 disables it).
    cache_bytes: int = 256 * 2**20
    # Prompt tokens per parallel call while prefilling (bounds activation memory).
    prefill_chunk: int = 1024
    # Prompt tokens prefilled per scheduler iteration before decoding goes on
    # (at least one request is always admitted): bounds the pause that new
    # arrivals impose on running streams.
    prefill_budget: int = 2048

    def validate(self) -> None:
        for name in ("max_batch", "max_prompt_tokens", "max_tokens_limit", "prefill_chunk", "prefill_budget"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RwkvkitError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_queue < 0 or self.cache_bytes < 0:
            raise RwkvkitError("max_queue and cache_bytes must be >= 0")
        if self.max_state_bytes is not None and (not isinstance(self.max_state_bytes, int) or self.max_state_bytes < 1):
            raise RwkvkitError(f"max_state_bytes must be a positive integer (or None), got {self.max_state_bytes!r}")

    def batch_limit(self, state_bytes_per_sequence: int) -> int:
        """The most sequences decoded together: min(max_batch, max_state_bytes // per-sequence bytes)."""
        if self.max_state_bytes is None:
            return self.max_batch
        return min(self.max_batch, self.max_state_bytes // max(1, state_bytes_per_sequence))


@dataclass
class GenRequest:
    """One prompt to continue ``n`` times."""

    ids: list[int]
    sampling: SamplingConfig
    max_tokens: int
    # Called on the scheduler thread with one event dict at a time:
    # {"type": "start", "cached_tokens": int}
    # {"type": "text", "index": i, "text": str}
    # {"type": "logprob", "index": i, "token": id, "logprob": float, "top": [(id, logprob), ...]}
    #     (only with ``logprobs`` set; before the text of that token)
    # {"type": "done", "index": i, "finish_reason": str, "completion_tokens": int}
    # {"type": "error", "message": str}
    emit: Callable[[dict], None]
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    seed: int | None = None
    # Token positions inside the prompt (e.g. ends of chat messages) whose
    # states are worth caching for later prompts.
    snapshots: tuple[int, ...] = ()
    # None: no log-probabilities; k >= 0: report each sampled token's
    # log-probability under the model (before temperature, penalties and
    # logit_bias) and the k most likely alternatives.
    logprobs: int | None = None
    # None, or k >= 0: also score the prompt (the completions endpoint's echo
    # with logprobs): before "start", one event
    # {"type": "prompt_logprobs", "logprobs": [None, lp(t1 | t0), ...],
    #  "top": [None, [(id, logprob) x k], ...]} from one pass over the prompt
    # (the prefix cache is not used for such a request).
    prompt_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the scheduler.
    cached_tokens: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Free this request's slots at the next scheduler iteration."""
        self.cancelled.set()


class _Seq:
    """One choice of one request while it is being generated."""

    __slots__ = ("req", "index", "gen", "decoder", "matcher", "tokens", "counts", "seen", "key", "sampled")

    def __init__(self, req: GenRequest, index: int, gen: torch.Generator, decoder, vocab: int, device):
        self.req = req
        self.index = index
        self.gen = gen
        self.decoder = decoder
        self.matcher = _StopMatcher(req.stop)
        self.tokens: list[int] = []
        self.sampled = 0
        pen = req.sampling.uses_penalties
        self.counts = torch.zeros(1, vocab, device=device) if pen else None
        self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device) if pen else None
        self.key = astuple(req.sampling)


class _Metrics:
    """Counters and a sliding window of decode steps (for rates)."""

    WINDOW_S = 10.0

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.rejected = 0
        self.cancelled = 0
        self.failed = 0
        self.finished = 0
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.step_rows = 0
        self.window: deque[tuple[float, int]] = deque()  # (time, rows in the step)

    def step(self, rows: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.steps += 1
            self.step_rows += rows
            self.completion_tokens += rows
            self.window.append((now, rows))
            while self.window and self.window[0][0] < now - self.WINDOW_S:
                self.window.popleft()


class Engine:
    """Continuous-batching generation on ``model`` with ``tokenizer``.

    ``start()`` launches the scheduler thread, ``submit()`` queues a
    :class:`GenRequest`, ``stop()`` ends the thread (pending requests get an
    error event).
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tok = tokenizer
        self.config = config or EngineConfig()
        self.config.validate()
        self.vocab = model.config.vocab_size
        self.device = model.device
        # Output rows past the tokenizer's ids are padding: never produce them.
        self.padding_ids = tuple(range(tokenizer.vocab_size, self.vocab)) if tokenizer.vocab_size < self.vocab else ()
        # fp32 state bytes of one sequence (any generation: from its own state type).
        self.state_bytes_per_sequence = int(model.new_state(1).nbytes)
        # The effective batch bound: max_batch, or fewer when state memory is bounded.
        self.max_batch = self.config.batch_limit(self.state_bytes_per_sequence)
        if self.max_batch < 1:
            raise RwkvkitError(
                f"max_state_bytes {self.config.max_state_bytes} is less than one sequence's state "
                f"({self.state_bytes_per_sequence} bytes, {self.state_bytes_per_sequence / 2**20:.2f} MiB, for this model)"
            )
        self.cache = PrefixCache(self.config.cache_bytes)
        self.metrics = _Metrics()
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._rows: list[_Seq] = []
        self._state: StateBase | None = None
        self._logits: torch.Tensor | None = None  # [B, V], row i for self._rows[i]
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None  # ended (stopped, or failed): a new one may start
        if self._thread is None:
            self._stopping = False
            self.error = None
            self._thread = threading.Thread(target=self._loop, name="rwkvkit-scheduler", daemon=True)
            self._thread.start()
        elif self._stopping:
            # Two schedulers must never share the model and the batch.
            raise RwkvkitError("the previous scheduler thread is still running (finishing a step); call stop() again and retry")
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the scheduler to end and wait up to ``timeout`` seconds; True
        once it has ended.  A thread still inside a step after the timeout is
        kept (False): a later stop() waits for it again and start() refuses to
        run a second one beside it."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            _log.warning("the scheduler thread did not end within %.1f s (inside a decoding step)", timeout)
            return False
        self._thread = None
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---------------------------------------------------------------- submit
    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; raises QueueFull / EngineStopped / RwkvkitError (bad limits)."""
        cfg = self.config
        if not req.ids:
            raise RwkvkitError("the prompt is empty: give at least one character (or token)")
        if len(req.ids) > cfg.max_prompt_tokens:
            raise RwkvkitError(f"the prompt has {len(req.ids)} tokens; this server accepts at most {cfg.max_prompt_tokens}")
        if not 1 <= req.max_tokens <= cfg.max_tokens_limit:
            raise RwkvkitError(f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {req.max_tokens}")
        if not 1 <= req.n <= self.max_batch:
            raise RwkvkitError(f"n must be between 1 and {self.max_batch}, got {req.n}")
        bad = [t for t in req.ids if not 0 <= t < self.vocab]
        if bad:
            raise RwkvkitError(f"token id {bad[0]} is outside the model's vocabulary 0..{self.vocab - 1}")
        req.sampling.validate(self.vocab)
        with self._cv:
            if not self.running:
                raise EngineStopped("the generation engine is not running" + (f": {self.error}" if self.error else ""))
            if len(self._waiting) >= cfg.max_queue and (self._waiting or len(self._rows) + req.n > self.max_batch):
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(
                    f"the server is at capacity ({len(self._rows)} sequences running, {len(self._waiting)} requests waiting); retry later"
                )
            self._waiting.append(req)
            with self.metrics.lock:
                self.metrics.requests += 1
            self._cv.notify_all()

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict:
        m = self.metrics
        with m.lock:
            now = time.monotonic()
            win = [(t, r) for t, r in m.window if t >= now - m.WINDOW_S]
            span = (now - win[0][0]) if len(win) > 1 else 0.0
            tok_s = sum(r for _, r in win[1:]) / span if span > 0 else 0.0
            occ = sum(r for _, r in win) / len(win) if win else 0.0
            out = {
                "uptime_s": time.time() - m.started,
                "requests_total": m.requests,
                "requests_rejected": m.rejected,
                "requests_cancelled": m.cancelled,
                "requests_failed": m.failed,
                "sequences_finished": m.finished,
                "prompt_tokens_total": m.prompt_tokens,
                "prefill_tokens_total": m.prefill_tokens,
                "completion_tokens_total": m.completion_tokens,
                "decode_steps_total": m.steps,
                "tokens_per_second": tok_s,
                "mean_batch_size": (m.step_rows / m.steps) if m.steps else 0.0,
                "recent_batch_size": occ,
            }
        with self._cv:
            out["running_sequences"] = len(self._rows)
            out["waiting_requests"] = len(self._waiting)
        out["max_batch"] = self.max_batch
        out["max_batch_configured"] = self.config.max_batch
        out["batch_occupancy"] = out["recent_batch_size"] / self.max_batch
        out["state_bytes_per_sequence"] = self.state_bytes_per_sequence
        out["max_state_bytes"] = self.config.max_state_bytes
        out["state_bytes_running"] = out["running_sequences"] * self.state_bytes_per_sequence
        out["prefix_cache"] = self.cache.stats()
        return out

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._stopping and not self._waiting and not self._rows:
                            self._cv.wait()
                        if self._stopping:
                            break
                    try:
                        self._drop_cancelled()
                        self._admit()
                        if self._rows:
                            self._step()
                    except Exception as exc:  # e.g. out of memory: fail the batch, keep serving
                        self._fail_batch(exc)
        except Exception as exc:  # a bug or a device failure: fail every request, loudly
            _log.exception("the scheduler failed")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._cv:
                self._stopping = True
                pending = list(self._waiting) + list({id(s.req): s.req for s in self._rows}.values())
                self._waiting.clear()
                self._rows, self._state, self._logits = [], None, None
            for req in pending:
                self._safe_emit(req, {"type": "error", "message": "the server is shutting down" if self.error is None else "internal error in the generation engine"})

    def _fail_batch(self, exc: Exception) -> None:
        _log.exception("a decoding step failed; the %d sequences in the batch are dropped", len(self._rows))
        reqs = list({id(s.req): s.req for s in self._rows}.values())
        with self._cv:
            self._rows = []
        self._state, self._logits = None, None
        with self.metrics.lock:
            self.metrics.failed += len(reqs)
        for req in reqs:
            self._safe_emit(req, {"type": "error", "message": f"generation failed ({type(exc).__name__}); retry the request"})

    @staticmethod
    def _safe_emit(req: GenRequest, event: dict) -> None:
        try:
            req.emit(event)
        except Exception:  # a consumer that went away must not stop the scheduler
            _log.debug("dropping an event for a departed request", exc_info=True)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
        keep = [i for i, s in enumerate(self._rows) if not s.req.cancelled.is_set()]
        n_gone = len(gone) + len({id(s.req) for s in self._rows if s.req.cancelled.is_set()})
        if n_gone:
            with self.metrics.lock:
                self.metrics.cancelled += n_gone
        if len(keep) != len(self._rows):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        with self._cv:
            self._rows = [self._rows[i] for i in keep]
        if keep:
            self._state = self._state.select(keep)
            self._logits = self._logits[keep]
        else:
            self._state, self._logits = None, None

    # ------------------------------------------------------------- admission
    def _admit(self) -> None:
        budget = self.config.prefill_budget
        admitted = 0
        while True:
            with self._cv:
                if not self._waiting or len(self._rows) + self._waiting[0].n > self.max_batch:
                    return
                if admitted and budget <= 0:
                    return
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                continue
            try:
                spent = self._start(req)
            except Exception as exc:
                _log.exception("prefill failed")
                with self.metrics.lock:
                    self.metrics.failed += 1
                self._safe_emit(req, {"type": "error", "message": f"prefill failed: {type(exc).__name__}"})
                continue
            budget -= spent
            admitted += 1

    def _prefill(self, req: GenRequest) -> tuple[torch.Tensor, StateBase, int]:
        """(last logits [1, V], state [batch 1], tokens that went through the model)."""
        model, ids = self.model, req.ids
        if req.prompt_logprobs is not None:
            return self._prefill_scored(req)
        hit, entry = self.cache.lookup(ids)
        req.cached_tokens = hit
        if entry is not None and hit == len(ids):
            return entry.logits[None].clone(), entry.state.clone(), 0
        state = entry.state.clone() if entry is not None else model.new_state(1)
        toks = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, T]
        stops = sorted({p for p in req.snapshots if hit < p < len(ids)} | {len(ids)})
        pos, logits = hit, None
        for end in stops:
            for s in range(pos, end, self.config.prefill_chunk):
                e = min(s + self.config.prefill_chunk, end)
                out, state = model(toks[:, s:e], state, logits="last" if e == len(ids) else "none")
                if out is not None:
                    logits = out[:, -1]
            self.cache.put(ids[:end], state, logits[0] if end == len(ids) else None)
            pos = end
        return logits, state, len(ids) - hit

    def _prefill_scored(self, req: GenRequest) -> tuple[torch.Tensor, StateBase, int]:
        """:meth:`_prefill` with every prompt position's logits: each prompt
        token's log-probability given the ones before it, and the top k."""
        model, ids, k = self.model, req.ids, req.prompt_logprobs
        req.cached_tokens = 0
        state = model.new_state(1)
        toks = torch.tensor([ids], dtype=torch.long, device=self.device)
        lps: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        logits = None
        for s in range(0, len(ids), self.config.prefill_chunk):
            e = min(s + self.config.prefill_chunk, len(ids))
            out, state = model(toks[:, s:e], state, logits="all")
            logits = out[:, -1]
            lp = torch.log_softmax(out[0].float(), dim=-1)  # row j scores token s + j + 1
            n = min(e, len(ids) - 1) - s
            if n > 0:
                nxt = toks[0, s + 1 : s + 1 + n]
                lps.extend(lp[:n].gather(1, nxt[:, None])[:, 0].tolist())
                if k:
                    v, i = lp[:n].topk(k, dim=-1)
                    tops.extend([list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())])
                else:
                    tops.extend([[] for _ in range(n)])
        self.cache.put(ids, state, logits[0])
        self._safe_emit(req, {"type": "prompt_logprobs", "logprobs": lps, "top": tops})
        return logits, state, len(ids)

    def _start(self, req: GenRequest) -> int:
        logits, state, spent = self._prefill(req)
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(req.ids)
            self.metrics.prefill_tokens += spent
        self._safe_emit(req, {"type": "start", "cached_tokens": req.cached_tokens})
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        gens = make_generators(seed, req.n, self.device)
        new = [_Seq(req, i, gens[i], self.tok.stream_decoder(), self.vocab, self.device) for i in range(req.n)]
        state_n = state.expand(req.n) if req.n > 1 else state
        logits_n = logits.expand(req.n, -1)
        with self._cv:
            self._rows = self._rows + new
        if self._state is None:
            self._state, self._logits = state_n, logits_n.contiguous()
        else:
            self._state = StateBase.concat([self._state, state_n])
            self._logits = torch.cat([self._logits, logits_n])
        return spent

    # ---------------------------------------------------------------- decode
    def _sample_all(self) -> list[int]:
        rows, logits = self._rows, self._logits
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(rows):
            groups.setdefault(s.key, []).append(i)
        out = [0] * len(rows)
        for idx in groups.values():
            cfg = rows[idx[0]].req.sampling
            if self.padding_ids:
                cfg = SamplingConfig(**{**cfg.__dict__, "banned_tokens": tuple(cfg.banned_tokens) + self.padding_ids})
            lg = logits[idx]
            if cfg.uses_penalties:
                counts = torch.cat([rows[i].counts for i in idx])
                seen = torch.cat([rows[i].seen for i in idx])
                toks = sample(lg, cfg, [rows[i].gen for i in idx], counts=counts, seen=seen)
            else:
                toks = sample(lg, cfg, [rows[i].gen for i in idx])
            for i, t in zip(idx, toks.tolist()):
                out[i] = t
        return out

    def _finish(self, s: _Seq, reason: str) -> None:
        """Report the end of ``s``; reason "stop" (a stop string was cut),
        "stop_token" or "length" (text held back is flushed first)."""
        tail = ""
        if reason != "stop":
            piece, hit = s.matcher.feed(s.decoder.flush())
            tail = piece if hit else piece + s.matcher.flush()
            reason = "stop" if hit else reason
        # OpenAI's vocabulary: "stop" for any natural end, "length" for max_tokens.
        reason = "stop" if reason == "stop_token" else reason
        if tail:
            self._safe_emit(s.req, {"type": "text", "index": s.index, "text": tail})
        with self.metrics.lock:
            self.metrics.finished += 1
        self._safe_emit(s.req, {"type": "done", "index": s.index, "finish_reason": reason, "completion_tokens": s.sampled})

    def _step(self) -> None:
        rows = self._rows
        toks = self._sample_all()
        want = [i for i, s in enumerate(rows) if s.req.logprobs is not None]
        logp = dict(zip(want, torch.log_softmax(self._logits[want].float(), dim=-1).cpu())) if want else {}
        keep: list[int] = []  # rows that go on
        fed_done: list[int] = []  # rows that finished but are fed once more, for the cache
        for i, (s, t) in enumerate(zip(rows, toks)):
            s.sampled += 1
            if s.counts is not None:
                s.counts, s.seen = update_penalty_state(s.counts, s.seen, torch.tensor([t], device=self.device), s.req.sampling.penalty_decay)
            stopped = t in s.req.stop_tokens
            # A scored prompt (echo + logprobs) reports every sampled
            # position, a stop token's too: scorers (lm-eval) drop the last entry.
            if s.req.logprobs is not None and (not stopped or s.req.prompt_logprobs is not None):
                lp = logp[i]
                top = []
                if s.req.logprobs > 0:
                    vals, ids = lp.topk(s.req.logprobs)
                    top = list(zip(ids.tolist(), vals.tolist()))
                self._safe_emit(s.req, {"type": "logprob", "index": s.index, "token": t, "logprob": float(lp[t]), "top": top})
            if stopped:
                self._finish(s, "stop_token")
                continue
            s.tokens.append(t)
            piece, hit = s.matcher.feed(s.decoder.push(t))
            if piece:
                self._safe_emit(s.req, {"type": "text", "index": s.index, "text": piece})
            if hit or len(s.tokens) >= s.req.max_tokens:
                self._finish(s, "stop" if hit else "length")
                if self.cache.max_bytes > 0 and s.req.n == 1:
                    fed_done.append(i)
            else:
                keep.append(i)
        self.metrics.step(len(rows))
        fed = sorted(keep + fed_done)
        if not fed:
            self._keep_rows([])
            return
        step_in = torch.tensor([[toks[i]] for i in fed], dtype=torch.long, device=self.device)  # [b, 1]
        state_in = self._state if len(fed) == len(rows) else self._state.select(fed)
        out, new_state = self.model(step_in, state_in, logits="last")
        out = out[:, 0]  # [b, V]
        pos = {row: j for j, row in enumerate(fed)}
        for i in fed_done:
            s = rows[i]
            j = pos[i]
            # The state after the prompt and every generated token: the prefix
            # of the conversation's next turn.
            self.cache.put(s.req.ids + s.tokens, new_state.select(j), out[j])
        with self._cv:
            self._rows = [rows[i] for i in keep]
        if keep:
            sel = [pos[i] for i in keep]
            self._state = new_state if len(sel) == len(fed) else new_state.select(sel)
            self._logits = out if len(sel) == len(fed) else out[sel]
        else:
            self._state, self._logits = None, None
