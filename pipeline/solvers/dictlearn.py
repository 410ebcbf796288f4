"""Online non-negative dictionary learning (Mairal et al., 2010) on L2-normalised states, streamed from
the activation store; the `torch` backend of the dictionary stage (CPU or GPU).

Atoms start as states drawn k-means++-style (far from those already drawn); each mini-batch is coded with
the fast non-negative lasso (pipeline.solvers.lasso, to a loose duality gap), the statistics A = sum a a^T and
B = sum x a^T are accumulated with forgetting (weights of older batches shrink by (1 - b/seen)^rho, so
codes of early, poor dictionaries fade), and the atoms are updated by block-coordinate descent
(`atom_sweeps` passes over blocks of `atom_block` atoms, each block moved at once) and renormalised.
Atoms the codes stop using are re-drawn from the worst-reconstructed states of the batch. A few times
per epoch the objective on held-out states is measured; the fit stops when it improves by less than
`convergence_tolerance` twice in a row. Mini-batches stream from the zarr store a group of chunks at a
time (StoreBatches), so memory does not grow with the sample. The state is checkpointed between
mini-batches, so a killed fit resumes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..common import StageError, log
from ..resume import Resume
from .lasso import Lasso, l2_normalise, objective, power_lipschitz
from .parallel import small_work

DEAD_USAGE = 1e-4  # an atom whose A_jj is below this fraction of the mean is dead


def init_atoms(pool: torch.Tensor, atoms: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere: each next atom is one of the `pool` states, drawn with
    probability proportional to its distance 1 - max cos to the atoms drawn so far. Returns [d, atoms]."""
    chosen = [int(torch.randint(len(pool), (1,), generator=generator))]
    distance = (1.0 - pool @ pool[chosen[0]]).clamp_min(0)
    for _ in range(atoms - 1):
        weights = distance.cpu().double()
        index = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(len(pool), (1,), generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1.0 - pool @ pool[index]).clamp_min(0))
    return pool[chosen].T.contiguous()


class MemoryBatches:
    """Mini-batches of an in-memory [n, d] tensor: epoch e visits the rows in an order seeded by
    (seed, e), so batch u is a pure function of u (a resumed fit needs only its unit count)."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int):
        self.x, self.batch_size, self.seed = x, min(batch_size, len(x)), seed
        self.rows, self.dim, self.device = len(x), x.shape[1], x.device
        self.per_epoch = max(1, len(x) // self.batch_size)
        self._epoch, self._order = -1, None

    def units(self, epochs: int) -> int:
        return epochs * self.per_epoch

    def batch(self, unit: int) -> torch.Tensor:
        epoch, index = divmod(unit, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.rows, generator=generator).to(self.device)
        return self.x[self._order[index * self.batch_size : (index + 1) * self.batch_size]]

    def pool(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Up to `count` random rows (the candidates of the atoms' seeding)."""
        return self.x[torch.randperm(self.rows, generator=generator)[:count].to(self.device)]


