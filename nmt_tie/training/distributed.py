"""torch.distributed set-up for `torchrun` (DDP): NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nmt_tie.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def gpu_for_local_rank(local_rank: int, visible: int) -> int:
    """The GPU index of this process among the `visible` ones.

    torchrun starts one process per GPU and numbers them by LOCAL_RANK; a scheduler that gives
    each process its own single GPU (CUDA_VISIBLE_DEVICES per task, as Slurm's --gpus-per-task)
    leaves one visible GPU, index 0, whatever the LOCAL_RANK."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise UserError(
        f"process LOCAL_RANK {local_rank} has no GPU of its own: {visible} are visible; "
        f"start at most {visible} processes per node (torchrun --nproc_per_node {visible})"
    )


def init_distributed(requested: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any); return this
    process's place in it and its device. The GPU is chosen and made current before the group
    is created, so that NCCL binds each rank to its own GPU from the start."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), requested
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = requested
    if requested.type == "cuda":
        device = torch.device("cuda", gpu_for_local_rank(info.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return info, device


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    """The sum over all workers (a collective and a host-device synchronization)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's object on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's object, on every rank, in rank order."""
    if not info.enabled:
        return [obj]
    boxes: list[Any] = [None] * info.world_size
    dist.all_gather_object(boxes, obj)
    return boxes


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
