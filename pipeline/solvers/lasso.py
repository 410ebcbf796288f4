"""The non-negative lasso shared by dictionary learning, target precomputation and online targets.

    min_a  1/2 ||x - D a||^2 + lam ||a||_1   subject to a >= 0,   D: [d, K] with unit-norm columns

solved for a batch of tokens (rows of x) at once. Two solvers behind one interface (`Lasso`):

- `fista`: the MLSM reference. FISTA with step 1/L (L the largest eigenvalue of D^T D), from zero
  codes, a fixed number of iterations in fp32 (or, with a tolerance, until the relative code change
  falls below it).
- `fast`: FISTA with per-row adaptive restart (O'Donoghue & Candes, 2015), stopped per row on the
  relative duality gap, rows leaving the batch as they converge. Products with the dictionary are
  taken in factored form (D^T (D y), 4dK flops a row) or through the Gram matrix (2K^2), whichever
  is cheaper. With precision bf16 (or tf32 on CUDA) this pass runs the products in that precision
  to a coarse gap: low precision alone stalls short of the optimum (about 7 % objective gap measured
  with K=3000), and the fp32 finish below removes that.
  FISTA's tail is slow, so once a row's gap is coarse (FINISH_FROM) an active-set finish takes over:
  on the support of the codes plus the atoms that violate the optimality conditions (d_j^T r > lam)
  it solves the equality-constrained system G_SS a_S = D_S^T x - lam exactly (batched Cholesky),
  drops atoms that come out negative and solves again, and checks the duality gap over all atoms.
  When the support is right this is the exact optimum; on real MiniLM states with the SPAMS K=3000
  dictionary one or two rounds certify nearly every row. Rows it cannot certify go on with fp32
  FISTA from the best point found. On a CPU in fp32 with a coherent dictionary (L >= FISTA_FIRST_BELOW_L,
  as SPAMS's K=3000 one, L=75) the finish starts from zero codes instead (its first round solves on the
  FIRST_WIDTH atoms most correlated with the state, later ones add at most FINISH_ADD violators): 3-5
  rounds certify those states, where FISTA needs ~50 products to reach FINISH_FROM first. The exact solves are
  batched by pipeline.solvers.nnls; on a CPU blocks of rows run one per thread (pipeline.solvers.parallel).

The duality gap: for residual r = x - D a, theta = s r with s = min(1, lam / max_j d_j^T r) is dual
feasible (D^T theta <= lam), the dual objective is 1/2 ||x||^2 - 1/2 ||x - theta||^2, and primal minus
dual bounds the distance of the objective to the optimum.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch

from .fista_steps import steps
from .nnls import restricted_codes
from .parallel import map_blocks

SOLVERS = ("fista", "fast")
PRECISIONS = ("fp32", "tf32", "bf16")
GAP_CHECK_EVERY = 5  # iterations between duality-gap checks of the fast solver (each costs one product)
FINISH_FROM = 5e-2  # relative gap at which the active-set finish takes over from FISTA
FINISH_ROUNDS, FINISH_DROPS, FINISH_WIDTH = 8, 8, 192  # rounds, re-solves a round, atoms a support holds
FISTA_FIRST_BELOW_L = 25.0  # on a CPU in fp32, FISTA goes before the finish only below this L
FIRST_WIDTH = 48  # atoms the first round (from zero codes, no support yet) solves on
FINISH_ADD = 48  # violators a later round adds to a support at most
POWER_MARGIN = 1.01  # on a power-iteration estimate of L
ROWS_PER_SOLVE_CPU, ROWS_PER_SOLVE_CUDA = 256, 16384  # rows solved together ([rows, width^2] in the finish)
BLOCK_ELEMENTS_CPU = 256 * 3000  # and at least this many codes a block on a CPU


def lipschitz(gram: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(gram.double())[-1])


def dictionary_lipschitz(dictionary: torch.Tensor) -> float:
    """L = the largest eigenvalue of D^T D, from whichever of D^T D [K, K] and D D^T [d, d] is smaller (they
    share it): at d=384, K=3000 that is 35 ms instead of 2.4 s on a CPU."""
    d, k = dictionary.shape
    wide = dictionary.double()
    return lipschitz(wide @ wide.T if d < k else wide.T @ wide)


def power_lipschitz(dictionary: torch.Tensor, vector: torch.Tensor, iterations: int = 20) -> tuple[float, torch.Tensor]:
    """L = the largest eigenvalue of D^T D by power iteration warm-started from `vector` (the previous
    estimate's eigenvector): 4dK flops an iteration where an eigendecomposition costs seconds at K=3000,
    for a dictionary that changes every mini-batch. The estimate approaches L from below, so it carries
    a margin that keeps 1/L a safe step. Returns (L, the new vector)."""
    for _ in range(iterations):
        vector = dictionary.T @ (dictionary @ vector)
        vector = vector / torch.linalg.vector_norm(vector).clamp_min(1e-30)
    rayleigh = torch.linalg.vector_norm(dictionary @ vector).pow(2)
    return float(rayleigh) * POWER_MARGIN, vector


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def objective(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-token 1/2 ||x - D a||^2 + lam ||a||_1."""
    residual = x - codes @ dictionary.T
    return 0.5 * residual.pow(2).sum(1) + lam * codes.sum(1)


def relative_gap(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-token duality gap divided by the primal objective (an upper bound on the relative distance to
    the optimal objective)."""
    residual = x - codes @ dictionary.T
    return _gap(x.pow(2).sum(1), residual.pow(2).sum(1), residual @ dictionary, codes, lam)


def _gap(x_sq, residual_sq, correlation, codes, lam) -> torch.Tensor:
    scale = torch.clamp(lam / correlation.max(1).values.clamp_min(1e-30), max=1.0)
    primal = 0.5 * residual_sq + lam * codes.sum(1)
    # ||x - s r||^2 = ||x||^2 - 2 s x.r + s^2 ||r||^2, with x.r = ||r||^2 + (D a).r = ||r||^2 + a.(D^T r)
    x_dot_r = residual_sq + (codes * correlation).sum(1)
    dual = scale * x_dot_r - 0.5 * scale.pow(2) * residual_sq
    return (primal - dual).clamp_min(0) / primal.clamp_min(1e-30)


def fista(x: torch.Tensor, dictionary: torch.Tensor, lam: float, max_iterations: int = 100,
          tolerance: float = 0.0, gram: torch.Tensor | None = None, lip: float | None = None,
          init: torch.Tensor | None = None, factored: bool = False) -> tuple[torch.Tensor, int]:
    """The reference solver: codes [n, K] for rows of x [n, d], and the iterations run. With tolerance > 0
    it stops once the relative change of the whole batch's codes falls below it. `factored`: the gradient's
    product as (y D^T) D, two products with the dictionary, instead of y G with the K x K Gram matrix: half
    the work where K > 2d (K = 3000 atoms of a 768-wide teacher), the same iterations."""
    if not factored:
        gram = dictionary.T @ dictionary if gram is None else gram
    lip = (lipschitz(gram) if not factored else dictionary_lipschitz(dictionary)) if lip is None else lip
    correlation = x @ dictionary  # [n, K]
    codes = torch.zeros_like(correlation) if init is None else init.clone()
    momentum, t = codes.clone(), 1.0
    shrink = lam / lip
    for iteration in range(1, max_iterations + 1):  # noqa: B007 (returned: the iterations run)
        gradient = ((momentum @ dictionary.T) @ dictionary if factored else momentum @ gram) - correlation
        new = torch.clamp_min(momentum - gradient / lip - shrink, 0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        momentum = new + ((t - 1.0) / t_next) * (new - codes)
        change = torch.linalg.vector_norm(new - codes) / torch.linalg.vector_norm(new).clamp_min(1e-12)
        codes, t = new, t_next
        if tolerance > 0 and float(change) < tolerance:
            break
    return codes, iteration


@dataclass
class Solution:
    codes: torch.Tensor  # [n, K], float32 (float64 for a float64 dictionary), >= 0
    iterations: torch.Tensor  # [n] iterations each row ran (all passes; an active-set round counts one)
    gap: torch.Tensor | None  # [n] relative duality gap at the end (fast solver only)


class Lasso:
    """A solver bound to one dictionary (its Gram matrix and L computed once, when first needed), called
    on batches of rows.

    `tolerance` is the relative change of the codes for fista (0: run all max_iterations, the
    reference) and the relative duality gap for fast. `lip` (default: exact) may be an upper estimate
    of L, as dictionary learning's power iteration gives."""

    def __init__(self, dictionary: torch.Tensor, lam: float, solver: str = "fast", max_iterations: int = 500,
                 tolerance: float = 1e-4, precision: str = "fp32", lip: float | None = None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown lasso solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        # float64 only for reference solutions; everything else solves in float32.
        self.dictionary = dictionary if dictionary.dtype == torch.float64 else dictionary.float()
        self.lam, self.solver, self.max_iterations, self.tolerance = lam, solver, max_iterations, tolerance
        self.precision = precision
        self.lip = dictionary_lipschitz(self.dictionary) if lip is None else lip
        d, k = self.dictionary.shape
        self.factored = 2 * d < k  # D^T (D y) costs 4dK, y G costs 2K^2
        self.low = self.dictionary.bfloat16() if precision == "bf16" else None

    @cached_property
    def gram(self) -> torch.Tensor:
        # Lazy: dictionary learning builds a solver every mini-batch, codes in factored form, passes
        # `lip` and stops before the active-set finish, so it never needs this K x K product.
        return self.dictionary.T @ self.dictionary

    @cached_property
    def low_gram(self) -> torch.Tensor:
        return self.gram.bfloat16()

    def _build_shared(self) -> None:
        """The lazy matrices this call needs, built once before the blocks' threads would each build them."""
        needed = []
        if not self.factored or (self.solver == "fast" and self.tolerance < FINISH_FROM):
            needed.append(self.gram)
        if self.precision == "bf16" and not self.factored and self.solver == "fast":
            needed.append(self.low_gram)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Solution:
        with self._exact():
            return self._solve_blocks(x)

    @contextmanager
    def _exact(self):
        """Exact float32 products (no TensorFloat-32) unless the low-precision pass asks for them."""
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    def _solve_blocks(self, x: torch.Tensor) -> Solution:
        # Bounded blocks: [rows, K] working arrays that fit the cache on a CPU, and memory on a GPU. On a
        # CPU the blocks run one per thread (pipeline.solvers.parallel), as equal as the row count allows.
        if x.is_cuda:
            if len(x) <= ROWS_PER_SOLVE_CUDA:
                return self._solve(x)
            parts = [self._solve(x[i : i + ROWS_PER_SOLVE_CUDA]) for i in range(0, len(x), ROWS_PER_SOLVE_CUDA)]
        else:
            # Blocks of at least BLOCK_ELEMENTS_CPU codes: on small dictionaries the operations on fewer
            # rows are so short that threads mostly wait for each other (and for the GIL).
            rows = max(ROWS_PER_SOLVE_CPU, BLOCK_ELEMENTS_CPU // self.dictionary.shape[1])
            blocks = -(-len(x) // rows)
            bounds = [i * len(x) // blocks for i in range(blocks + 1)]
            self._build_shared()
            parts = map_blocks(self._solve, [x[a:b].contiguous() for a, b in zip(bounds, bounds[1:])])
        if len(parts) == 1:
            return parts[0]
        gaps = None if parts[0].gap is None else torch.cat([p.gap for p in parts])
        return Solution(torch.cat([p.codes for p in parts]), torch.cat([p.iterations for p in parts]), gaps)

    def _solve(self, x: torch.Tensor) -> Solution:
        x = x.to(self.dictionary.dtype)
        if self.solver == "fista":
            codes, used = fista(x, self.dictionary, self.lam, self.max_iterations, self.tolerance,
                                gram=None if self.factored else self.gram, lip=self.lip, factored=self.factored)
            return Solution(codes, torch.full((len(x),), used, dtype=torch.int32, device=x.device), None)
        return self._fast(x)

    def _fast(self, x: torch.Tensor) -> Solution:
        correlation = x @ self.dictionary
        codes = torch.zeros_like(correlation)
        iterations = torch.zeros(len(x), dtype=torch.int32, device=x.device)
        low = self.precision == "bf16" or (self.precision == "tf32" and x.is_cuda)
        finish = self.tolerance < FINISH_FROM
        if not (low or finish):
            return Solution(*self._restarted_fista(x, correlation, codes, iterations, self.max_iterations,
                                                   self.tolerance))
        # FISTA's first pass needs more iterations the larger L is (step 1/L): on real MiniLM states ~13 at
        # L=6.7 (a learned K=256 dictionary), ~50 at L=75 (SPAMS's K=3000). On a CPU in fp32 with L that
        # large the finish starts from zero codes instead: 3-5 rounds certify those states, for a third of
        # the CPU time of FISTA first (1.8 vs 5.7 ms a token on one core). A GPU runs FISTA's large
        # products far better than the finish's small factorisations: there FISTA always goes first.
        first = self.max_iterations // 2 if low or x.is_cuda or self.lip < FISTA_FIRST_BELOW_L else 0
        gap = torch.full((len(x),), float("inf"), dtype=x.dtype, device=x.device)
        if first:
            with self._low_precision():
                codes, iterations, gap = self._restarted_fista(x, correlation, codes, iterations, first,
                                                               max(self.tolerance, FINISH_FROM),
                                                               low=self.precision == "bf16")
        if finish:
            codes, gap, rounds = self._active_set(x, correlation, codes)
            iterations += rounds
        # fp32 FISTA for rows the finish did not certify (or all rows, after a low-precision pass alone:
        # gaps computed from low-precision products are not a bound).
        rest = torch.nonzero(gap > self.tolerance).flatten() if finish else torch.arange(len(x), device=x.device)
        if len(rest):
            codes[rest], iterations[rest], gap[rest] = self._restarted_fista(
                x[rest], correlation[rest], codes[rest], iterations[rest], self.max_iterations - first,
                self.tolerance)
        return Solution(codes, iterations, gap)

    def _active_set(self, x, correlation, codes):
        """The active-set finish (see the module's docstring) from `codes`. Returns the best codes each row
        reached, their relative gaps and the rounds run per row."""
        n = len(x)
        rows = torch.arange(n, device=x.device)
        rounds = torch.zeros(n, dtype=torch.int32, device=x.device)
        x_sq = x.pow(2).sum(1)
        best, best_gap = codes.clone(), torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        solved = torch.ones(n, dtype=torch.bool, device=x.device)
        rhs_all = correlation - self.lam
        for round_ in range(FINISH_ROUNDS + 1):
            residual = x[rows] - codes @ self.dictionary.T
            slack = residual @ self.dictionary - self.lam  # > 0: the atom violates optimality
            gap = _gap(x_sq[rows], residual.pow(2).sum(1), slack + self.lam, codes, self.lam)
            better = gap < best_gap[rows]
            best[rows[better]], best_gap[rows[better]] = codes[better], gap[better]
            keep = (best_gap[rows] > self.tolerance) & solved
            if round_ == FINISH_ROUNDS or not bool(keep.any()):
                break
            rows, codes, slack = rows[keep], codes[keep], slack[keep]
            score = torch.where(codes > 0, torch.inf, torch.where(slack > 0, slack, -torch.inf))
            # The support and at most FINISH_ADD violators (the first round: FIRST_WIDTH, as nothing is in
            # the support yet): adding fewer at a time makes narrower systems that need fewer drops.
            support_size = (codes > 0).sum(1)
            violators = ((slack > 0) & (codes <= 0)).sum(1).clamp(max=FINISH_ADD if round_ else FIRST_WIDTH)
            counts = (support_size + violators).clamp(max=FINISH_WIDTH)
            top = score.topk(max(1, int(counts.max())), dim=1)
            support, values, solved = restricted_codes(self.gram, rhs_all[rows], top.indices, counts, FINISH_DROPS)
            # Padding in `support` repeats a real atom with a zero value: adding never overwrites it.
            codes = torch.zeros_like(codes).scatter_add_(1, support, values)
            rounds[rows] += 1
        return best, best_gap, rounds

    @contextmanager
    def _low_precision(self):
        """TensorFloat-32 products for the low-precision pass of precision tf32; otherwise exact float32, also
        where the process allows TF32 elsewhere (pre-training does, and makes online targets here)."""
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    def _product(self, y: torch.Tensor, low: bool) -> torch.Tensor:
        """y D^T D, in bf16 products with fp32 results when low."""
        if low:
            y = y.bfloat16()
            out = (y @ self.low.T) @ self.low if self.factored else y @ self.low_gram
            return out.to(self.dictionary.dtype)
        return (y @ self.dictionary.T) @ self.dictionary if self.factored else y @ self.gram

    def _restarted_fista(self, x, correlation, codes, iterations, budget, tolerance, low=False):
        """Runs rows from `codes` until their relative gap <= tolerance or `budget` iterations pass.
        Returns codes, iterations per row (added to the given ones) and the final gaps.

        One product a row and iteration: that of the new codes. The momentum point's product is the same
        combination of the codes' products (linearity), so the gap of the codes comes for free."""
        n = len(x)
        out_codes, out_gap = codes.clone(), torch.zeros(n, dtype=x.dtype, device=x.device)
        out_iterations = iterations.clone()
        rows = torch.arange(n, device=x.device)
        x_sq = x.pow(2).sum(1)
        a = codes.clone()
        a_product = self._product(a, low) if bool(a.any()) else torch.zeros_like(a)
        y, y_product = a, a_product
        t = torch.ones(n, 1, dtype=x.dtype, device=x.device)
        proximal, momentum, scalar = steps(x.is_cuda)
        step, shrink = scalar(1.0 / self.lip, x), scalar(self.lam / self.lip, x)
        for iteration in range(1, budget + 1):
            new = proximal(y, y_product, correlation, step, shrink)
            new_product = self._product(new, low)
            y, y_product, t = momentum(y, new, a, new_product, a_product, t)
            a, a_product = new, new_product
            if iteration % GAP_CHECK_EVERY and iteration != budget:
                continue
            residual_sq = x_sq[rows] + (a * (a_product - 2 * correlation)).sum(1)
            gap = _gap(x_sq[rows], residual_sq.clamp_min(0), correlation - a_product, a, self.lam)
            done = (gap <= tolerance) | (iteration == budget)
            # One wait for the device a check: the count of rows done. The rows kept and those done are then
            # taken by index (a boolean mask would ask the device again for every array it selects from).
            finished_count = int(done.sum())
            order = torch.argsort(done.to(torch.uint8), stable=True)
            kept, finished = order[: len(done) - finished_count], order[len(done) - finished_count :]
            out_codes[rows[finished]], out_gap[rows[finished]] = a[finished], gap[finished]
            out_iterations[rows[finished]] += iteration
            if not len(kept):
                break
            rows, t, correlation = rows[kept], t[kept], correlation[kept]
            a, a_product, y, y_product = a[kept], a_product[kept], y[kept], y_product[kept]
        return out_codes, out_iterations, out_gap


def make_solver(dictionary: torch.Tensor, params: dict) -> Lasso:
    """The solver a config slice asks for (lambda, solver, max_iterations, tolerance, precision): the
    targets stage's, and the trainer's online targets'."""
    return Lasso(dictionary, params["lambda"], params["solver"], params["max_iterations"], params["tolerance"],
                 params.get("precision", "fp32"))
