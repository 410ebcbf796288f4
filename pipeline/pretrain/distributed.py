"""Data parallelism under torchrun: which process this is, and the collectives every rank joins. A collective's
tensors must lie where its backend works: the rank's GPU under NCCL, the CPU under gloo; every collective of
pre-training goes through the helpers here, which put them there (tests/test_gpu.py runs them under NCCL)."""

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


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over the ranks, where `values` lies."""
    if world == 1:
        return values
    moved = values.to(collective_device())
    dist.all_reduce(moved)
    return moved.to(values.device)


def first_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """Rank 0's values on every rank (its decisions: checkpoint now, stop)."""
    if world == 1:
        return values
    moved = values.to(collective_device())
    dist.broadcast(moved, src=0)
    return moved.to(values.device)


def check_ranks_agree(model: torch.nn.Module, world: int) -> None:
    """Data parallelism keeps every rank's weights equal; a checkpoint must not hide it if they drift."""
    checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    mean = float(all_ranks_sum(torch.tensor([checksum], dtype=torch.float64), world)) / world
    if abs(mean - checksum) > 1e-6 * abs(checksum):
        raise StageError(f"data-parallel ranks hold different weights (checksum {checksum} vs mean {mean})")

