"""The fast solver's FISTA iteration between its products with the dictionary: two elementwise steps over the
[rows, K] codes. Eagerly each is 5 to 10 passes over them, which on a GPU cost about as much as the products, so
there they are compiled into fused kernels; on a CPU they run eagerly (the same arithmetic, the same bytes as
before they were factored out)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..common import log

FUSE_ON_GPU = True


def proximal_step(y, y_product, correlation, step: float, shrink: float) -> torch.Tensor:
    """The projected, shrunk gradient step from the momentum point y (whose product y D^T D is y_product)."""
    return torch.clamp_min(y - step * (y_product - correlation) - shrink, 0.0)


def momentum_step(y, new, a, new_product, a_product, t):
    """The next momentum point (and its product, by linearity) and t; rows whose momentum points uphill (the
    gradient-mapping test) restart."""
    change = new - a
    restart = ((y - new) * change).sum(1, keepdim=True) > 0
    t_next = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
    beta = torch.where(restart, 0.0, (t - 1.0) / t_next)
    return new + beta * change, new_product + beta * (new_product - a_product), torch.where(restart, 1.0, t_next)


class _Fused:
    """A step compiled into fused kernels on a GPU: eagerly each is 5 to 10 passes over the [rows, K] codes, which
    cost a GPU about as much as the products. Falls back to the eager step, once and for all, where compiling
    fails (a node without a compiler toolchain)."""

    def __init__(self, step):
        self.step, self.compiled = step, torch.compile(step, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 (any compiler failure: the eager step is the same step)
                log.warning("lasso: compiling the FISTA step failed (%s: %s); it runs eagerly",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.compiled = None
        return self.step(*args)


class Steps(NamedTuple):
    proximal: Callable
    momentum: Callable
    scalar: Callable  # a float the steps take, as they take it: a tensor where compiled, which a new value
    # (each dictionary's step 1/L) does not compile again


def steps(on_gpu: bool) -> Steps:
    """The steps: fused on a GPU (unless FUSE_ON_GPU is off: bench/targets.py measures both), eager (the same
    arithmetic, byte for byte) on a CPU."""
    return _steps(on_gpu and FUSE_ON_GPU)


@functools.cache
def _steps(fused: bool) -> Steps:
    if fused:
        return Steps(_Fused(proximal_step), _Fused(momentum_step), _scalar_tensor)
    return Steps(proximal_step, momentum_step, lambda value, like: value)


def _scalar_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)
