"""Backend choice shared by every WKV operator (RWKV-4's ``wkv``, RWKV-7's ``wkv7``, ...).

An operator declares its backends as loaders: functions that return the
implementation, or None when it cannot run on this machine (a compiled
extension that failed to build warns once, in its own module, and returns
None).  ``"auto"`` walks a per-device preference list; an explicit compiled
backend that is unavailable falls back to ``"torch"`` (the chunked PyTorch
form every operator has) rather than failing.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch


class Backends:
    """The backends of one operator, loaded lazily and cached."""

    def __init__(self, op: str, loaders: Mapping[str, Callable[[], Callable | None]],
                 prefer: Mapping[str, Sequence[str]] | None = None):
        self.op = op
        self.loaders = dict(loaders)
        # device type -> backends to try for "auto", best first.
        self.prefer = dict(prefer or {})
        self.names = ("auto", *self.loaders)
        self.cache: dict[str, Callable | None] = {}

    def load(self, name: str) -> Callable | None:
        """The implementation of backend ``name``, or None if it cannot run here."""
        if name not in self.cache:
            self.cache[name] = self.loaders[name]()
        return self.cache[name]

    def resolve(self, backend: str, device: torch.device | str = "cpu") -> str:
        """Which implementation ``backend`` means for tensors on ``device``."""
        if backend not in self.names:
            raise ValueError(f"unknown {self.op} backend {backend!r}; expected one of {self.names}")
        if backend != "auto":
            if self.load(backend) is None:
                if backend != "torch" and self.load("torch") is not None:
                    return "torch"
                raise RuntimeError(f"{self.op} backend {backend!r} is not available on this machine")
            return backend
        kind = torch.device(device).type
        for name in (*self.prefer.get(kind, ()), "torch", "reference"):
            if name in self.loaders and self.load(name) is not None:
                return name
        return "reference"

    def get(self, backend: str, device: torch.device | str = "cpu") -> Callable:
        fn = self.load(self.resolve(backend, device))
        assert fn is not None
        return fn
