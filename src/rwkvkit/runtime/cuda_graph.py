"""A fast RNN decode step on NVIDIA GPUs: the whole one-token forward as one CUDA graph.

At batch size 1 the RNN step of a small model is a few hundred tiny kernels
(layer norms, token-shift mixes, the WKV step, matrix-vector products); the
GPU finishes each long before Python can launch the next, so the step is bound
by launch overhead, not by the GPU.  Capturing the step once with
:class:`torch.cuda.CUDAGraph` and replaying it launches all of them with one
call, the state being advanced in place inside the graph.

    dec = CudaGraphDecoder(model, batch_size=1)
    logits, state = model(prompt)                 # prefill with the parallel form
    for _ in range(n):
        tok = logits[:, -1].argmax(-1, keepdim=True)   # [B, 1]
        logits, state = dec(tok, state)           # logits [B, V] float32
        logits = logits[:, None]

The outputs are views of the graph's own buffers: the next call overwrites
them (clone what you keep).  Passing back the state it returned costs nothing;
any other state is copied in first.

Every generation works: the state's tensor fields are copied field by field
(RWKV-4's (aa, bb, pp) layout, and ``MatrixState`` - att_x, att_kv, ffn_x - of
RWKV-5/6/7, whose WKV step on a GPU is one kernel launch per layer,
``ops.wkv7.wkv7_step`` / ``ops.wkv6.wkv6_step``), after ``model.check_state``.
"""

from __future__ import annotations

import torch

from ..errors import RwkvkitError


class CudaGraphDecoder:
    """``model``'s one-token step for a fixed batch size, replayed as a CUDA graph."""

    def __init__(self, model, batch_size: int = 1):
        if model.device.type != "cuda":
            raise RwkvkitError(f"CudaGraphDecoder needs a model on a CUDA device, this one is on {model.device}")
        if batch_size < 1:
            raise RwkvkitError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self._tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        self._state = model.new_state(batch_size)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    @torch.no_grad()
    def _capture(self) -> None:
        model = self.model
        side = torch.cuda.Stream(device=model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        # Warm up outside the graph (lazy inits, cuBLAS workspaces), as CUDA graphs require.
        with torch.cuda.stream(side):
            scratch = self._state.clone()
            for _ in range(2):
                model(self._tokens, scratch, logits="last")
        torch.cuda.current_stream(model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, new = model(self._tokens, self._state, logits="last")
            for dst, src in zip(self._state.tensors(), new.tensors()):
                dst.copy_(src)
        self._graph = graph
        self._logits = logits[:, -1]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state=None):
        """Feed one token per sequence: tokens [B] or [B, 1]; returns (logits [B, V], state)."""
        if self.model.training:
            raise RwkvkitError("CudaGraphDecoder is for inference: call model.eval() first")
        B = self.batch_size
        if tokens.numel() != B or tokens.dim() not in (1, 2):
            raise RwkvkitError(f"tokens must have shape [{B}] or [{B}, 1] for this decoder, got {tuple(tokens.shape)}")
        if self._graph is None:
            self._capture()
        self._tokens.copy_(tokens.reshape(B, 1))
        if state is None:
            for dst, src in zip(self._state.tensors(), self.model.new_state(B).tensors()):
                dst.copy_(src)
        elif state is not self._state:
            self.model.check_state(state, batch=B)
            for dst, src in zip(self._state.tensors(), state.tensors()):
                dst.copy_(src)
        assert self._graph is not None and self._logits is not None
        self._graph.replay()
        return self._logits, self._state
