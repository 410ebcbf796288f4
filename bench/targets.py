"""Benchmark of precompute_targets: stage tokens/s (teacher forward included) with the fast solver and
with the reference FISTA-100, solution quality on real tokens, bytes per token, and read-back speed.

Real inputs: the first `--text-mb` MB of `--corpus` sharded by the pipeline (MiniLM's vocabulary,
sentence pairs up to 128 tokens). Teacher `--teacher`: `minilm` (the real all-MiniLM-L6-v2, d=384,
with the real SPAMS-fitted K=3000 dictionary of ../shared/data/dictionaries, or `--dictionary`), or
`base` (BERT-base shape, d=768, random weights; its dictionary: K atoms fitted by the pipeline's own
learner on that teacher's states, `--fit-tokens` of them) or any local model directory with
`--dictionary`. lambda = 0.05.

Figures, in one run:
- stage: tokens/s of pipeline.targets.compute on one shard (shard read, teacher forward, solve, top-k,
  parquet write) with the fast solver (`--precision`) and with the reference (fista, 100 iterations,
  fp32); the goal on an H100 at d=768, K=3000 is >= 500 k tokens/s;
- solver only: the same two solvers on states already on the device, and FISTA-100 in bf16;
- quality on `--quality-tokens` real states: mean objective of each solver, its excess over a tightly
  converged float64 solution, and the mean L1 distance between its normalised code and that solution's
  (goal: fast <= reference);
- storage: bytes per token of the written shard at `--top-k` (`none`: the whole code) and `--top-mass`, and
  the mass the top-k cut loses for several k (from the converged codes);
- read: tokens/s of reading a corpus shard with its target shard back into the trainer's flat arrays
  (pipeline.pretrain.data.Shard) on one CPU core (goal >= 2 M tokens/s), and of gathering the targets of
  15 % of its tokens as the trainer's batches do (pipeline.formats.gather_entries).

    python bench/targets.py --teacher base --text-mb 40              # on the device machine
    python bench/targets.py --text-mb 0.2 --quality-tokens 1000 --device cpu      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CORPUS,
    MINILM,
    SPAMS_DICTIONARY,
    random_teacher,
    real_shards,
    save_dictionary,
    sync,
    teacher_states,
)
from pipeline.common import pick_device  # noqa: E402
from pipeline.lasso import Lasso, fista, objective  # noqa: E402
from pipeline.pretrain.data import Shard  # noqa: E402
from pipeline.stages import call  # noqa: E402
from pipeline.targets import sparse_distribution  # noqa: E402

LAMBDA = 0.05
REFERENCE = {"solver": "fista", "max_iterations": 100, "tolerance": 0.0, "precision": "fp32"}


def fitted_dictionary(states: torch.Tensor, atoms: int) -> np.ndarray:
    from pipeline.dictlearn import learn

    started = time.perf_counter()
    dictionary = learn(states, atoms, LAMBDA, 1024, 2, 50, torch.Generator().manual_seed(0))
    print(f"dictionary: K={atoms} fitted on {len(states):,} states in {time.perf_counter() - started:.0f} s")
    return dictionary.cpu().numpy()


def stage_speed(name: str, corpus_shard: str, manifest: str, dictionary: tuple[str, str], out: Path,
                params: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    stats = call("targets", params, corpus_part=corpus_shard, corpus_manifest=manifest, dictionary=dictionary[0],
                 dictionary_metrics=dictionary[1], targets=out)
    speed = stats["tokens"] / (time.perf_counter() - started)
    print(f"stage {name:>10}: {speed:>12,.0f} tokens/s  ({stats['mean_iterations']:.0f} iterations a token, "
          f"p99 {stats['p99_iterations']:.0f})")
    return speed, stats


def solver_speed(name: str, solve, x: torch.Tensor, repeats: int = 3) -> float:
    solve(x[:256])  # warm-up
    times = []
    for _ in range(repeats):
        sync(x.device)
        started = time.perf_counter()
        solve(x)
        sync(x.device)
        times.append(time.perf_counter() - started)
    speed = len(x) / min(times)
    print(f"solver {name:>9}: {speed:>12,.0f} tokens/s")
    return speed


def quality(x: torch.Tensor, dictionary: torch.Tensor, solvers: dict[str, Lasso]) -> dict:
    """Mean objective, excess over the converged float64 solution and L1 distance of normalised codes."""
    exact = Lasso(dictionary.double(), LAMBDA, "fast", 5000, 1e-7)(x.double()).codes

    def distribution(codes):
        return codes / codes.sum(1, keepdim=True).clamp_min(1e-30)

    best = float(objective(x.double(), dictionary.double(), exact, LAMBDA).mean())
    print(f"quality on {len(x):,} real tokens: converged objective {best:.5f}, mean nnz "
          f"{float((exact > 0).sum(1).float().mean()):.1f}")
    figures = {"converged_objective": best}
    for name, solver in solvers.items():
        codes = solver(x).codes.double()
        value = float(objective(x.double(), dictionary.double(), codes, LAMBDA).mean())
        distance = float((distribution(codes) - distribution(exact)).abs().sum(1).mean())
        print(f"  {name:>9}: objective {value:.5f} (+{100 * (value / best - 1):.4f} %), L1 to converged {distance:.4f}")
        figures[name] = {"objective": value, "excess": value / best - 1, "l1_to_converged": distance}
    figures["mass_lost_to_top_k"] = {}
    for k in (8, 16, 32, 64, 128, 256):
        if k <= exact.shape[1]:
            lost = float(sparse_distribution(exact.float(), k)[3].mean())
            figures["mass_lost_to_top_k"][k] = lost
    lost = figures["mass_lost_to_top_k"]
    print("  mass lost to top-k: " + ", ".join(f"k={k} {100 * v:.2f} %" for k, v in lost.items()))
    return figures


def read_speed(corpus_shard: str, target_shard: str, repeats: int = 5) -> tuple[float, float]:
    """Tokens/s of loading a shard pair into the trainer's flat arrays, and of gathering the targets of 15 %
    of its tokens (a batch's masked positions), on one core."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    times, gathers = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        shard = Shard(corpus_shard, target_shard)
        times.append(time.perf_counter() - started)
        masked = np.sort(np.random.default_rng(0).choice(len(shard.tokens), len(shard.tokens) * 15 // 100, False))
        started = time.perf_counter()
        shard.targets(masked)
        gathers.append(time.perf_counter() - started)
    return len(shard.tokens) / min(times), len(masked) / min(gathers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--text-mb", type=float, default=20.0, help="MB of raw text in the measured shard")
    p.add_argument("--teacher", default="minilm", help="minilm, base (random BERT-base weights) or a model directory")
    p.add_argument("--dictionary", help="[d, K] .npy (default: SPAMS's for minilm, fitted by the pipeline for base)")
    p.add_argument("--atoms", type=int, default=3000, help="K of a dictionary the benchmark fits")
    p.add_argument("--fit-tokens", type=int, default=200_000)
    p.add_argument("--quality-tokens", type=int, default=50_000)
    p.add_argument("--top-k", default="32", help="atoms kept per token, or none (the whole code)")
    p.add_argument("--top-mass", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="sequences per teacher forward")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="of the fast solver")
    p.add_argument("--tolerance", type=float, default=1e-2, help="relative duality gap of the fast solver")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; teacher {args.teacher}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (shard,), manifest = real_shards(work, Path(args.corpus), args.text_mb, 1)
        source = {"minilm": MINILM, "base": None}.get(args.teacher, args.teacher)
        source = source or random_teacher(work / "teacher", "base")
        fits = not args.dictionary and args.teacher != "minilm"
        x = teacher_states(source, shard, max(args.quality_tokens, args.fit_tokens if fits else 0), device)
        if args.dictionary:
            atoms = np.load(args.dictionary)
        elif args.teacher == "minilm":
            atoms = np.load(SPAMS_DICTIONARY)
        else:
            atoms = fitted_dictionary(x[: args.fit_tokens], args.atoms)
        dictionary_files = save_dictionary(work / "dictionary", atoms)
        dictionary = torch.from_numpy(np.load(dictionary_files[0])).to(device)
        x = x[: args.quality_tokens]
        print(f"d={dictionary.shape[0]}, K={dictionary.shape[1]}, lambda {LAMBDA}, top-{args.top_k}, "
              f"fast solver: tolerance {args.tolerance}, {args.precision}")

        fast = {"solver": "fast", "max_iterations": 500, "tolerance": args.tolerance, "precision": args.precision}
        top_k = args.top_k if args.top_k == "none" else int(args.top_k)
        base = {"source": source, "layer": -1, "batch_size": args.batch_size, "lambda": LAMBDA,
                "top_k": top_k, "top_mass": args.top_mass, "device": device.type, "trust_remote_code": False}
        out = work / "targets.parquet"
        stage_fast, stats = stage_speed("fast", shard, manifest, dictionary_files, out, {**base, **fast})
        bytes_per_token = out.stat().st_size / stats["tokens"]
        reads, gathers = read_speed(shard, str(out))
        stage_reference, _ = stage_speed("reference", shard, manifest, dictionary_files, work / "ref.parquet",
                                         {**base, **REFERENCE})

        solvers = {"fast": Lasso(dictionary, LAMBDA, **fast), "reference": Lasso(dictionary, LAMBDA, **REFERENCE)}
        solver_fast = solver_speed("fast", solvers["fast"], x)
        solver_reference = solver_speed("reference", solvers["reference"], x)
        low = dictionary.bfloat16()
        solver_speed("fista bf16", lambda v: fista(v.bfloat16(), low, LAMBDA, 100, gram=low.T @ low,
                                                   lip=solvers["reference"].lip), x)
        figures = quality(x, dictionary, solvers)
    print(f"storage: {bytes_per_token:.1f} bytes/token at top-{args.top_k}, top-mass {args.top_mass} "
          f"({stats['mean_kept_atoms']:.1f} atoms kept a token, "
          f"mass lost {100 * stats['mean_mass_lost_to_top_k']:.2f} %)")
    print(f"read back on one core: {reads:,.0f} tokens/s (goal >= 2 M); targets of masked tokens gathered at "
          f"{gathers:,.0f} tokens/s")
    print(f"stage fast / reference: {stage_fast / stage_reference:.2f}; solver fast / reference: "
          f"{solver_fast / solver_reference:.2f}; stage fast: {stage_fast:,.0f} tokens/s (goal >= 500 k on an H100)")
    print(json.dumps({"stage_fast": stage_fast, "stage_reference": stage_reference, "solver_fast": solver_fast,
                      "solver_reference": solver_reference, "bytes_per_token": bytes_per_token,
                      "read_tokens_per_second": reads, "gather_tokens_per_second": gathers,
                      "kept_atoms_per_token": stats["mean_kept_atoms"], "quality": figures}))


if __name__ == "__main__":
    main()
