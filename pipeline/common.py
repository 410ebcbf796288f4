"""Small helpers every stage uses: errors, logging, seeds, devices, hashing.

Writing outputs safely and verifying inputs lives in pipeline.data.integrity; models and tokenizers in
pipeline.models; the command line in pipeline.cli."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from typing import Any

import numpy as np

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A clear, user-facing failure of a stage (bad input, missing model, ...). Such a failure repeats on every
    attempt, so a retried job stops at once (pipeline/cli.py), unless it is `transient`: caused by the machine
    (a full disk, no GPU on this node, another writer of the same output), which a later attempt may not meet."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def nvidia_gpus() -> int:
    """NVIDIA GPUs this machine's driver shows (without importing torch: the workflow asks at every parse)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def pick_device(name: str = "auto"):
    """The torch device of `device` (auto: CUDA when torch sees it; said in the log where the machine has a GPU
    that torch cannot use)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device: cuda was asked for but torch sees no CUDA device", transient=True)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and nvidia_gpus():
            log.warning("device auto: this machine has %d NVIDIA GPU(s) but torch sees none (a CPU build of torch, "
                        "or a driver it cannot use): running on the CPU", nvidia_gpus())
    return torch.device(name)


def set_cpu_threads() -> None:
    """Use the cores Snakemake granted (it sets OMP_NUM_THREADS from `threads:`)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


PROGRESS_SECONDS = 30.0


class Progress:
    """A log line every PROGRESS_SECONDS while a long read goes on: how far it is, of how much if known."""

    def __init__(self, what: str, total: float | None = None, unit: str = ""):
        self.what, self.total, self.unit = what, total, unit
        self.done, self.started = 0.0, time.monotonic()
        self.last = self.started

    def update(self, amount: float, detail: str = "") -> None:
        self.done += amount
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            share = f" of {self.total:,.0f} ({100 * self.done / self.total:.0f} %)" if self.total else ""
            log.info("%s: %s%s %s after %.0f s%s", self.what, f"{self.done:,.0f}", share, self.unit,
                     now - self.started, f"; {detail}" if detail else "")
