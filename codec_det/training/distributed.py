"""Process-group set-up for ``torchrun`` launches, and the collectives the training loop uses.

``torchrun --nproc_per_node N tool.py ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process. A plain
``python tool.py`` run sets none of them and trains in a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "init_distributed",
    "cleanup_distributed",
    "is_main_process",
    "all_reduce_sum",
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and device of this process; a single-process run is rank 0 of 1.

    Attributes:
        rank: global rank, 0 in a single-process run.
        local_rank: rank on this machine; selects the CUDA device.
        world_size: number of processes.
        device: the device this process trains on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; torchrun sets it") from None


def init_distributed(device: str = "auto") -> DistributedContext:
    """Read the torchrun environment, pick the device and start the process group when needed.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, or
            ``"cuda"``. Under torchrun, CUDA processes use ``cuda:LOCAL_RANK``.

    The backend is NCCL on CUDA and Gloo on CPU. A process group that is
    already initialised is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
        if world_size > 1 or device == "cuda":
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but only {count} CUDA devices are visible; "
                    "start at most one process per GPU (torchrun --nproc_per_node)"
                )
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda")

    context = DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("process group started: backend %s, rank %d of %d, device %s", backend, rank, world_size, device)
    return context


def cleanup_distributed() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Return whether this is rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place and return it; unchanged in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(value: object) -> list[object]:
    """Collect one picklable object from each rank, in rank order; ``[value]`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Copy every buffer of ``module`` (BatchNorm running statistics among them) from rank ``source`` to all ranks.

    After a training step, each rank's running statistics include only its
    own batch. After this call, every rank evaluates and saves the same set.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, source)
