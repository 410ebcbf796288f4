"""Data parallelism under torchrun: which process this is, and sums over all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..common import StageError, pick_device


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_ranks_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


def check_ranks_agree(model: torch.nn.Module, world: int) -> None:
    """Data parallelism keeps every rank's weights equal; a checkpoint must not hide it if they drift."""
    checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    mean = float(all_ranks_sum(torch.tensor([checksum], dtype=torch.float64), world)) / world
    if abs(mean - checksum) > 1e-6 * abs(checksum):
        raise StageError(f"data-parallel ranks hold different weights (checksum {checksum} vs mean {mean})")

