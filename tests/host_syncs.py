"""Counting the places where a GPU run would wait for the device, on the CPU: the operations whose result the
host must read (a scalar, a count that sizes the output) and `tolist`. On a GPU each is a host sync that
drains the device's queue; on the CPU they cost nothing, so only counting them can catch one added."""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SIZED_BY_DATA = {"aten.nonzero.default", "aten.masked_select.default", "aten.unique_consecutive.default",
                 "aten._unique2.default", "aten.repeat_interleave.Tensor"}
BOOL_INDEXED = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                "aten._index_put_impl_.default"}


class HostSyncs(TorchDispatchMode):
    """with HostSyncs() as syncs: ...; syncs.counts is a Counter by kind (scalar, sized, bool_index, tolist)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __enter__(self):
        real, counts = torch.Tensor.tolist, self.counts

        def tolist(tensor):
            counts["tolist"] += 1
            return real(tensor)

        self._real_tolist, torch.Tensor.tolist = real, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real_tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            if not _in_optimizer_step_count():
                self.counts["scalar"] += 1
        elif name in SIZED_BY_DATA:
            self.counts["sized"] += 1
        elif name in BOOL_INDEXED and _has_bool_index(args):
            self.counts["bool_index"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _in_optimizer_step_count() -> bool:
    """torch's optimizers read their step counters, which stay on the host in a GPU run (unless capturable)."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
