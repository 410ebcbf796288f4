"""Benchmark of fit_dictionary: the pipeline's learner against SPAMS trainDL with the MLSM reference's
settings, on the same real states: held-out objective and wall time, and their ratios.

States: the real all-MiniLM-L6-v2 (d=384, last layer) on the first `--text-mb` MB of `--corpus`,
sharded by the pipeline; `--tokens` of them train and the next `--heldout` are held out, all
L2-normalised. K = `--atoms`, lambda = 0.05. Every dictionary is scored the same way: the mean of
1/2 ||x - Da||^2 + lambda ||a||_1 over the held-out states with converged codes (relative duality gap
1e-4), plus atoms used and mean nnz.

- torch: pipeline.dictionary.learn on `--device` (the stage's default backend and settings, with
  `--batch-size` and at most `--epochs` passes, stopping on the held-out objective);
- spams: trainDL(K, lambda1, posAlpha, batchsize 400, iter `--spams-iter`) on all CPU threads; the
  reference runs iter=1000, which takes ~990 s on 16 threads for 1 M states, so a shorter run can be
  asked for (its time scales linearly with iter) or its dictionary given with `--spams-dictionary` and
  its time with `--spams-seconds` from an earlier run (`--save-spams` writes one);
- sklearn (with `--sklearn-epochs`): MiniBatchDictionaryLearning with positive codes.

    python bench/dictionary.py --text-mb 60 --tokens 1070000 --spams-iter 100     # on the device machine
    python bench/dictionary.py --text-mb 1 --tokens 20000 --heldout 2000 --atoms 256 --batch-size 512 \
        --spams-iter 200 --device cpu         # the CPU smoke run (make bench): SPAMS sees 4 epochs, ~1.5 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CORPUS, MINILM, emit, real_shards, sync, teacher_states  # noqa: E402
from pipeline.common import pick_device  # noqa: E402
from pipeline.dictionary import evaluate, learn_sklearn, train_spams  # noqa: E402
from pipeline.solvers.dictlearn import learn  # noqa: E402

LAMBDA = 0.05


def score(name: str, dictionary: torch.Tensor, heldout: torch.Tensor, seconds: float) -> dict:
    metrics, _ = evaluate(heldout, dictionary.to(heldout.device), LAMBDA)
    print(f"{name:>8}: held-out objective {metrics['heldout_objective']:.4f} in {seconds:8.1f} s "
          f"(atoms used {metrics['atoms_used_fraction']:.2f}, mean nnz {metrics['mean_nnz']:.1f})")
    return {"objective": metrics["heldout_objective"], "seconds": seconds,
            "atoms_used": metrics["atoms_used_fraction"], "mean_nnz": metrics["mean_nnz"]}


def spams_fit(train: torch.Tensor, atoms: int, iterations: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    dictionary = train_spams(train.cpu(), atoms, LAMBDA, iterations, 400)
    return dictionary, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--text-mb", type=float, default=60.0)
    p.add_argument("--tokens", type=int, default=1_070_000)
    p.add_argument("--heldout", type=int, default=20_000)
    p.add_argument("--atoms", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--convergence", type=float, default=1e-3, help="the learner's convergence_tolerance")
    p.add_argument("--atom-block", type=int, default=64, help="the learner's atom_block (1: atom by atom)")
    p.add_argument("--atom-sweeps", type=int, default=4, help="the learner's atom_sweeps")
    p.add_argument("--spams-iter", type=int, default=1000)
    p.add_argument("--spams-dictionary", help="[d, K] .npy fitted by SPAMS earlier, instead of fitting here")
    p.add_argument("--spams-seconds", type=float, help="the wall time of that earlier SPAMS fit")
    p.add_argument("--save-spams", help="write SPAMS's dictionary here")
    p.add_argument("--sklearn-epochs", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; CPU threads {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        (shard,), _ = real_shards(Path(tmp), Path(args.corpus), args.text_mb, 1)
        x = teacher_states(MINILM, shard, args.tokens + args.heldout, device)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)]
    train, heldout = x[: -args.heldout], x[-args.heldout:]
    print(f"{len(train):,} training and {len(heldout):,} held-out MiniLM-L6 states, K={args.atoms}, lambda {LAMBDA}")

    figures = {}
    sync(device)
    started = time.perf_counter()
    dictionary, curve = learn(train, args.atoms, LAMBDA, args.batch_size, args.epochs, 50,
                              torch.Generator().manual_seed(0), heldout=heldout[:4096],
                              convergence_tolerance=args.convergence,
                              atom_block=args.atom_block, atom_sweeps=args.atom_sweeps)
    sync(device)
    figures["torch"] = score("torch", dictionary, heldout, time.perf_counter() - started)
    figures["torch"]["epochs"] = curve[-1][0] * args.batch_size / len(train) if curve else 0.0

    if args.spams_dictionary:
        spams_dictionary, seconds = torch.from_numpy(np.load(args.spams_dictionary)).float(), args.spams_seconds
    else:
        spams_dictionary, seconds = spams_fit(train, args.atoms, args.spams_iter)
        if args.save_spams:
            np.save(args.save_spams, spams_dictionary.numpy())
    figures["spams"] = score(f"spams{args.spams_iter if not args.spams_dictionary else ''}", spams_dictionary,
                             heldout, seconds or float("nan"))
    if args.sklearn_epochs:
        started = time.perf_counter()
        learned = learn_sklearn(train, {"atoms": args.atoms, "lambda": LAMBDA, "batch_size": 400,
                                        "epochs": args.sklearn_epochs, "seed": 0})
        figures["sklearn"] = score("sklearn", learned, heldout, time.perf_counter() - started)

    ours, theirs = figures["torch"], figures["spams"]
    print(f"objective torch / spams: {ours['objective'] / theirs['objective']:.4f} (goal <= 1)")
    print(f"time torch / spams: {ours['seconds'] / theirs['seconds']:.4f} (goal <= 0.1)")
    emit(figures, args.json)


if __name__ == "__main__":
    main()
