"""Benchmark of the target shard format: how fast a target shard reads back into the trainer's arrays, and
its bytes per token, against the format of another checkout of this project measured in the same run.

The codes are real: all-MiniLM-L6-v2's last-layer states of `--code-tokens` tokens of the real corpus,
coded over the real SPAMS K=3000 dictionary (lambda 0.05) by the converged solver, then repeated over the
tokens of one corpus shard (`--text-mb` of the corpus), each token taking a random one of them with its
atom ids cyclically shifted and its weights jittered by up to 10 % (a few thousand codes repeated would
compress unrealistically well; random atom ids compress worse than real ones). Each checkout writes them
with its own pipeline.data.formats.write_targets and reads them back with its own pipeline.pretrain.data.Shard
(one CPU core, best of 5, in `--rounds` rounds that take the shards in turn): the baseline at `--top-k`,
this checkout at `--top-k`, with the whole code (top_k none) and with top_mass 0.999. Printed: tokens/s of
the read, bytes per token, and the ratios to the baseline.

    python bench/target_read.py --baseline-root /path/to/a/checkout/of/main --text-mb 2
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent


def use_checkout(root: Path) -> None:
    """Import pipeline and bench from `root` from now on (torch and the rest stay loaded)."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("pipeline", "bench")]:
        del sys.modules[name]
    sys.path[:] = [str(root)] + [p for p in sys.path if p not in (str(ROOT), str(root))]
    importlib.invalidate_caches()


def varied(tokens: int, rows: int, atoms: int, seed: int = 0):
    """For each token: which real code it takes, a cyclic shift of that code's atom ids, and a jitter of
    its weights (so that the shard does not repeat a few thousand codes, which would compress unrealistically
    well)."""
    rng = np.random.default_rng(seed)
    return rng.integers(rows, size=tokens), rng.integers(atoms, size=tokens), rng


def repeated(counts: np.ndarray, ids: np.ndarray, weights: np.ndarray, tokens: int, atoms: int):
    """Per-row entries (counts, flat ids and weights) spread over `tokens` tokens (see varied)."""
    rows, shift, rng = varied(tokens, len(counts), atoms)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    token_counts = counts[rows]
    owner = np.repeat(np.arange(tokens), token_counts)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(token_counts) - token_counts, token_counts)
    source = starts[rows][owner] + within
    jitter = rng.uniform(0.9, 1.1, size=len(source))
    return (token_counts, ((ids[source].astype(np.int64) + shift[owner]) % atoms).astype(np.uint16),
            (weights[source].astype(np.float32) * jitter).astype(np.float16))


def write(formats, targets_module, path: Path, table, codes: torch.Tensor, top_k, top_mass: float) -> None:
    """The codes, spread over the corpus shard's tokens, written by this checkout's own writer."""
    offsets = np.asarray(table["input_ids"].combine_chunks().offsets, np.int64)
    offsets = offsets - offsets[0]
    tokens, atoms = int(offsets[-1]), codes.shape[1]
    if "counts" not in inspect.signature(formats.write_targets).parameters:  # the fixed-width top-k format
        ids, weights, _ = targets_module.top_k_distribution(codes, top_k)
        rows, shift, rng = varied(tokens, len(codes), atoms)
        ids = (ids.numpy()[rows] + shift[:, None]) % atoms
        weights = weights.numpy()[rows] * rng.uniform(0.9, 1.1, size=(tokens, top_k))
        formats.write_targets(path, table["seq_id"], offsets, ids.astype(np.uint16), weights.astype(np.float16),
                              {"tokens": tokens})
        return
    counts, ids, weights, _ = targets_module.sparse_distribution(codes, None if top_k == "none" else top_k, top_mass)
    counts, ids, weights = repeated(counts.numpy(), ids.numpy(), weights.numpy(), tokens, atoms)
    formats.write_targets(path, table["seq_id"], offsets, counts, ids, weights, {"tokens": tokens})


