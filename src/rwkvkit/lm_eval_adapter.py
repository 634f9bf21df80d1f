"""rwkvkit models in EleutherAI's lm-evaluation-harness (``pip install "rwkvkit[eval]"``).

Importing this module registers the model type ``rwkvkit`` with lm_eval's
registry.  lm_eval has no plugin discovery for models, so run its command
line through this module, which registers first and then hands over::

    python -m rwkvkit.lm_eval_adapter --model rwkvkit \\
        --model_args path=RWKV-4-Pile-169M.pth,tokenizer=20B --tasks lambada_openai
    # or, from Python:
    import rwkvkit.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="rwkvkit", model_args="path=...", tasks=[...])

``--model_args``: ``path`` (any checkpoint :func:`rwkvkit.load` reads),
``tokenizer`` (bytes, world, 20B or a file; default: the model's),
``dtype``, ``device``, ``prefix_token`` (the id read before a text that has no
context; default: the tokenizer's end-of-text, which is 0 for the World
vocabulary as in the RWKV-7 authors' scripts, or its newline for tokenizers
without one, such as bytes).  Any generation rwkvkit loads runs (RWKV-4,
RWKV-7).

How requests are scored:

- ``loglikelihood``: lm_eval's split of context and continuation (trailing
  spaces of the context move to the continuation; the continuation's ids are
  those of the whole text after the context's), batched by
  :func:`rwkvkit.eval.scoring.score_continuations`.  There is no context
  limit: long contexts are run in chunks with the state carried.
- ``loglikelihood_rolling``: the whole text in one pass after the prefix
  token, in windows with the state carried, so every token sees all of the
  text before it (a Transformer's rolling windows would cut that context).
- ``generate_until``: greedy decoding (or sampling when the task asks for
  ``do_sample`` with a temperature), one RNN step per token, stopping at the
  task's ``until`` strings (cut off, as lm_eval expects), end-of-text or
  ``max_gen_toks``.
"""

from __future__ import annotations

import sys

try:
    import lm_eval.models  # noqa: F401  (lm_eval's own models stay available beside ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'the lm-evaluation-harness adapter needs lm_eval: pip install "rwkvkit[eval]" (or pip install lm_eval)'
    ) from exc

import torch

from .errors import RwkvkitError

DEFAULT_MAX_GEN_TOKS = 256


@register_model("rwkvkit")
class RwkvkitLM(TemplateLM):
    """An rwkvkit model of any generation (RWKV-4, RWKV-7) as an lm_eval ``LM``;
    only the generic model protocol (``model(tokens, state)``) is used."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: "int | str | None" = 16,
        max_batch_size: "int | None" = None,
        prefix_token: "int | str | None" = None,
        pretrained: str | None = None,
        model=None,
        **unused,
    ) -> None:
        super().__init__()
        from .checkpoint import load_user_model as load_model_arg
        from .tokenizer import tokenizer_for_model

        path = path or pretrained
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's configuration defaults to cuda:0 whatever the machine;
            # like its own HF model, fall back to the CPU rather than fail.
            print(f"rwkvkit: device {device} is not available, using the CPU", file=sys.stderr)
            device = "cpu"
        if model is None:
            if path is None:
                raise RwkvkitError("the rwkvkit lm-eval model needs --model_args path=CHECKPOINT (python -m rwkvkit.lm_eval_adapter --model rwkvkit --model_args path=...)")
            model = load_model_arg(path, dtype=dtype, device=device)
        self.model = model.eval()
        self.tok = tokenizer_for_model(self.model, path, tokenizer)
        self._device = self.model.device
        # "auto" (lm_eval's batch-size search) is not needed: memory grows
        # with batch x length only, so a fixed batch is used.
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise RwkvkitError(f"batch_size must be at least 1, got {batch_size}")
        if prefix_token is not None:
            self._prefix = int(prefix_token)
        elif self.tok.eos_id is not None:
            self._prefix = int(self.tok.eos_id)
        else:
            nl = self.tok.encode("\n")
            if len(nl) != 1:
                raise RwkvkitError(f"tokenizer '{self.tok.name}' has no end-of-text token: pass --model_args prefix_token=ID")
            self._prefix = nl[0]
        self._path = str(path)
        self._unused = sorted(unused)

    # ------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return f"rwkvkit-{self.tok.name}"

    def tok_encode(self, string: str, add_special_tokens: "bool | None" = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_path": self._path, "generation": cfg.generation, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size, "parameters": self.model.num_parameters()}

    # -------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        from .eval.scoring import score_continuations

        bar = tqdm(total=len(requests), desc="rwkvkit loglikelihood", disable=disable_tqdm or self.rank != 0)
        try:
            scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size, progress=bar)
        finally:
            bar.close()
        out = []
        for (key, _, _), s in zip(requests, scores):
            res = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from tqdm.auto import tqdm

        from .eval.scoring import stream_nll

        out = []
        for req in tqdm(requests, desc="rwkvkit loglikelihood_rolling", disable=disable_tqdm or self.rank != 0):
            (text,) = req.args[:1]
            ids = self.tok_encode(text)
            if not ids:
                out.append(0.0)
                continue
            ll = -stream_nll(self.model, ids, window=1024, bos=self._prefix).nll
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def _generate_one(self, context: str, until: list[str], max_tokens: int, temperature: float, generator) -> str:
        ids = self.tok_encode(context) if context else [self._prefix]
        if not ids:
            ids = [self._prefix]
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        state = None
        logits = None
        for s in range(0, x.shape[1], 1024):
            logits, state = self.model(x[:, s : s + 1024], state, logits="last")
        decoder = self.tok.stream_decoder()
        text = ""
        eos = self.tok.eos_id
        for _ in range(max_tokens):
            lg = logits[0, -1]
            if temperature > 0:
                probs = torch.softmax(lg.double() / temperature, dim=-1)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                nxt = int(lg.argmax())
            if eos is not None and nxt == eos:
                break
            text += decoder.push(nxt)
            if any(u in text for u in until):
                break
            logits, state = self.model(torch.tensor([[nxt]], device=self.model.device), state, logits="last")
        else:
            text += decoder.flush()
        for u in until:  # lm_eval expects the text before the first stop string
            if u:
                text = text.split(u)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        out = []
        generator = torch.Generator().manual_seed(1234)
        for req in tqdm(requests, desc="rwkvkit generate_until", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_tokens = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            text = self._generate_one(context, list(until), max_tokens, temperature, generator)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``rwkvkit`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
