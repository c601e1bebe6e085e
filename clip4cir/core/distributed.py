"""Scale-out training with torchrun (DistributedDataParallel): process-group set-up from torchrun's environment,
the global-batch gather of the contrastive loss, and helpers that keep side effects on rank 0.

Launch: ``torchrun --nproc_per_node N -m clip4cir train ...`` (and across machines with ``--nnodes`` and a
rendezvous endpoint); without torchrun everything runs as one process.
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from clip4cir.core.device import resolve_device
from clip4cir.core.errors import ModelError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ModelError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("CLIP4CIR_DIST_TIMEOUT", "30"))))
    return Dist(rank, world_size, local_rank), device


def run_distributed(work: Callable[[Dist, torch.device], int], device: str = "auto") -> int:
    """Join the torchrun job if there is one, run ``work(dist, device)``, and leave the process group."""
    ddp, resolved = init_distributed(resolve_device(device))
    try:
        return work(ddp, resolved)
    finally:
        shutdown()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (gradients flow back to each rank's own rows), and where this rank's start.
    Every rank must pass the same number of rows (the samplers drop the last partial batch)."""
    if not active():
        return tensor, 0
    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(tensor.contiguous())
    return torch.cat(parts), dist.get_rank() * tensor.shape[0]


def mean_over_ranks(value: float) -> float:
    """The average of a number over all ranks (for logging the global loss)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (e.g. RNG states, so a resume restores each rank's own)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
