"""The training loop: read it top to bottom.

    setup       processes, device, model (paper init, or a checkpoint; LoRA or
                state tuning), optimiser groups, data, resume
    each step   learning rate -> micro-steps (windows, state carried across
                chunks, L2Wrap, backward) -> clip -> Adam -> log
    sometimes   validation loss, checkpoint (atomic)
    at the end  final checkpoint, OUT/model, OUT/loss.png

A checkpoint is ``OUT/checkpoints/step-NNNNNNNN/`` holding ``model/`` (an
rwkvkit folder that ``rwkvkit.load`` reads; ``adapter/`` for LoRA,
``state.safetensors`` for state tuning) and ``trainer.pt`` (optimiser, step,
RNG states, the trainable tensors of LoRA/state runs).  ``OUT/latest.json``
names the newest one and is replaced only after the folder is complete, so an
interrupted write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RwkvkitError
from ..io_utils import atomic_dir, atomic_path
from ..models.common import RWKVBase
from ..state import MatrixState, State
from . import data as D
from . import distributed as dist_utils
from . import rundir
from .config import TrainConfig
from .optim import build_optimizer, l2wrap, lr_at, model_param_groups, set_lr

# Initial log-scale pp of a learned state (state tuning): a virtual past of
# weight e^-5 and value aa = 0, small next to a real token's e^k.
STATE_TUNE_PP_INIT = -5.0


# ===================================================================== models
class StateTuner(nn.Module):
    """A frozen model plus a trainable initial RNN state (RWKV "state tuning").

    RWKV-4: the WKV part is parameterised as (aa, bb = 1, pp): with bb fixed
    the numerator/denominator pair is always valid (bb > 0) and pp alone sets
    how much weight the learned past carries.  RWKV-5/6/7: every field of the
    matrix state is learned directly (the per-head WKV matrices are what RWKV's
    own state tuning trains).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        template = model.new_state(1)
        self.generation = template.generation
        if isinstance(template, State):
            self.att_x = nn.Parameter(template.att_x.clone())
            self.att_aa = nn.Parameter(template.att_aa.clone())
            self.att_pp = nn.Parameter(torch.full_like(template.att_pp, STATE_TUNE_PP_INIT))
            self.ffn_x = nn.Parameter(template.ffn_x.clone())
        else:
            self.att_x = nn.Parameter(template.att_x.clone())
            self.att_kv = nn.Parameter(template.att_kv.clone())
            self.ffn_x = nn.Parameter(template.ffn_x.clone())

    def initial_state(self, batch: int = 1):
        L = self.att_x.shape[0]
        if hasattr(self, "att_kv"):
            return MatrixState(
                att_x=self.att_x.expand(L, batch, -1),
                att_kv=self.att_kv.expand(L, batch, *self.att_kv.shape[2:]),
                ffn_x=self.ffn_x.expand(L, batch, -1),
                generation=self.generation,
            )
        return State(
            att_x=self.att_x.expand(L, batch, -1),
            att_aa=self.att_aa.expand(L, batch, -1),
            att_bb=torch.ones_like(self.att_aa).expand(L, batch, -1),
            att_pp=self.att_pp.expand(L, batch, -1),
            ffn_x=self.ffn_x.expand(L, batch, -1),
        )

    def forward(self, tokens, state=None, **kw):
        if state is None:
            state = self.initial_state(tokens.shape[0])
        return self.model(tokens, state, **kw)


def _base_model(module: nn.Module) -> nn.Module:
    """The RWKV inside DDP / peft / StateTuner wrappers."""
    m = module
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif isinstance(m, StateTuner):
            m = m.model
        elif hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            return m


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each TimeMix and ChannelMix in the backward pass.

    Their internals (k, v, r, the 4C-wide hidden layer) are most of the
    activation memory; only their inputs are kept.  Done by wrapping the
    sub-modules' forward, so the model code stays untouched.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        for sub in (block.att, block.ffn):
            inner = sub.forward

            def wrapped(*args, _inner=inner):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False)
                return _inner(*args)

            sub.forward = wrapped


