"""Every option of ``rwkvkit train``, in one dataclass.

The command line, ``--config FILE.json|.toml`` and the Python API all fill the
same :class:`TrainConfig`; each field's ``help`` is what ``rwkvkit train
--help`` prints.  Precedence: defaults < config file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import RwkvkitError

# Generations `rwkvkit train` builds from scratch.
GENERATIONS = ("4", "5", "6", "7")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ------------------------------------------------------------- data / output
    data: str = _f("", "prepared token folder (from `rwkvkit prepare`) or a Megatron binidx pair", group="data", metavar="PATH")
    out: str = _f("", "output folder: checkpoints/, model/, metrics.jsonl, loss.png", group="data", metavar="DIR")
    vocab_size: int = _f(0, "vocabulary size; only needed for binidx data (prepared data records it)", group="data")
    # -------------------------------------------------------------------- model
    generation: str = _f("4", "RWKV generation of a model trained from scratch: 4, 5 (Eagle 5.2, the x052 trainer's init), 6 (Finch, x060) or 7 (Goose, x070); with --init-from the checkpoint's own generation is used", group="model", choices=GENERATIONS)
    n_layer: int = _f(6, "blocks of a model trained from scratch", group="model")
    n_embd: int = _f(512, "width of a model trained from scratch", group="model")
    dim_att: int = _f(0, "RWKV-4/5/6 time-mix width (0 = n_embd; RWKV-7 has none: its time mix is n_embd wide)", group="model")
    dim_ffn: int = _f(0, "channel-mix hidden width (0 = 4 n_embd for RWKV-4/7; 3.5 n_embd rounded down to 32 for RWKV-5/6, as their trainers)", group="model")
    head_size: int = _f(64, "RWKV-5/6/7 channels per head (64 in every released model); must divide n_embd (use a smaller one for tiny widths)", group="model")
    d_decay: int = _f(0, "LoRA rank of the decay: RWKV-7 w (0 = the x070 trainer's max(32, round(1.8 sqrt(n_embd) / 32) * 32)), RWKV-6 time_decay_w1/w2 (0 = 64, the x060 trainer)", group="model")
    d_aaa: int = _f(0, "RWKV-7 LoRA rank of the in-context learning rate a (0 = max(32, round(1.8 sqrt(n_embd) / 32) * 32))", group="model")
    d_mv: int = _f(0, "RWKV-7 LoRA rank of the value residual v (0 = max(32, round(1.3 sqrt(n_embd) / 32) * 32))", group="model")
    d_mix: int = _f(0, "RWKV-6 LoRA rank of the data-dependent token shift time_maa_w1/w2 (0 = 32, the x060 trainer)", group="model")
    d_gate: int = _f(0, "RWKV-7 LoRA rank of the output gate g (0 = max(32, round(0.6 n_embd^0.8 / 32) * 32))", group="model")
    emb_init: str = _f("uniform", "RWKV-4 embedding init: uniform U(+-1e-4) (paper), normal, orthogonal (v4 trainer); RWKV-7 always uses U(+-1e-4)", group="model", choices=("uniform", "normal", "orthogonal"))
    init_from: str = _f("", "start from this checkpoint (any format rwkvkit.load reads, any generation) instead of the official init", group="model", metavar="CHECKPOINT")
    # ------------------------------------------------------------------- tuning
    tune: str = _f("full", "what to train: full (all weights), lora (peft adapters), state (only the initial RNN state)", group="tuning", choices=("full", "lora", "state"))
    lora_r: int = _f(8, "LoRA rank", group="tuning")
    lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r)", group="tuning")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input", group="tuning")
    lora_targets: str = _f(
        "",
        "comma-separated Linear layers (name suffixes) that get LoRA adapters; empty = the generation's projections "
        "(RWKV-4: att.key,att.value,att.receptance,att.output,ffn.key,ffn.value,ffn.receptance; RWKV-7: the same without ffn.receptance, which it lacks)",
        group="tuning",
        metavar="NAMES",
    )
    merge_lora: bool = _f(False, "at the end, merge the adapters and write a plain checkpoint to OUT/model", group="tuning")
    # --------------------------------------------------------------------- data
    ctx_len: int = _f(512, "tokens per training window (one forward pass)", group="batch")
    bptt_chunks: int = _f(1, "windows per sample, run in order with the RNN state carried from one to the next (truncated BPTT); the sample is ctx_len * bptt_chunks tokens", group="batch")
    bptt_detach: bool = _f(True, "detach the carried state between windows (back-propagate within a window only); --no-bptt-detach back-propagates through the whole sample", group="batch")
    batch_size: int = _f(8, "sequences per micro-step, over all processes (must divide by the process count)", group="batch")
    grad_accum: int = _f(1, "micro-steps accumulated per optimiser step", group="batch")
    # ---------------------------------------------------------------- optimiser
    max_steps: int = _f(1000, "optimiser steps of the whole run (the schedule ends here)", group="optim")
    lr_init: float = _f(6e-4, "peak learning rate", group="optim")
    lr_final: float = _f(1e-5, "learning rate of the last step", group="optim")
    warmup_steps: int = _f(0, "steps of warm-up: the rate is scaled by 0.2 + 0.8 step / warmup_steps (RWKV-LM v4neo)", group="optim")
    hold_steps: int = _f(0, "steps at lr_init before the decay starts (the paper's constant phase)", group="optim")
    schedule: str = _f("exp", "decay from lr_init to lr_final: exp (RWKV-LM v4neo), cosine, constant", group="optim", choices=("exp", "cosine", "constant"))
    beta1: float = _f(0.9, "Adam beta1", group="optim")
    beta2: float = _f(0.99, "Adam beta2 (the paper's 0.99)", group="optim")
    adam_eps: float = _f(1e-8, "Adam epsilon (RWKV-LM uses 1e-8 for RWKV-4/5/6 and 1e-18 for RWKV-7: pass --adam-eps 1e-18 to follow the x070 trainer)", group="optim")
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW) on matrices only (RWKV-5/6/7: the 2-D .weight matrices, not their LoRAs); 0 = plain Adam as in the paper", group="optim")
    layerwise_lr: bool = _f(True, "per-generation learning-rate multipliers: RWKV-4 time_decay 2x and time_first 3x (RWKV-LM v4neo); RWKV-5/6 time_decay 2x, time_first 3x, time_faaaa and the LoRAs 1x (x052/x060 configure_optimizers); RWKV-7 att.w0 2x (x070 trainer)", group="optim")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", group="optim")
    l2wrap: float = _f(1e-4, "factor of the L2Wrap auxiliary gradient on the largest logit (0 = off)", group="optim")
    # -------------------------------------------------------------------- speed
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", group="speed", metavar="DEVICE")
    precision: str = _f("auto", "fp32, or bf16 autocast; auto = bf16 on CUDA GPUs that support it, fp32 on CPU", group="speed", choices=("auto", "fp32", "bf16"))
    grad_checkpoint: bool = _f(False, "recompute time-mix and channel-mix activations in the backward pass (less memory, about a third more compute)", group="speed")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)", group="speed")
    wkv_backend: str = _f("auto", "WKV implementation: auto, cpu, torch, cuda, reference (every generation; auto picks the fastest here)", group="speed", metavar="NAME")
    parallel: str = _f("ddp", "under torchrun: ddp (every process holds all weights) or fsdp (weights, gradients and optimiser state sharded over the processes, for models that do not fit one device; full training only)", group="speed", choices=("ddp", "fsdp"))
    # ----------------------------------------------------------------- schedule
    seed: int = _f(0, "seed of the initial weights and of the data order", group="run")
    val_every: int = _f(100, "steps between validation passes (0 = only at the end)", group="run")
    val_windows: int = _f(64, "validation windows (of ctx_len * bptt_chunks tokens) per pass", group="run")
    save_every: int = _f(500, "steps between checkpoints (0 = only at the end)", group="run")
    keep_checkpoints: int = _f(2, "checkpoints kept in OUT/checkpoints (older ones are deleted)", group="run")
    resume: bool = _f(False, "continue from the last checkpoint in OUT (weights, optimiser, schedule, data position, RNG) with the run's saved options; flags given again must agree, except how it runs (--max-steps, --device, --precision, --threads, --wkv-backend, saving, validation, progress)", group="run")
    overwrite: bool = _f(False, "start a new run in an --out that holds a previous one, deleting its checkpoints, metrics and model (without it such an --out is refused)", group="run")
    stop_after: int = _f(0, "end this invocation (with a checkpoint) after this many steps; --resume continues", group="run")
    time_limit: float = _f(0.0, "end this invocation (with a checkpoint) after this many minutes (0 = no limit)", group="run")
    progress: bool = _f(True, "show a progress bar", group="run")
    plot: bool = _f(True, "draw OUT/loss.png at the end (needs matplotlib)", group="run")

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not self.data:
            raise RwkvkitError("no training data: pass --data FOLDER (made by `rwkvkit prepare`)")
        if not self.out:
            raise RwkvkitError("no output folder: pass --out FOLDER")
        for name in ("ctx_len", "bptt_chunks", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise RwkvkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, f in _fields().items():
            choices = f.metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                raise RwkvkitError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.lr_init <= 0 or self.lr_final <= 0:
            raise RwkvkitError(f"learning rates must be > 0, got lr_init={self.lr_init}, lr_final={self.lr_final}")
        if self.tune in ("lora", "state") and not self.init_from:
            raise RwkvkitError(f"--tune {self.tune} fine-tunes an existing model: pass --init-from CHECKPOINT")
        if self.merge_lora and self.tune != "lora":
            raise RwkvkitError("--merge-lora needs --tune lora")
        if not self.init_from:
            self._validate_shape()
        if self.parallel == "fsdp" and self.tune != "full":
            raise RwkvkitError(f"--parallel fsdp shards full training only; --tune {self.tune} trains a few small tensors: use ddp")

    def _validate_shape(self) -> None:
        """Checks of a from-scratch model, only of the options its generation has."""
        for name in ("n_layer", "n_embd"):
            if getattr(self, name) < 1:
                raise RwkvkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("dim_ffn", "dim_att", "d_decay", "d_aaa", "d_mv", "d_gate", "d_mix"):
            if getattr(self, name) < 0:
                raise RwkvkitError(f"--{name.replace('_', '-')} must be >= 0 (0 = the default), got {getattr(self, name)}")
        if self.generation == "7":
            if self.dim_att not in (0, self.n_embd):
                raise RwkvkitError(f"--dim-att {self.dim_att}: RWKV-7's time mix is n_embd ({self.n_embd}) wide; leave --dim-att at 0")
            if self.head_size < 1 or self.n_embd % self.head_size:
                raise RwkvkitError(
                    f"--head-size {self.head_size} must divide --n-embd {self.n_embd} (RWKV-7 has n_embd / head_size heads)"
                )
        if self.generation in ("5", "6"):
            width = self.dim_att or self.n_embd
            if self.head_size < 1 or width % self.head_size:
                raise RwkvkitError(
                    f"--head-size {self.head_size} must divide the time-mix width {width} "
                    f"(RWKV-{self.generation} has dim_att / head_size heads; --dim-att 0 = --n-embd)"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a .json or .toml file (keys with dashes or underscores; a
    toml file may put them under a ``[train]`` table)."""
    p = Path(path)
    if not p.is_file():
        raise RwkvkitError(f"config file '{p}' does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise RwkvkitError("reading .toml config files on Python 3.10 needs `pip install tomli`") from None
        try:
            data = tomllib.loads(text)
        except Exception as exc:
            raise RwkvkitError(f"config file '{p}' is not valid TOML: {exc}") from None
        data = data.get("train", data)
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RwkvkitError(f"config file '{p}' is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    else:
        raise RwkvkitError(f"config file '{p}' must end in .json or .toml")
    if not isinstance(data, dict):
        raise RwkvkitError(f"config file '{p}' must hold a table of options")
    return normalise_keys(data, str(p))


def normalise_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = _fields()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise RwkvkitError(f"{source}: unknown option {key!r}; see `rwkvkit train --help`")
        out[name] = value
    return out


def make_config(file_values: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a config file's values overridden by ``overrides``
    (None values in ``overrides`` mean "not given")."""
    values = dict(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("generation"), int) and not isinstance(values["generation"], bool):
        values["generation"] = str(values["generation"])  # `generation = 7` in a config file
    known = _fields()
    for name, value in values.items():
        default = known[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RwkvkitError(f"option {name} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(default, bool) and type(default) in (int, str) and not isinstance(value, type(default)):
            raise RwkvkitError(f"option {name} must be a {type(default).__name__}, got {value!r}")
    return TrainConfig(**values)
