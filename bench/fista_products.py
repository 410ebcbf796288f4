"""The reference FISTA-100's gradient product: with the K x K Gram matrix, or as two products with the dictionary
(pipeline/solvers/lasso.py: fista, factored), on one batch of random unit rows, both measured in the same run.

    python bench/fista_products.py                                   # K = 3000, d = 384, 256 rows, one thread
    python bench/fista_products.py --device cuda --atoms 3000 --dim 768 --rows 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.solvers.lasso import dictionary_lipschitz, fista, objective  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.rand(args.dim, args.atoms, generator=generator), dim=0)
    x = torch.nn.functional.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=1)
    dictionary, x = dictionary.to(args.device), x.to(args.device)
    lip, figures = dictionary_lipschitz(dictionary), {}
    for name, factored in (("gram", False), ("factored", True)):
        gram = None if factored else dictionary.T @ dictionary
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        codes, _ = fista(x, dictionary, 0.05, 100, gram=gram, lip=lip, factored=factored)
        if args.device == "cuda":
            torch.cuda.synchronize()
        figures[name] = {"seconds": time.perf_counter() - started,
                         "objective": float(objective(x, dictionary, codes, 0.05).mean())}
    figures["speedup_factored_over_gram"] = figures["gram"]["seconds"] / figures["factored"]["seconds"]
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
