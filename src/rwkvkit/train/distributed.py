"""Data-parallel training on ``torch.distributed``.

``torchrun --nproc_per_node N -m rwkvkit train ...`` starts N copies of the
trainer; torchrun tells each one its rank through its launch protocol
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, read here only to detect that we
were launched that way).  Across nodes the same command works with torchrun's
own rendezvous flags.  CPU runs use the gloo backend, CUDA runs nccl.

Every process draws the same global batch (see :func:`rwkvkit.train.data.window_offsets`)
and keeps its own rows; DDP averages the gradients, so N processes with
per-process batch b compute the same update as one process with batch N*b.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def setup(device: str) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo(rank, world, local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, backend)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(x: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a scalar over all processes (for logging)."""
    if not info.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def sum_across(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over all processes."""
    if not info.enabled:
        return t
    d = t.to(device)
    dist.all_reduce(d, op=dist.ReduceOp.SUM)
    return d.cpu()


def any_across(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process if it is true on one (a stop request)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap(model: torch.nn.Module, info: DistInfo, mode: str = "ddp") -> torch.nn.Module:
    """DDP (replicated weights, gradients all-reduced) around ``model``, or
    FSDP (``mode="fsdp"``, PyTorch's ``fully_shard``): each block's
    time-mix and channel-mix (all of its matrices) is one shard unit, the
    rest (embedding, head, the LayerNorms) the root's.  A unit's weights are
    gathered just for its forward and backward, and each process keeps and
    updates only its shard of weights, gradients and Adam state.  (Not whole
    blocks: the model calls block 0's ``ln0`` outside the block's forward.)
    Other models are sharded as one unit.  FSDP changes the model in place
    and returns it."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            for name in ("att", "ffn"):
                if isinstance(getattr(block, name, None), torch.nn.Module):
                    fully_shard(getattr(block, name))
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def full_state_dicts(module: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The whole model and optimiser state of a sharded (FSDP) module, on the
    CPU of every process, keyed by parameter name.  A collective: every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts), get_optimizer_state_dict(module, optimizer, options=opts)


def load_full_state_dicts(module: torch.nn.Module, optimizer, model_sd: dict | None, optim_sd: dict | None) -> None:
    """Inverse of :func:`full_state_dicts`: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    if model_sd is not None:
        set_model_state_dict(module, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(module, optimizer, optim_sd, options=opts)