def reader(shard_class):
    """Tokens/s of loading a shard pair into a checkout's trainer arrays (shard_class: its
    pipeline.pretrain.data.Shard), best of 5, and of gathering the targets of 15 % of its tokens (a batch's
    masked positions) where that checkout's Shard has targets(); pyarrow on one thread."""
    def read_speed(corpus_shard: str, target_shard: str, repeats: int = 5) -> tuple[float, float | None]:
        reads, gathers = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            shard = shard_class(corpus_shard, target_shard)
            reads.append(time.perf_counter() - started)
            if hasattr(shard, "targets"):
                masked = np.sort(np.random.default_rng(0).choice(len(shard.tokens), len(shard.tokens) * 15 // 100,
                                                                 False))
                started = time.perf_counter()
                shard.targets(masked)
                gathers.append(time.perf_counter() - started)
        tokens = len(shard.tokens)
        return tokens / min(reads), (tokens * 15 // 100) / min(gathers) if gathers else None

    return read_speed


def prepare(root: Path, work: Path, shard: str, codes: torch.Tensor, cuts: list[tuple]) -> list[tuple]:
    """Write the shards of each cut with `root`'s writer: (name, path, `root`'s read_speed) for each."""
    use_checkout(root)
    formats = importlib.import_module("pipeline.data.formats")
    targets_module = importlib.import_module("pipeline.targets")
    read_speed = reader(importlib.import_module("pipeline.pretrain.data").Shard)  # keeps its checkout's alive
    table = pq.read_table(shard)
    prepared = []
    for top_k, top_mass in cuts:
        path = work / f"{root.name}-{top_k}-{top_mass}.parquet"
        write(formats, targets_module, path, table, codes, top_k, top_mass)
        prepared.append((f"top_k {top_k}, top_mass {top_mass}", path, read_speed))
    return prepared


def measure(prepared: list[tuple], shard: str, tokens: int, rounds: int) -> list[dict]:
    """The best read and gather speeds of each shard over `rounds` rounds that take the shards in turn (so that
    a busy machine slows all of them alike), and its bytes per token."""
    best = [{"read_tokens_per_second": 0.0, "gather_tokens_per_second": None,
             "bytes_per_token": path.stat().st_size / tokens} for _, path, _ in prepared]
    for _ in range(rounds):
        for figures, (_, path, read_speed) in zip(best, prepared):
            reads, gathers = read_speed(shard, str(path))
            figures["read_tokens_per_second"] = max(figures["read_tokens_per_second"], reads)
            if gathers is not None:
                figures["gather_tokens_per_second"] = max(figures["gather_tokens_per_second"] or 0.0, gathers)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-root", required=True, type=Path, help="another checkout of the project")
    p.add_argument("--text-mb", type=float, default=2.0)
    p.add_argument("--code-tokens", type=int, default=2000)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds over all shards (each read best of 5)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    pa.set_cpu_count(1)  # every read on one core
    pa.set_io_thread_count(1)
    from bench.common import CORPUS, MINILM, SPAMS_DICTIONARY, real_shards, teacher_states
    from pipeline.solvers.lasso import Lasso

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (shard,), _ = real_shards(work, CORPUS, args.text_mb, 1)
        x = teacher_states(MINILM, shard, args.code_tokens, torch.device("cpu"))
        dictionary = torch.from_numpy(np.load(SPAMS_DICTIONARY)).float()
        codes = Lasso(dictionary, 0.05, "fast", 500, 1e-2)(x).codes
        print(f"{args.code_tokens} real codes, mean nnz {float((codes > 0).sum(1).float().mean()):.1f}")
        tokens = int(pq.read_table(shard)["input_ids"].combine_chunks().value_lengths().to_numpy().sum())
        baseline = prepare(args.baseline_root.resolve(), work, shard, codes, [(args.top_k, 1.0)])
        ours = prepare(ROOT, work, shard, codes, [(args.top_k, 1.0), ("none", 1.0), ("none", 0.999)])
        figures = measure(baseline + ours, shard, tokens, args.rounds)
    names = ["baseline " + name for name, _, _ in baseline] + [name for name, _, _ in ours]
    base = figures[0]
    for name, result in zip(names, figures):
        gather = result["gather_tokens_per_second"]
        print(f"{name:>40}: read {result['read_tokens_per_second']:>12,.0f} tokens/s "
              f"(x{result['read_tokens_per_second'] / base['read_tokens_per_second']:.2f}), "
              f"{result['bytes_per_token']:.1f} bytes/token "
              f"(x{result['bytes_per_token'] / base['bytes_per_token']:.2f})"
              + (f", masked targets gathered at {gather:,.0f} tokens/s" if gather else ""))
    print(json.dumps(dict(zip(names, figures))))


if __name__ == "__main__":
    main()