class StoreBatches:
    """Mini-batches streamed from the activation store's `states` (zarr, CHUNK_ROWS rows a chunk), with
    at most one group of GROUP_CHUNKS chunks in memory: epoch e reads the chunks in an order seeded by
    (seed, e), a group at a time, leaves out the held-out rows, shuffles the group's rows (seeded by
    seed, e and the group) and cuts them into mini-batches (a group's last partial batch is dropped).
    Batch u is a pure function of u. Rows are L2-normalised; a non-finite one is an error naming it."""

    GROUP_CHUNKS = 4

    def __init__(self, states, train: np.ndarray, batch_size: int, seed: int, device: torch.device, path: str):
        self.states, self.train, self.seed, self.device, self.path = states, train, seed, device, path
        self.chunk_rows = states.chunks[0]
        self.rows, self.dim = int(train.sum()), states.shape[1]
        self.batch_size = min(batch_size, self.rows)
        self.chunks = -(-states.shape[0] // self.chunk_rows)
        self.train_per_chunk = np.add.reduceat(train.astype(np.int64), np.arange(0, len(train), self.chunk_rows))
        self._plans: dict[int, list] = {}
        self._group_key, self._group = None, None
        self.per_epoch = len(self._plan(0))

    def _plan(self, epoch: int) -> list[tuple[int, int]]:
        """(group, batch within it) for each batch of an epoch."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
            plan = []
            for group in range(-(-self.chunks // self.GROUP_CHUNKS)):
                chunks = order[group * self.GROUP_CHUNKS : (group + 1) * self.GROUP_CHUNKS]
                rows = int(self.train_per_chunk[chunks].sum())
                plan += [(group, index) for index in range(rows // self.batch_size)]
            self._plans = {epoch: plan, **{e: p for e, p in self._plans.items() if e > epoch - 2}}
        return self._plans[epoch]

    def units(self, epochs: int) -> int:
        return sum(len(self._plan(epoch)) for epoch in range(epochs))

    def batch(self, unit: int) -> torch.Tensor:
        epoch = 0
        while unit >= len(self._plan(epoch)):
            unit -= len(self._plan(epoch))
            epoch += 1
        group, index = self._plan(epoch)[unit]
        if self._group_key != (epoch, group):
            self._group_key, self._group = (epoch, group), self._read_group(epoch, group)
        return self._group[index * self.batch_size : (index + 1) * self.batch_size]

    def _read_group(self, epoch: int, group: int) -> torch.Tensor:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        parts = []
        for chunk in sorted(order[group * self.GROUP_CHUNKS : (group + 1) * self.GROUP_CHUNKS]):
            start = int(chunk) * self.chunk_rows
            rows = read_rows(self.states, slice(start, start + self.chunk_rows), self.path, start)
            parts.append(rows[self.train[start : start + len(rows)]])
        rows = np.concatenate(parts)
        rows = rows[np.random.default_rng([self.seed, epoch, group]).permutation(len(rows))]
        return l2_normalise(torch.from_numpy(rows).to(self.device))

    def pool(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Up to `count` rows of the first groups of epoch 0 (the candidates of the atoms' seeding)."""
        rows, unit = [], 0
        while sum(len(r) for r in rows) < count and unit < len(self._plan(0)):
            rows.append(self.batch(unit))
            unit += 1
        return torch.cat(rows)[:count]


def read_rows(states, selection, path: str, first_row: int = 0) -> np.ndarray:
    """float32 rows of the store's states; a non-finite state is an error naming its row."""
    rows = np.asarray(states[selection] if isinstance(selection, slice) else states.oindex[selection, :],
                      dtype=np.float32)
    bad = ~np.isfinite(rows).all(1)
    if bad.any():
        if isinstance(selection, slice):
            row = first_row + int(np.flatnonzero(bad)[0])
        else:
            row = int(np.asarray(selection)[bad][0])
        raise StageError(f"activation store {path}: non-finite state in row {row}")
    return rows


def learn(x, atoms: int, lam: float, batch_size: int, epochs: int, code_iterations: int,
          generator: torch.Generator, resume: Resume | None = None, heldout: torch.Tensor | None = None,
          forgetting: float = 4.0, code_tolerance: float = 5e-2, checks_per_epoch: int = 4,
          convergence_tolerance: float = 0.0, atom_block: int = 64, atom_sweeps: int = 4) -> tuple[torch.Tensor, list]:
    """Dictionary [d, K] with unit-norm columns learned from L2-normalised states (a tensor [n, d], or
    a MemoryBatches / StoreBatches source), and the held-out curve [[mini-batches, objective], ...]
    (with `heldout`).

    One unit of work is one mini-batch; `resume` checkpoints the whole state between units."""
    source = MemoryBatches(x, batch_size, generator.initial_seed()) if isinstance(x, torch.Tensor) else x
    if source.rows < atoms:
        raise StageError(f"{source.rows} training states cannot initialise {atoms} atoms; sample more tokens")
    total = source.units(epochs)
    check_every = max(1, source.per_epoch // max(1, checks_per_epoch))
    saved = resume.load_state() if resume is not None else None
    if saved is None:
        dictionary = init_atoms(source.pool(20 * atoms, generator), atoms, generator)
        stat_a = torch.zeros(atoms, atoms, device=source.device)
        stat_b = torch.zeros(source.dim, atoms, device=source.device)
        # A long cold start; later mini-batches change the dictionary little and warm-start from it.
        _, eigenvector = power_lipschitz(dictionary, torch.full((atoms,), atoms ** -0.5, device=source.device), 100)
        unit, seen, curve = 0, 0, []
    else:
        meta, state = saved
        # Fresh copies: BLAS sums can depend on alignment, and loaded tensors may sit anywhere in a buffer.
        dictionary, stat_a, stat_b, eigenvector = (state[k].to(source.device).clone()
                                                   for k in ("dictionary", "stat_a", "stat_b", "eigenvector"))
        unit, seen, curve = meta["unit"], meta["seen"], meta["curve"]
    while unit < total and not _converged(curve, convergence_tolerance):
        batch = source.batch(unit)
        with small_work(2 * dictionary.numel()):
            lip, eigenvector = power_lipschitz(dictionary, eigenvector)
        codes = Lasso(dictionary, lam, "fast", code_iterations, code_tolerance, lip=lip)(batch).codes
        seen += len(batch)
        decay = (1.0 - len(batch) / seen) ** forgetting
        stat_a.mul_(decay).add_(codes.T @ codes)
        stat_b.mul_(decay).add_(batch.T @ codes)
        with small_work(2 * dictionary.numel() * min(atom_block, atoms)):
            _update_atoms(dictionary, stat_a, stat_b, atom_block, atom_sweeps)
        _resample_dead(dictionary, stat_a, stat_b, batch, codes, unit)
        unit += 1
        if heldout is not None and (unit % check_every == 0 or unit == total):
            solver = Lasso(dictionary, lam, "fast", 500, 1e-2, lip=power_lipschitz(dictionary, eigenvector)[0])
            value = float(objective(heldout, dictionary, solver(heldout).codes, lam).mean())
            curve.append([unit, value])
            log.info("dictionary: %d mini-batches (epoch %.2f), held-out objective %.4f", unit,
                     unit / source.per_epoch, value)
        if resume is not None and resume.due():
            resume.save_state(unit, {"seen": seen, "curve": curve},
                              {"dictionary": dictionary, "stat_a": stat_a, "stat_b": stat_b,
                               "eigenvector": eigenvector})
    return dictionary, curve


def _converged(curve: list, tolerance: float) -> bool:
    """The held-out objective improved by less than `tolerance` (relative) at the last two checks."""
    if tolerance <= 0 or len(curve) < 3:
        return False
    values = [value for _, value in curve[-3:]]
    return all(before - after < tolerance * before for before, after in zip(values, values[1:]))


def _update_atoms(dictionary: torch.Tensor, stat_a: torch.Tensor, stat_b: torch.Tensor, block: int,
                  sweeps: int) -> None:
    """`sweeps` block-coordinate passes over the surrogate 1/2 tr(D^T D A) - tr(D^T B) on unit-norm columns.

    Blocks of `block` atoms move in turn; inside a block all atoms move at once, each by
    (B - DA)_j / r_j with r_j = sum_{i in block} |A_ij|, then are renormalised. Gershgorin gives
    A_block <= diag(r), so this minimises a separable upper bound of the surrogate exactly and the
    surrogate cannot increase. block=1 is Mairal's sequential atom update (r_j = A_jj); it needs K
    dependent steps of a few tiny kernels each, which leaves a GPU idle at K=3000, so the default
    moves tens of atoms a step and makes up for the looser bound with more passes (K=1000 on real
    MiniLM states: 4 passes of 64-atom blocks reach the held-out objective of one sequential pass
    within 0.1 %)."""
    atoms = dictionary.shape[1]
    for _ in range(sweeps):
        for start in range(0, atoms, block):
            cols = slice(start, min(start + block, atoms))
            stat_cols = stat_a[:, cols]
            bound = stat_cols[cols].abs().sum(0)
            moved = dictionary[:, cols] + (stat_b[:, cols] - dictionary @ stat_cols) / bound.clamp_min(1e-10)
            moved = moved / torch.linalg.vector_norm(moved, dim=0).clamp_min(1e-12)
            used = torch.diagonal(stat_cols[cols]) > 1e-10  # an atom no code uses keeps its place
            dictionary[:, cols] = torch.where(used, moved, dictionary[:, cols])


def _resample_dead(dictionary, stat_a, stat_b, batch, codes, unit) -> None:
    """Atoms no code has used lately (A_jj tiny next to the others) restart as the worst-reconstructed
    states of the batch, with their statistics cleared."""
    usage = torch.diagonal(stat_a)
    dead = torch.nonzero(usage <= DEAD_USAGE * usage.mean()).flatten()
    if len(dead) == 0:
        return
    errors = (batch - codes @ dictionary.T).pow(2).sum(1)
    worst = torch.argsort(errors, descending=True)[: len(dead)]
    dead = dead[: len(worst)]
    dictionary[:, dead] = l2_normalise(batch[worst]).T
    stat_a[dead, :] = 0
    stat_a[:, dead] = 0
    stat_b[:, dead] = 0
    if unit % 50 == 0:
        log.info("dictionary: %d dead atoms re-drawn at mini-batch %d", len(dead), unit)
