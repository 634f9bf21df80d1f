"""Evaluation: perplexity and bits per byte, LAMBADA, the lm-evaluation-harness
adapter (:mod:`rwkvkit.lm_eval_adapter`) and the inference benchmark against a
Transformer (:mod:`rwkvkit.eval.bench`)."""

from .lambada import LambadaResult, lambada, read_lambada, split_passage
from .perplexity import PerplexityResult, perplexity
from .scoring import NLL, Score, byte_length_table, score_continuations, stream_nll

__all__ = [
    "perplexity",
    "PerplexityResult",
    "lambada",
    "LambadaResult",
    "read_lambada",
    "split_passage",
    "stream_nll",
    "NLL",
    "score_continuations",
    "Score",
    "byte_length_table",
]
