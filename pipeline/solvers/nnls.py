"""Batched exact solves of the non-negative lasso restricted to small per-row supports: the inner step
of the fast solver's active-set finish (pipeline.solvers.lasso).

For each row, given candidate atoms S, solve G_SS a_S = D_S^T x - lam (batched Cholesky), drop the
atoms that come out negative and solve again on the rest. Two things keep this cheap on a CPU, where
the first version spent most of its time moving [rows, width, width] arrays rather than factorising:

- rows are solved in buckets of similar support size (32 rows on a CPU, 2048 on a GPU), so a row with a wide
  support does not make every row of the batch factorise a padded system of that width;
- the Gram entries are gathered from the [K, K] Gram matrix once per bucket, with each row's atoms in
  ascending order (neighbouring reads share cache lines and pages: about 2x faster than arbitrary
  order at K=3000), and the re-solves after drops take their systems from that small copy, compacted
  to the atoms left.
"""

from __future__ import annotations

import torch

BUCKET_ROWS_CPU = 32  # rows factorised together; sorted by support size, so little width is padding
# A GPU factorises many rows at once (a loop over small buckets would leave it waiting on launches), but not all
# of a 16384-row block: its [rows, width, width] systems and their int64 gather index peaked at 10-15 GB.
BUCKET_ROWS_CUDA = 2048


def restricted_codes(gram: torch.Tensor, rhs_all: torch.Tensor, support: torch.Tensor, counts: torch.Tensor,
                     drops: int, bucket: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-negative codes of each row on its first counts[i] atoms of `support` [n, w], for the
    right-hand sides rhs_all [n, K] (D^T x - lam). Returns (support [n, w] with each row's atoms
    reordered, codes [n, w] aligned with it, zero outside the atoms solved for, and which rows ended
    with a factorisation that worked and no negative atom left within `drops` re-solves)."""
    n, width = support.shape
    support = support.clone()
    values = torch.zeros(n, width, dtype=gram.dtype, device=gram.device)
    solved = torch.ones(n, dtype=torch.bool, device=gram.device)
    order = torch.argsort(counts, stable=True)
    bucket = bucket or (BUCKET_ROWS_CUDA if gram.is_cuda else BUCKET_ROWS_CPU)
    for start in range(0, n, bucket):
        rows = order[start : start + bucket]
        counts_here = counts[rows]
        bucket_width = int(counts_here.max())
        if bucket_width == 0:
            continue
        atoms = _ascending(support[rows, :bucket_width], counts_here, gram.shape[0])
        values[rows, :bucket_width], solved[rows] = _solve_with_drops(
            gram_block(gram, atoms), rhs_all[rows].gather(1, atoms), counts_here, drops)
        support[rows, :bucket_width] = atoms
    return support, values, solved


def _ascending(atoms: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's first counts[i] atoms in ascending order; the padding after them points at the row's
    first atom, or atom k-1 in a row without atoms (its coefficient stays 0, so it adds nothing when
    codes are scattered back with add)."""
    inside = torch.arange(atoms.shape[1], device=atoms.device) < counts[:, None]
    ordered = torch.where(inside, atoms, k).sort(1).values
    return torch.where(inside, ordered, ordered[:, :1].clamp(max=k - 1))


def gram_block(gram: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """G[atoms_i, atoms_j] for each row: [n, w, w]. torch.gather on the flat matrix is about 3x faster
    than advanced indexing (gram[a[:, :, None], a[:, None, :]]) here."""
    n, width = atoms.shape
    flat = (atoms[:, :, None] * gram.shape[0] + atoms[:, None, :]).reshape(n, -1)
    return torch.gather(gram.reshape(1, -1).expand(n, -1), 1, flat).reshape(n, width, width)


def _solve_with_drops(block: torch.Tensor, rhs: torch.Tensor, counts: torch.Tensor, drops: int):
    """Codes [n, w] for systems block [n, w, w], rhs [n, w] on each row's first counts[i] atoms; atoms
    with a non-positive solution are dropped and the rest solved again, up to `drops` times."""
    n, width = rhs.shape
    active = torch.arange(width, device=rhs.device) < counts[:, None]
    values = torch.zeros_like(rhs)
    solved = torch.ones(n, dtype=torch.bool, device=rhs.device)
    rows = torch.arange(n, device=rhs.device)
    for _ in range(drops):
        keep = active[rows]
        solution, factored = _solve_compacted(block, rhs, rows, keep)
        values[rows] = solution
        solved[rows[~factored]] = False
        negative = keep & (solution <= 0)
        again = negative.any(1) & factored
        if not bool(again.any()):
            break
        active[rows[again]] = keep[again] & ~negative[again]
        rows = rows[again]
    else:
        solved[rows] = False
    return values.clamp_min(0), solved


def _solve_compacted(block, rhs, rows, keep):
    """Solutions [len(rows), w] on the atoms `keep` of each of `rows`, from a system holding only those
    atoms (moved to the front, padded with identity rows): factorising zeros costs as much as data."""
    n, width = rhs.shape
    counts = keep.sum(1)
    narrow = max(1, int(counts.max()))
    inside = torch.arange(narrow, device=rhs.device) < counts[:, None]
    if len(rows) == n and bool((keep[:, :narrow] == inside).all()):  # already compact: the first solve
        position = None
        system, right = block[:, :narrow, :narrow], rhs[:, :narrow]
    else:
        position = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :narrow]
        # One gather from the flat buffer: rows, then compacted row and column positions.
        flat = (rows[:, None, None] * width + position[:, :, None]) * width + position[:, None, :]
        system = block.reshape(-1)[flat]
        right = rhs[rows].gather(1, position)
    if not bool(inside.all()):
        eye = torch.eye(narrow, dtype=system.dtype, device=system.device)
        system = torch.where(inside[:, :, None] & inside[:, None, :], system, eye)
        right = torch.where(inside, right, 0.0)
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(right[:, :, None], factor)[:, :, 0]
    factored = info == 0
    solution = torch.where(inside & factored[:, None], solution, 0.0)
    if position is None:
        return torch.nn.functional.pad(solution, (0, width - narrow)), factored
    return torch.zeros(len(rows), width, dtype=rhs.dtype, device=rhs.device).scatter_(1, position, solution), factored