def lora_rank_defaults(n_embd: int) -> dict[str, int]:
    """RWKV-7 LoRA ranks of the May-2025 x070 trainer (rwkv5-7 spec 2.4):
    D_w = D_a = max(32, round(1.8 sqrt(C) / 32) * 32), D_v with 1.3 sqrt(C),
    D_g = max(32, round(0.6 C^0.8 / 32) * 32)."""
    C = n_embd

    def r32(x: float) -> int:
        return max(32, int(round(x / 32)) * 32)

    return {"d_decay": r32(1.8 * C**0.5), "d_aaa": r32(1.8 * C**0.5), "d_mv": r32(1.3 * C**0.5), "d_gate": r32(0.6 * C**0.8)}


def model_config(cfg: TrainConfig, vocab_size: int):
    """The ModelConfig of a model trained from scratch (``--generation``)."""
    if cfg.generation == "7":
        from ..models.rwkv7 import RWKV7Config

        ranks = lora_rank_defaults(cfg.n_embd)
        ranks.update({k: getattr(cfg, k) for k in ranks if getattr(cfg, k) > 0})
        # No v0/v1/v2 in layer 0 (it makes v_first and never reads them), as
        # in the x070 trainer: unused parameters would stall DDP.
        return RWKV7Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size, head_size=cfg.head_size,
                           dim_ffn=cfg.dim_ffn, layer0_v_lora=False, **ranks)
    if cfg.generation == "5":
        from ..models.rwkv5 import RWKV5Config

        # 5.2, the released Eagle: the gate, per-channel decay and the raw bonus time_faaaa.
        return RWKV5Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size, head_size=cfg.head_size,
                           dim_att=cfg.dim_att, dim_ffn=cfg.dim_ffn, gate=True, per_channel_decay=True, bonus="time_faaaa")
    if cfg.generation == "6":
        from ..models.rwkv6 import RWKV6Config

        return RWKV6Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size, head_size=cfg.head_size,
                           dim_att=cfg.dim_att, dim_ffn=cfg.dim_ffn, d_mix=cfg.d_mix or 32, d_decay=cfg.d_decay or 64)
    from ..models.rwkv4 import RWKV4Config

    return RWKV4Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size, dim_att=cfg.dim_att, dim_ffn=cfg.dim_ffn)


def _freeze_unused(model: nn.Module) -> None:
    """RWKV-7 files that keep layer 0's v0/v1/v2 (released ones do): the
    forward never reads them, so they get no gradient; frozen, DDP and the
    optimiser do not wait for one."""
    att = model.blocks[0].att
    if getattr(model, "generation", None) == "7" and getattr(att, "has_v_lora", False):
        for name in ("v0", "v1", "v2"):
            getattr(att, name).requires_grad_(False)


def _build_model(cfg: TrainConfig, vocab_size: int, device: torch.device):
    from .. import models
    from ..checkpoint import load
    from ..init import init_weights

    if cfg.init_from:
        model = load(cfg.init_from, dtype=torch.float32)
        # Training runs the exact model: ln0 at run time, no fp16 rescaling.
        model.for_training()
        if model.config.vocab_size < vocab_size:
            raise RwkvkitError(
                f"the data uses token ids up to {vocab_size - 1} but '{cfg.init_from}' has a vocabulary of {model.config.vocab_size}"
            )
    else:
        try:
            mc = model_config(cfg, vocab_size)
        except ValueError as exc:
            raise RwkvkitError(f"--generation {cfg.generation}: {exc}") from None
        model = models.build(mc)
        init_weights(model, seed=cfg.seed, emb_init=cfg.emb_init)
    if model.generation == "7":
        from ..ops.wkv7 import BACKENDS

        if cfg.wkv_backend not in BACKENDS:
            raise RwkvkitError(f"--wkv-backend {cfg.wkv_backend!r}: RWKV-7 has {', '.join(BACKENDS)}")
    elif model.generation in ("5", "5.1", "5.2", "6"):
        from ..ops.wkv6 import BACKENDS as BACKENDS6

        if cfg.wkv_backend not in BACKENDS6:
            raise RwkvkitError(f"--wkv-backend {cfg.wkv_backend!r}: RWKV-{model.generation} has {', '.join(BACKENDS6)}")
    _freeze_unused(model)
    model.to(device)
    model.wkv_backend = cfg.wkv_backend
    if cfg.grad_checkpoint:
        enable_gradient_checkpointing(model)
    if cfg.tune == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise RwkvkitError("--tune lora needs the peft library: pip install 'rwkvkit[train]' (or pip install peft)") from None
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or list(models.spec_of(model).LORA_TARGETS)
        lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
        try:
            model = get_peft_model(model, lc)
        except ValueError as exc:
            raise RwkvkitError(f"--lora-targets {','.join(targets)!r}: {str(exc).splitlines()[0]}") from None
    elif cfg.tune == "state":
        model = StateTuner(model)
    return model


