"""The non-negative lasso shared by dictionary learning, target precomputation and online targets.

    min_a  1/2 ||x - D a||^2 + lam ||a||_1   subject to a >= 0,   D: [d, K] with unit-norm columns

solved for a batch of tokens (rows of x) at once. Two solvers behind one interface (`Lasso`):

- `fista`: the MLSM reference. FISTA with step 1/L (L the largest eigenvalue of D^T D), from zero
  codes, a fixed number of iterations in fp32 (or, with a tolerance, until the relative code change
  falls below it).
- `fast`: FISTA with per-row adaptive restart (O'Donoghue & Candes, 2015), stopped per row on the
  relative duality gap, rows leaving the batch as they converge. Products with the dictionary are
  taken in factored form (D^T (D y), 4dK flops a row) or through the Gram matrix (2K^2), whichever
  is cheaper. With precision bf16 (or tf32 on CUDA) a first pass runs the products in that precision
  to a coarse gap, and an fp32 pass finishes from there: low precision alone stalls short of the
  optimum (about 7 % objective gap measured with K=3000), the fp32 finish removes that.

The duality gap: for residual r = x - D a, theta = s r with s = min(1, lam / max_j d_j^T r) is dual
feasible (D^T theta <= lam), the dual objective is 1/2 ||x||^2 - 1/2 ||x - theta||^2, and primal minus
dual bounds the distance of the objective to the optimum.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

SOLVERS = ("fista", "fast")
PRECISIONS = ("fp32", "tf32", "bf16")
GAP_CHECK_EVERY = 5  # iterations between duality-gap checks of the fast solver (each costs one product)
COARSE_GAP = 1e-2
POWER_MARGIN = 1.01  # on a power-iteration estimate of L
ROWS_PER_SOLVE_CPU, ROWS_PER_SOLVE_CUDA = 512, 65536  # relative gap the low-precision pass of the fast solver aims for


def lipschitz(gram: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(gram.double())[-1])


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
          init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The reference solver: codes [n, K] for rows of x [n, d], and the iterations run. With tolerance > 0
    it stops once the relative change of the whole batch's codes falls below it."""
    gram = dictionary.T @ dictionary if gram is None else gram
    lip = lipschitz(gram) if lip is None else lip
    correlation = x @ dictionary  # [n, K]
    codes = torch.zeros_like(correlation) if init is None else init.clone()
    momentum, t = codes.clone(), 1.0
    shrink = lam / lip
    for iteration in range(1, max_iterations + 1):
        gradient = momentum @ gram - correlation
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
    iterations: torch.Tensor  # [n] iterations each row ran (all passes together)
    gap: torch.Tensor | None  # [n] relative duality gap at the end (fast solver only)


class Lasso:
    """A solver bound to one dictionary (its Gram matrix and L computed once), called on batches of rows.

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
        self.gram = self.dictionary.T @ self.dictionary
        self.lip = lipschitz(self.gram) if lip is None else lip
        d, k = self.dictionary.shape
        self.factored = 2 * d < k  # D^T (D y) costs 4dK, y G costs 2K^2
        self.low = self.dictionary.bfloat16() if precision == "bf16" else None
        self.low_gram = self.gram.bfloat16() if precision == "bf16" else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Solution:
        # Bounded chunks: [rows, K] working arrays that fit the cache on a CPU, and memory on a GPU.
        rows = ROWS_PER_SOLVE_CUDA if x.is_cuda else ROWS_PER_SOLVE_CPU
        if len(x) > rows:
            parts = [self._solve(x[i : i + rows]) for i in range(0, len(x), rows)]
            gaps = None if parts[0].gap is None else torch.cat([p.gap for p in parts])
            return Solution(torch.cat([p.codes for p in parts]), torch.cat([p.iterations for p in parts]), gaps)
        return self._solve(x)

    def _solve(self, x: torch.Tensor) -> Solution:
        x = x.to(self.dictionary.dtype)
        if self.solver == "fista":
            codes, used = fista(x, self.dictionary, self.lam, self.max_iterations, self.tolerance,
                                gram=self.gram, lip=self.lip)
            return Solution(codes, torch.full((len(x),), used, dtype=torch.int32, device=x.device), None)
        return self._fast(x)

    def _fast(self, x: torch.Tensor) -> Solution:
        correlation = x @ self.dictionary
        codes = torch.zeros_like(correlation)
        iterations = torch.zeros(len(x), dtype=torch.int32, device=x.device)
        budget = self.max_iterations
        if self.precision != "fp32" and (self.precision == "bf16" or x.is_cuda):
            coarse = max(self.tolerance, COARSE_GAP)
            with self._low_precision():
                codes, iterations, _ = self._restarted_fista(x, correlation, codes, iterations, budget // 2,
                                                             coarse, low=self.precision == "bf16")
            budget -= budget // 2
        return Solution(*self._restarted_fista(x, correlation, codes, iterations, budget, self.tolerance))

    @contextmanager
    def _low_precision(self):
        if self.precision != "tf32":
            yield
            return
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
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
        step, shrink = 1.0 / self.lip, self.lam / self.lip
        for iteration in range(1, budget + 1):
            new = torch.clamp_min(y - step * (y_product - correlation) - shrink, 0.0)
            new_product = self._product(new, low)
            # Restart the momentum of rows where it points uphill (the gradient-mapping test).
            restart = ((y - new) * (new - a)).sum(1, keepdim=True) > 0
            t_next = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
            beta = torch.where(restart, 0.0, (t - 1.0) / t_next)
            t = torch.where(restart, 1.0, t_next)
            y, y_product = new + beta * (new - a), new_product + beta * (new_product - a_product)
            a, a_product = new, new_product
            if iteration % GAP_CHECK_EVERY and iteration != budget:
                continue
            residual_sq = x_sq[rows] + (a * (a_product - 2 * correlation)).sum(1)
            gap = _gap(x_sq[rows], residual_sq.clamp_min(0), correlation - a_product, a, self.lam)
            done = (gap <= tolerance) | (iteration == budget)
            finished = rows[done]
            out_codes[finished], out_gap[finished] = a[done], gap[done]
            out_iterations[finished] += iteration
            if bool(done.all()):
                break
            keep = ~done
            rows, t, correlation = rows[keep], t[keep], correlation[keep]
            a, a_product, y, y_product = a[keep], a_product[keep], y[keep], y_product[keep]
        return out_codes, out_iterations, out_gap
