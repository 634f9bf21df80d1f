"""Compatibility: the RWKV-4 model moved to :mod:`rwkvkit.models.rwkv4`."""

from .models.rwkv4 import RWKV, RWKV4Config  # noqa: F401
