"""torchrun support: one process per device, gloo on CPU, NCCL on GPU.

`.venv/bin/torchrun --nproc_per_node 2 -m oal_trainer.cli fit ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_distributed` reads them. Without them the run is a single process and nothing here
does anything. What runs where:
- every rank: its share of the ID rows (DistributedSampler) and its own outlier draw (shards split by
  node, seeds per rank); gradients are averaged by DistributedDataParallel;
- rank 0 only: log lines, progress, checkpoints, the teacher cache file, final weights and evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from oal_shared.errors import ConfigError, OALError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for, but CUDA is not available here")
    return device


def init_distributed(device_name: str) -> DistContext:
    """A DistContext from torchrun's environment; joins the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("Rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around the student when there is more than one rank."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_across_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean of each logged number over ranks (the log line then speaks for the whole run)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= ctx.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


class ReplicaDivergenceError(OALError, RuntimeError):
    """Ranks ended with different weights: a gradient was not averaged somewhere."""


def check_replicas_agree(modules: dict[str, nn.Module], ctx: DistContext) -> None:
    """Every rank must hold the same parameters after training; compares per-module checksums."""
    if not ctx.enabled:
        return
    names = sorted(modules)
    sums = [sum(float(p.detach().double().sum()) for p in modules[name].parameters()) for name in names]
    local = torch.tensor(sums, dtype=torch.float64, device=ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        differing = [name for name, a, b in zip(names, local.tolist(), other.tolist(), strict=True) if a != b]
        if differing:
            raise ReplicaDivergenceError(
                f"rank {ctx.rank} and rank {rank} hold different weights for {', '.join(differing)}"
            )


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank0_first(ctx: DistContext, build: Callable[[bool], Any]) -> Any:
    """build(write=True) on rank 0, then build(write=False) on the others once rank 0's cache file exists."""
    result = build(True) if ctx.is_main else None
    barrier(ctx)
    return result if ctx.is_main else build(False)
