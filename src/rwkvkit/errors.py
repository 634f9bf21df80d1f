"""Exceptions that carry a one-line, user-facing explanation.

Everything the command line catches and prints as a single line derives from
:class:`RwkvkitError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RwkvkitError(Exception):
    """Base class for errors caused by input (files, flags, data), not by bugs."""


class CheckpointError(RwkvkitError, ValueError):
    """A checkpoint file is missing, unreadable, truncated or of an unknown kind."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is a recognised RWKV generation or variant that rwkvkit cannot run yet."""


class ShapeError(CheckpointError):
    """A tensor in a checkpoint has a shape that does not fit the rest of the model."""


class InputShapeError(RwkvkitError, ValueError):
    """An argument to an operator (the WKV kernel, a model call) has the wrong shape or layout."""