# ======================================================================= state
def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _save_model(model: nn.Module, folder: Path) -> None:
    """An rwkvkit folder for RWKV models; model.pt (a state dict) for the custom
    models :func:`train` also accepts (e.g. a baseline Transformer)."""
    from ..checkpoint import save

    if isinstance(model, RWKVBase):
        save(model, folder)
    else:
        with atomic_dir(folder) as tmp:
            torch.save(model.state_dict(), tmp / "model.pt")


def _save_model_state(model: nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """:func:`_save_model` from a gathered state dict (FSDP) instead of the live model."""
    from .. import models

    if isinstance(model, RWKVBase):
        with torch.device("meta"):
            copy = models.build(model.config)
        copy.load_state_dict(sd, assign=True)  # the gathered CPU tensors, no second copy
        _save_model(copy, folder)
    else:
        with atomic_dir(folder) as tmp:
            torch.save(sd, tmp / "model.pt")


def _read_model_weights(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    from ..checkpoint import load

    if isinstance(model, RWKVBase):
        return load(folder, dtype=torch.float32).state_dict()
    return torch.load(folder / "model.pt", map_location="cpu")


def _load_model_weights(model: nn.Module, folder: Path) -> None:
    model.load_state_dict(_read_model_weights(model, folder))


def save_checkpoint(out: Path, step: int, module: nn.Module, optimizer, cfg: TrainConfig, extra: dict,
                    full: tuple[dict, dict] | None = None) -> Path:
    """Write ``OUT/checkpoints/step-N`` atomically, then point latest.json at it.

    ``full``: the (model, optimiser) state dicts gathered from an FSDP run
    (:func:`distributed.full_state_dicts`), written instead of the live ones.
    """
    base = _base_model(module)
    folder = out / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(folder) as tmp:
        if full is not None:
            _save_model_state(base, full[0], tmp / "model")
        elif cfg.tune == "full":
            _save_model(base, tmp / "model")
        elif cfg.tune == "lora":
            _unwrap_parallel(module).save_pretrained(str(tmp / "adapter"))
        else:
            _state_tuner(module).initial_state(1).detach().save(tmp / "state.safetensors")
        torch.save(
            {
                "step": step,
                "optimizer": full[1] if full is not None else optimizer.state_dict(),
                "parallel": "fsdp" if full is not None else "ddp",
                "rng": _rng_state(),
                "config": cfg.to_dict(),
                # Weights of a full run live in model/; LoRA and state runs keep
                # their (small) trainable tensors here.
                "trainable": None if cfg.tune == "full" else _trainable(_unwrap_parallel(module)),
                **extra,
            },
            tmp / "trainer.pt",
        )
    with atomic_path(out / "latest.json") as tmp:
        tmp.write_text(json.dumps({"step": step, "path": str(folder.relative_to(out))}) + "\n")
    kept = sorted((out / "checkpoints").glob("step-*"))
    for old in kept[: max(0, len(kept) - max(1, cfg.keep_checkpoints))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _unwrap_parallel(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, (nn.parallel.DistributedDataParallel,)) else module


def _state_tuner(module: nn.Module) -> StateTuner:
    m = _unwrap_parallel(module)
    assert isinstance(m, StateTuner)
    return m


def load_checkpoint(out: Path, module: nn.Module, optimizer, cfg: TrainConfig, fsdp: bool = False) -> dict:
    """Restore weights, optimiser and RNG from ``OUT/latest.json``; returns trainer.pt.

    ``fsdp``: ``module`` is sharded; every process reads the whole checkpoint
    and keeps its shard (OUT must be on a file system all processes see)."""
    latest = out / "latest.json"
    if not latest.is_file():
        raise RwkvkitError(f"--resume: '{out}' has no latest.json (no checkpoint was written there)")
    info = json.loads(latest.read_text())
    folder = out / info["path"]
    if not (folder / "trainer.pt").is_file():
        raise RwkvkitError(f"--resume: checkpoint '{folder}' is incomplete (no trainer.pt)")
    st = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
    if st["config"].get("tune") != cfg.tune:
        raise RwkvkitError(f"--resume: the checkpoint was trained with --tune {st['config'].get('tune')}, this run asks for {cfg.tune}")
    saved_fsdp = st.get("parallel") == "fsdp"
    if saved_fsdp != fsdp:
        raise RwkvkitError(
            f"--resume: the checkpoint was written by a {'--parallel fsdp' if saved_fsdp else 'non-FSDP'} run; "
            f"resume it the same way (its optimiser state is stored {'by parameter name' if saved_fsdp else 'by parameter index'})"
        )
    if fsdp:
        from . import distributed as dist_utils

        dist_utils.load_full_state_dicts(module, optimizer, _read_model_weights(_base_model(module), folder / "model"), st["optimizer"])
        _set_rng_state(st["rng"])
        return st
    inner = _unwrap_parallel(module)
    with torch.no_grad():
        if cfg.tune == "full":
            _load_model_weights(_base_model(inner), folder / "model")
        else:
            params = dict(inner.named_parameters())
            for name, t in st["trainable"].items():
                params[name].copy_(t)
    optimizer.load_state_dict(st["optimizer"])
    _set_rng_state(st["rng"])
    return st


# ================================================================== the step
def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sequence_loss(module, batch, cfg: TrainConfig, device, *, train: bool, sync: bool = True, scale: float = 1.0):
    """Mean cross-entropy of ``batch`` [B, ctx_len * chunks + 1], running the
    chunks in order with the state carried; in training it also back-propagates
    (per chunk when the state is detached, once at the end otherwise)."""
    x_all, y_all = batch[:, :-1].to(device), batch[:, 1:].to(device)
    chunks = cfg.bptt_chunks
    T = cfg.ctx_len
    state = None
    losses = []
    pending = []
    ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    for c in range(chunks):
        x, y = x_all[:, c * T : (c + 1) * T], y_all[:, c * T : (c + 1) * T]
        last = c == chunks - 1
        # DDP all-reduces during the last backward of the step only; the
        # earlier ones accumulate locally.
        no_sync = ddp and train and not (sync and last)
        ctx = module.no_sync() if no_sync else contextlib.nullcontext()
        with ctx:
            with _autocast(device, cfg.precision):
                logits, state = module(x, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            losses.append(loss.detach())
            if train:
                obj = l2wrap(loss, logits, cfg.l2wrap) * (scale / chunks)
                if cfg.bptt_detach:
                    obj.backward()
                    state = state.detach() if state is not None else None
                else:
                    pending.append(obj)
        if not train and state is not None:
            state = state.detach()
    if train and pending:
        torch.stack(pending).sum().backward()
    return torch.stack(losses)


@torch.no_grad()
def evaluate(module, val: D.TokenData, cfg: TrainConfig, device, info: dist_utils.DistInfo) -> dict[str, float]:
    """Mean validation loss (nats/token), overall and per chunk of the window."""
    window = cfg.ctx_len * cfg.bptt_chunks + 1
    offs = D.val_windows(len(val), window, cfg.val_windows)
    if len(offs) == 0:
        return {}
    mine = offs[info.rank :: info.world_size]
    was_training = module.training
    module.eval()
    total = torch.zeros(cfg.bptt_chunks, dtype=torch.float64)
    count = 0
    for i in range(0, len(mine), cfg.batch_size):
        batch = D.get_batch(val, mine[i : i + cfg.batch_size], window)
        per_chunk = _sequence_loss(module, batch, cfg, device, train=False)
        total += per_chunk.double().cpu() * len(batch)
        count += len(batch)
    module.train(was_training)
    # Sums and counts over all processes (their shares may differ by one window).
    sums = dist_utils.sum_across(torch.cat([total, torch.tensor([float(count)], dtype=torch.float64)]), info, device)
    per = (sums[:-1] / sums[-1]).tolist()
    out = {"val_loss": float(np.mean(per))}
    if cfg.bptt_chunks > 1:
        out["val_loss_chunks"] = per
    return out


# ===================================================================== train
class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now (checkpoints stay intact)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _pick_device(cfg: TrainConfig, info: dist_utils.DistInfo) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        name = f"cuda:{info.local_rank}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RwkvkitError(f"--device {cfg.device!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RwkvkitError("--device cuda: no CUDA GPU is available")
    return dev


def train(cfg: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary of the run.

    Works in one process, or in each process that torchrun starts.  ``model``
    replaces the RWKV built from ``cfg`` with any module called as
    ``logits, state = model(tokens, state)`` (a baseline for comparisons, run
    through exactly the same loop); it is saved as a plain state dict.
    """
    rundir.check_out(cfg)
    if cfg.resume and not getattr(cfg, "_resumed", False):
        cfg = rundir.resume_config(cfg)  # the run folder's options (the CLI merges exactly what was given)
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = dist_utils.setup(device_name)
    try:
        return _train(cfg, info, model)
    finally:
        dist_utils.cleanup(info)


def _train(cfg: TrainConfig, info: dist_utils.DistInfo, custom: nn.Module | None = None) -> dict[str, Any]:
    device = _pick_device(cfg, info)
    if cfg.precision == "auto":
        cfg.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.batch_size % info.world_size:
        raise RwkvkitError(f"--batch-size {cfg.batch_size} does not divide over {info.world_size} processes")
    local_bs = cfg.batch_size // info.world_size
    out = Path(cfg.out)
    main = info.is_main

    # ---- data
    train_data = D.load_tokens(cfg.data, "train", cfg.vocab_size or None)
    try:
        val_data = D.load_tokens(cfg.data, "val", cfg.vocab_size or None)
    except RwkvkitError:
        val_data = None  # binidx: no held-out split
    if val_data is not None and len(val_data) == 0:
        val_data = None
    window = cfg.ctx_len * cfg.bptt_chunks + 1
    tokens_per_step = cfg.batch_size * cfg.grad_accum * (window - 1)

    # ---- model and optimiser
    torch.manual_seed(cfg.seed)
    if custom is not None:
        if cfg.tune != "full" or cfg.init_from:
            raise RwkvkitError("a custom model is trained as given: no --init-from or --tune")
        model = custom.to(device)
    else:
        model = _build_model(cfg, train_data.vocab_size, device)
    model.train()
    # FSDP replaces the parameters by sharded ones: shard before the optimiser sees them.
    fsdp = info.enabled and cfg.parallel == "fsdp"
    if fsdp:
        model = dist_utils.wrap(model, info, "fsdp")
    groups = model_param_groups(model, cfg.weight_decay, cfg.layerwise_lr)
    if not groups:
        raise RwkvkitError("nothing to train: every parameter is frozen")
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, cfg.lr_init, (cfg.beta1, cfg.beta2), cfg.adam_eps)
    n_trainable = sum(p.numel() for p in params)

    # ---- resume
    start_step, elapsed0, tokens0 = 0, 0.0, 0
    if cfg.resume:
        st = load_checkpoint(out, model, optimizer, cfg, fsdp=fsdp)
        start_step, elapsed0, tokens0 = st["step"], st.get("elapsed", 0.0), st.get("tokens", 0)
    module = model if fsdp else dist_utils.wrap(model, info)

    metrics_path = out / "metrics.jsonl"
    if main:
        if cfg.overwrite:
            rundir.clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics = open(metrics_path, "a") if main else None

    def log(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not (main and cfg.progress), dynamic_ncols=True)
    t_start = time.perf_counter()
    step = start_step
    ran = 0
    last_val: dict[str, float] = {}
    stop_reason = "done"
    full = None  # FSDP: the last gathered (model, optimiser) state
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, lr_init=cfg.lr_init, lr_final=cfg.lr_final, total_steps=cfg.max_steps,
                       warmup_steps=cfg.warmup_steps, hold_steps=cfg.hold_steps, schedule=cfg.schedule)
            set_lr(optimizer, lr)

            # ---- forward / backward over the micro-steps of this step
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro in range(cfg.grad_accum):
                offs = D.window_offsets(len(train_data), window, cfg.batch_size, cfg.seed, step, micro)
                mine = offs[info.rank * local_bs : (info.rank + 1) * local_bs]
                batch = D.get_batch(train_data, mine, window)
                losses = _sequence_loss(module, batch, cfg, device, train=True,
                                        sync=micro == cfg.grad_accum - 1, scale=1.0 / cfg.grad_accum)
                step_loss += losses.double().mean().cpu() / cfg.grad_accum

            # ---- clip, update
            if cfg.grad_clip > 0:
                grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:
                grad_norm = _as_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ran += 1

            # ---- log
            loss = dist_utils.mean_across(float(step_loss), info, device)
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": tokens0 + ran * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
                   "elapsed_s": elapsed0 + time.perf_counter() - t_start}
            if not math.isfinite(loss):
                log(row)
                raise RwkvkitError(f"the loss became {loss} at step {step}; lower --lr-init or use --precision fp32")
            if val_data is not None and (step == cfg.max_steps or (cfg.val_every > 0 and step % cfg.val_every == 0)):
                last_val = evaluate(module, val_data, cfg, device, info)
                row.update(last_val)
            log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", **({"val": f"{last_val['val_loss']:.4f}"} if last_val else {}))

            # ---- stop requests, checkpoints
            want_stop = stop.requested
            if cfg.stop_after and ran >= cfg.stop_after:
                want_stop = True
            if cfg.time_limit and time.perf_counter() - t_start >= cfg.time_limit * 60:
                want_stop = True
            want_stop = dist_utils.any_across(want_stop, info, device)
            if want_stop and step < cfg.max_steps:
                stop_reason = "interrupted" if stop.requested else "stopped"
            periodic = cfg.save_every > 0 and step % cfg.save_every == 0
            if periodic or want_stop or step == cfg.max_steps:
                # FSDP: gathering the whole state is a collective, on every process.
                full = dist_utils.full_state_dicts(module, optimizer) if fsdp else None
                if main:
                    save_checkpoint(out, step, module, optimizer, cfg,
                                    {"elapsed": row["elapsed_s"], "tokens": row["tokens"]}, full=full)
                if info.enabled:
                    torch.distributed.barrier()
            if want_stop:
                break
    bar.close()
    if metrics is not None:
        metrics.close()

    summary = {"rank": info.rank, "steps": step, "stop": stop_reason, "trainable_params": n_trainable, "out": str(out), **last_val}
    if step == cfg.max_steps:
        if fsdp and full is None:  # a resumed run that had no step left
            full = dist_utils.full_state_dicts(module, optimizer)
        if main:
            _export(out, module, cfg, full[0] if fsdp else None)
            if cfg.plot:
                plot_metrics(metrics_path, out / "loss.png")
    return summary


def _as_float(norm: torch.Tensor) -> float:
    """A gradient norm as a float (FSDP returns it as a DTensor)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop rows a resumed run will write again (steps after its checkpoint)."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    # A line cut short by a crash is dropped with the rows after the checkpoint.
    rows = [r for r in rundir.read_metrics(path) if r.get("step", 0) <= start_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _export(out: Path, module: nn.Module, cfg: TrainConfig, full_sd: dict | None = None) -> None:
    """The usable result: OUT/model (rwkvkit folder), OUT/adapter, OUT/state.safetensors.
    ``full_sd``: the gathered weights of an FSDP run."""
    from ..checkpoint import save

    inner = _unwrap_parallel(module)
    if full_sd is not None:
        _save_model_state(_base_model(inner), full_sd, out / "model")
    elif cfg.tune == "full":
        _save_model(_base_model(inner), out / "model")
    elif cfg.tune == "lora":
        inner.save_pretrained(str(out / "adapter"))
        if cfg.merge_lora:
            merged = inner.merge_and_unload()
            save(merged, out / "model")
    else:
        inner.initial_state(1).detach().save(out / "state.safetensors")


def plot_metrics(metrics_path: Path, png: Path) -> Path | None:
    """Draw training and validation loss against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("rwkvkit train: matplotlib is not installed, skipping the loss plot (pip install 'rwkvkit[train]')")
        return None
    rows = rundir.read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png
