"""Coarse-grained CPU parallelism that keeps its speed when the cores are shared.

Torch splits each operation over its intra-op threads and waits for all of them at its end. A solver
of thousands of small operations waits thousands of times for its slowest thread, and when another
process holds a core that thread loses whole scheduler time slices: on 2 cores with a second job
running, the fast lasso ran 4x slower on 2 intra-op threads than on 1 (bench/targets.py). So work made
of independent row blocks runs one block per thread instead, each thread single-threaded: a thread
that loses its core delays only its own block, and nothing waits inside an operation.

The blocks are a function of the data alone, never of the number of threads, and each runs alone in
its thread, so results are the same for any thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def map_blocks(function: Callable[[T], R], blocks: Sequence[T], threads: int | None = None) -> list[R]:
    """[function(b) for b in blocks], the blocks spread over `threads` threads (default: torch's
    intra-op thread count), each block computed with one intra-op thread."""
    threads = min(torch.get_num_threads() if threads is None else threads, len(blocks))
    if threads <= 1:
        with one_thread():
            return [function(block) for block in blocks]
    try:
        return list(_pool(threads).map(_single_threaded, [function] * len(blocks), blocks))
    finally:
        # A worker's set_num_threads(1) also sets the default that threads started later begin with.
        torch.set_num_threads(torch.get_num_threads())


def _single_threaded(function, block):
    torch.set_num_threads(1)  # thread-local for the OpenMP and MKL calls this thread makes
    return function(block)


SMALL_WORK_FLOPS = 5e7  # an operation below this (~2 ms on one core) runs on one thread (small_work)


@contextmanager
def small_work(flops: float):
    """One intra-op thread for operations of about `flops` each when they are small: their threads would
    spend more time waiting at each operation's end than computing, and far more when cores are shared."""
    if flops >= SMALL_WORK_FLOPS:
        yield
        return
    with one_thread():
        yield


@contextmanager
def one_thread():
    """The calling thread's torch operations on one intra-op thread, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="row-blocks")
        return _pools[threads]
