"""The non-negative lasso shared by dictionary learning and target precomputation.

    min_a  1/2 ||x - D a||^2 + lam ||a||_1   subject to a >= 0,   D: [d, K] with unit-norm columns

solved for a batch of tokens at once by FISTA on the Gram matrix G = D^T D (step 1/L, L the largest
eigenvalue of G), the solver of the MLSM reference.
"""

from __future__ import annotations

import torch


def lipschitz(gram: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(gram.double())[-1])


def fista(x: torch.Tensor, dictionary: torch.Tensor, lam: float, max_iterations: int = 100,
          tolerance: float = 0.0, gram: torch.Tensor | None = None, lip: float | None = None,
          init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Codes [n, K] for rows of x [n, d]; stops early when the relative code change < tolerance.

    Returns the codes and the number of iterations run."""
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


def objective(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-token 1/2 ||x - D a||^2 + lam ||a||_1."""
    residual = x - codes @ dictionary.T
    return 0.5 * residual.pow(2).sum(1) + lam * codes.sum(1)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
