"""One model file per RWKV generation, behind a small registry.

The generation is read from the tensor names (rwkv5-7 spec 2.7, the
order-independent rule), never from a file name or a hand-typed size:

- ``att.r_k`` / ``att.x_r`` / ``att.x_rwkvag`` -> RWKV-7 "Goose"
- ``att.time_maa_*`` -> RWKV-6 "Finch"
- ``att.ln_x`` -> RWKV-5 "Eagle" (5.0 / 5.1 / 5.2 by gate and decay shape)
- the RWKV-4a/4b research variants, by their extra keys
- anything else -> RWKV-4

Each registered module provides ``CONFIG`` (its :class:`ModelConfig`
subclass, with ``from_state_dict`` and ``expected_shapes``), ``MODEL`` (the
``nn.Module``), ``FP32_PARAMS``, ``LR_SCALES`` and ``LORA_TARGETS``.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any, Iterable, Mapping

from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError

# generation -> module name under rwkvkit.models
REGISTRY: dict[str, str] = {"4": "rwkv4", "5": "rwkv5", "5.1": "rwkv5", "5.2": "rwkv5", "6": "rwkv6", "7": "rwkv7"}

NICKNAMES = {"4": "RWKV-4", "5": "RWKV-5 (Eagle)", "5.1": "RWKV-5.1 (Eagle)", "5.2": "RWKV-5.2 (Eagle)", "6": "RWKV-6 (Finch)", "7": "RWKV-7 (Goose)"}

_SIGNATURES = (
    # (test on a key, generation label, architecture nickname)
    (lambda k: k.endswith((".att.r_k", ".att.x_r", ".att.x_rwkvag")), "7", "Goose"),
    (lambda k: ".time_maa" in k, "6", "Finch"),
    (lambda k: ".ln_x." in k, "5", "Eagle"),
    (lambda k: ".tiny_" in k or k.startswith("tiny_"), "4a", "tiny attention"),
    (lambda k: re.search(r"\.att\.(qq|kk|vv|oo)\.weight\Z|time_mix_(qq|kk|vv)\Z|att_mask\Z", k) is not None, "4b", "small QKV attention"),
)
_PIP_CONVERTED = ("_strategy", "_version", "_rescale_layer")


def detect(tensors: Mapping[str, Any], non_tensors: Iterable[str] = ()) -> tuple[str, str | None, str]:
    """(generation, evidence key, label) of a state dict with official names.

    ``generation`` is "4", "5", "5.1", "5.2", "6", "7", "4a", "4b" or "pip"
    (a file pre-processed by the `rwkv` package); ``label`` is what a message
    should call it.  The 5.x sub-version is read as the `rwkv` package does:
    ``gate.weight`` -> 5.1, a per-channel 2-D ``time_decay`` -> 5.2.
    """
    for key in list(non_tensors) + list(tensors):
        if key in _PIP_CONVERTED:
            return "pip", key, "a file converted by the `rwkv` pip package"
    keys = sorted(tensors)
    for test, gen, nick in _SIGNATURES:
        hit = next((k for k in keys if test(k)), None)
        if hit is None:
            continue
        if gen == "5":
            if any(k.endswith(".att.gate.weight") for k in keys):
                gen = "5.1"
            td = next((tensors[k] for k in keys if k.endswith(".att.time_decay")), None)
            if td is not None and len(td.shape) > 1 and td.shape[1] > 1:
                gen = "5.2"
        return gen, hit, f"RWKV-{gen} ({nick})"
    return "4", None, "RWKV-4"


def spec(generation: str) -> ModuleType:
    """The module of a supported generation; UnsupportedModelError otherwise."""
    name = REGISTRY.get(str(generation))
    if name is None:
        raise UnsupportedModelError(
            f"RWKV-{generation} is not supported yet; rwkvkit runs {', '.join('RWKV-' + g for g in sorted(REGISTRY))}"
        )
    return importlib.import_module(f"{__name__}.{name}")


def config_from_state_dict(tensors: Mapping[str, Any], generation: str | None = None) -> ModelConfig:
    """The config of the generation the tensors show (or ``generation``), read off their shapes."""
    if generation is None:
        generation = detect(tensors)[0]
    return spec(generation).CONFIG.from_state_dict(tensors)


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A config from config.json: ``generation`` picks the class (old rwkvkit
    folders, the shipped model among them, say ``"version": "4"``)."""
    gen = str(data.get("generation", data.get("version", "4")))
    if gen not in REGISTRY:
        raise CheckpointError(f"config.json names generation {gen!r}; rwkvkit runs {sorted(REGISTRY)}")
    return spec(gen).CONFIG.from_dict(data)


def build(config: ModelConfig):
    """An uninitialised model of ``config``'s generation."""
    return spec(config.generation).MODEL(config)


def spec_of(model) -> ModuleType:
    """The generation module of a built model."""
    return spec(model.config.generation)


__all__ = ["REGISTRY", "detect", "spec", "spec_of", "config_from_state_dict", "config_from_dict", "build", "NICKNAMES"]
