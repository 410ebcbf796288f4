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
  fp32), both on the same shard: the whole one, or with `--reference-mb` a shard of that much text
  (the reference is slow on a CPU); the goal on an H100 at d=768, K=3000 is >= 500 k tokens/s, on a
  CPU fast >= 5x the reference;
- solver only: the same two solvers on states already on the device, FISTA-100 in bf16, and FISTA-100
  with the products the MLSM reference code uses (D^T (D y), 4dK flops a row, against the 2K^2 of
  pipeline.solvers.lasso.fista's Gram products; the same iterates);
- quality on `--quality-tokens` real states: mean objective of each solver, its excess over a tightly
  converged float64 solution, and the mean L1 distance between its normalised code and that solution's
  (goal: fast <= reference);
- storage: bytes per token of the written shard at `--top-k` (`none`: the whole code) and `--top-mass`, and
  the mass the top-k cut loses for several k (from the converged codes);
- read: tokens/s of reading a corpus shard with its target shard back into the trainer's flat arrays
  (pipeline.pretrain.data.Shard) on one CPU core (goal >= 2 M tokens per CPU second), on a pair of
  `--read-mb` MB of text whose targets are the fast stage's rows repeated (see read_speed), and of gathering
  the targets of 15 % of its tokens as the trainer's batches do (pipeline.data.formats.gather_entries).

    python bench/targets.py --teacher base --text-mb 40              # on the device machine
    python bench/targets.py --text-mb 0.01 --quality-tokens 256 --repeats 1 --device cpu
                                                            # the CPU smoke run (make bench), ~2 minutes
"""

from __future__ import annotations

import argparse
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
    emit,
    random_teacher,
    real_shards,
    save_dictionary,
    sync,
    teacher_states,
)
from pipeline.common import pick_device  # noqa: E402
from pipeline.data.formats import read_targets, shard_tokens, target_entries, target_stats, write_targets  # noqa: E402
from pipeline.pretrain.data import Shard  # noqa: E402
from pipeline.solvers import fista_steps  # noqa: E402
from pipeline.solvers.lasso import Lasso, fista, objective  # noqa: E402
from pipeline.stages import call  # noqa: E402
from pipeline.targets import sparse_distribution  # noqa: E402

LAMBDA = 0.05
REFERENCE = {"solver": "fista", "max_iterations": 100, "tolerance": 0.0, "precision": "fp32"}


def fitted_dictionary(states: torch.Tensor, atoms: int) -> np.ndarray:
    from pipeline.solvers.dictlearn import learn

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


def read_speed(args, work: Path, target_shard: str, repeats: int = 5) -> dict:
    """Tokens/s of loading a shard pair into the trainer's flat arrays with pyarrow on one thread: per
    second of wall clock and per second of this process' CPU time (one core's worth, whatever else runs
    on a shared machine). The pair holds `--read-mb` MB of real text and, written by the stage's writer,
    the fast stage's real target rows repeated to its length: a shard of the smoke run's few thousand
    tokens would measure opening two files, and reading does not depend on which rows repeat."""
    (work / "read").mkdir()
    (corpus_shard,), _ = real_shards(work / "read", Path(args.corpus), args.read_mb, 1)
    offsets, _, _, table = shard_tokens(corpus_shard)
    token_offsets, atoms, weights = target_entries(read_targets(target_shard))
    tokens = int(offsets[-1])
    # Token t of the pair takes the solved token t mod n: its entries, in the stage's own format.
    source = np.arange(tokens) % (len(token_offsets) - 1)
    counts = token_offsets[source + 1] - token_offsets[source]
    first = np.cumsum(counts) - counts
    entries = np.repeat(token_offsets[source] - first, counts) + np.arange(int(counts.sum()))
    target_path = work / "read" / "targets.parquet"
    write_targets(target_path, table["seq_id"], offsets, counts.astype(np.uint16), atoms[entries], weights[entries],
                  target_stats(target_shard))
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    wall, cpu, gathers = [], [], []
    masked = np.sort(np.random.default_rng(0).choice(tokens, tokens * 15 // 100, False))
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        shard = Shard(corpus_shard, str(target_path))
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        started = time.perf_counter()
        shard.targets(masked)
        gathers.append(time.perf_counter() - started)
    assert len(shard.tokens) == tokens
    return {"read_tokens": tokens, "read_tokens_per_second": tokens / min(wall),
            "read_tokens_per_cpu_second": tokens / min(cpu), "gather_tokens_per_second": len(masked) / min(gathers)}


def reference_factored(x: torch.Tensor, dictionary: torch.Tensor, lip: float) -> torch.Tensor:
    """FISTA-100 as the MLSM reference code computes it, with D^T (D y) products (4dK flops a row) where
    pipeline.solvers.lasso.fista multiplies by the Gram matrix (2K^2): the same iterates, for the record."""
    correlation, codes = x @ dictionary, torch.zeros(len(x), dictionary.shape[1], device=x.device)
    momentum, t = codes, 1.0
    for _ in range(100):
        gradient = (momentum @ dictionary.T) @ dictionary - correlation
        new = torch.clamp_min(momentum - (gradient + LAMBDA) / lip, 0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        momentum, codes, t = new + ((t - 1.0) / t_next) * (new - codes), new, t_next
    return codes


def dictionary_for(args, work: Path, source: str, x: torch.Tensor) -> np.ndarray:
    if args.dictionary:
        return np.load(args.dictionary)
    if args.teacher == "minilm":
        return np.load(SPAMS_DICTIONARY)
    return fitted_dictionary(x[: args.fit_tokens], args.atoms)


def stages(args, work: Path, shard: str, manifest: str, dictionary_files, base: dict, fast: dict) -> dict:
    """Both stages on the same shard (the ratio's; --reference-mb makes it a smaller one than the shard
    the fast stage's storage and read-back figures come from)."""
    out = work / "targets.parquet"
    stage_fast, stats = stage_speed("fast", shard, manifest, dictionary_files, out, {**base, **fast})
    figures = {"stage_fast": stage_fast, "tokens": stats["tokens"],
               "mean_mass_lost_to_top_k": stats["mean_mass_lost_to_top_k"],
               "kept_atoms_per_token": stats["mean_kept_atoms"],
               "bytes_per_token": out.stat().st_size / stats["tokens"],
               **read_speed(args, work, str(out))}
    if args.reference_mb:
        paired = work / "paired"
        paired.mkdir()
        (shard,), manifest = real_shards(paired, Path(args.corpus), args.reference_mb, 1)
        figures["stage_fast_paired"], _ = stage_speed("fast", shard, manifest, dictionary_files,
                                                      paired / "targets.parquet", {**base, **fast})
    figures["stage_reference"], _ = stage_speed("reference", shard, manifest, dictionary_files, work / "ref.parquet",
                                                {**base, **REFERENCE})
    figures["ratio_stage_fast_to_reference"] = figures.get("stage_fast_paired", stage_fast) / figures["stage_reference"]
    return figures


def solvers_alone(args, dictionary: torch.Tensor, x: torch.Tensor, fast: dict) -> dict:
    solvers = {"fast": Lasso(dictionary, LAMBDA, **fast), "reference": Lasso(dictionary, LAMBDA, **REFERENCE)}
    figures = {"solver_fast": solver_speed("fast", solvers["fast"], x, args.repeats),
               "solver_reference": solver_speed("reference", solvers["reference"], x, args.repeats)}
    if x.is_cuda:  # the fast solver's elementwise steps compiled into fused kernels, against eager ones
        fista_steps.FUSE_ON_GPU = False
        figures["solver_fast_eager_steps"] = solver_speed("fast eager", solvers["fast"], x, args.repeats)
        fista_steps.FUSE_ON_GPU = True
        figures["ratio_fused_steps_to_eager"] = figures["solver_fast"] / figures["solver_fast_eager_steps"]
    lip = solvers["reference"].lip
    figures["solver_reference_factored"] = solver_speed(
        "ref. D^T(Dy)", lambda v: reference_factored(v, dictionary, lip), x, args.repeats)
    low = dictionary.bfloat16()
    figures["solver_fista_bf16"] = solver_speed(
        "fista bf16", lambda v: fista(v.bfloat16(), low, LAMBDA, 100, gram=low.T @ low, lip=lip), x, args.repeats)
    figures["quality"] = quality(x, dictionary, solvers)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--text-mb", type=float, default=20.0, help="MB of raw text in the measured shard")
    p.add_argument("--reference-mb", type=float, help="MB of text (a prefix) both stages run on for their ratio "
                                                      "(default: the whole shard)")
    p.add_argument("--teacher", default="minilm", help="minilm, base (random BERT-base weights) or a model directory")
    p.add_argument("--dictionary", help="[d, K] .npy (default: SPAMS's for minilm, fitted by the pipeline for base)")
    p.add_argument("--atoms", type=int, default=3000, help="K of a dictionary the benchmark fits")
    p.add_argument("--fit-tokens", type=int, default=200_000)
    p.add_argument("--quality-tokens", type=int, default=50_000)
    p.add_argument("--read-mb", type=float, default=1.0, help="MB of text in the shard pair read back")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each solver alone (the fastest counts)")
    p.add_argument("--top-k", default="32", help="atoms kept per token, or none (the whole code)")
    p.add_argument("--top-mass", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="sequences per teacher forward")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="of the fast solver")
    p.add_argument("--tolerance", type=float, default=1e-2, help="relative duality gap of the fast solver")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this JSON file")
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
        dictionary_files = save_dictionary(work / "dictionary", dictionary_for(args, work, source, x))
        dictionary = torch.from_numpy(np.load(dictionary_files[0])).to(device)
        x = x[: args.quality_tokens]
        print(f"d={dictionary.shape[0]}, K={dictionary.shape[1]}, lambda {LAMBDA}, top-{args.top_k}, "
              f"fast solver: tolerance {args.tolerance}, {args.precision}")
        fast = {"solver": "fast", "max_iterations": 500, "tolerance": args.tolerance, "precision": args.precision}
        top_k = args.top_k if args.top_k == "none" else int(args.top_k)
        base = {"source": source, "layer": -1, "batch_size": args.batch_size, "lambda": LAMBDA,
                "top_k": top_k, "top_mass": args.top_mass, "device": device.type, "trust_remote_code": False}
        figures = stages(args, work, shard, manifest, dictionary_files, base, fast)
        figures.update(solvers_alone(args, dictionary, x, fast))
    print(f"storage: {figures['bytes_per_token']:.1f} bytes/token at top-{args.top_k}, top-mass {args.top_mass} "
          f"({figures['kept_atoms_per_token']:.1f} atoms kept a token, "
          f"mass lost {100 * figures['mean_mass_lost_to_top_k']:.2f} %)")
    print(f"read back on one core: {figures['read_tokens_per_cpu_second']:,.0f} tokens per CPU second (goal >= 2 M), "
          f"{figures['read_tokens_per_second']:,.0f} tokens/s of wall clock ({figures['read_tokens']:,} tokens); "
          f"targets of masked tokens gathered at {figures['gather_tokens_per_second']:,.0f} tokens/s")
    print(f"stage fast / reference: {figures['ratio_stage_fast_to_reference']:.2f} (goal >= 5); solver fast / "
          f"reference: {figures['solver_fast'] / figures['solver_reference']:.2f} (/ reference in D^T(Dy) form: "
          f"{figures['solver_fast'] / figures['solver_reference_factored']:.2f}); stage fast: "
          f"{figures['stage_fast']:,.0f} tokens/s (goal >= 500 k on an H100)")
    emit(figures, args.json)


if __name__ == "__main__":
    main()
