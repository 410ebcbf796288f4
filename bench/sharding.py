"""Benchmark of shard_corpus on the CPU: MB/s of raw text per core, as a ratio to plain tokenization.

Both sides run in this process on the same text with the same fast tokenizer, so the ratio holds on
a noisy machine where absolute MB/s do not. Plain tokenization = read and decode the lines, then the
tokenizer's batch encoding; sharding = everything shard_corpus does (reading, checks, tokenizing,
packing, validation split, spilling, shuffling, parquet writing, manifest).

Workers: the same sharding with `--workers` processes (default: all cores), timed right after each
1-worker run; the speedup is the median of those pairs (goal >= 1.6 with 2 workers on 2 free cores).

    python bench/sharding.py [--corpus ../shared/data/corpus/train.txt.gz] [--megabytes 12] [--repeats 5]
    python bench/sharding.py --megabytes 6 --repeats 3          # the CPU smoke run (make bench), ~1 minute
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, on both sides

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import CORPUS, emit, text_prefix  # noqa: E402
from bench.common import MINILM as TOKENIZER  # noqa: E402
from pipeline.corpus import shard  # noqa: E402
from pipeline.data.text import input_files  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402


def plain_tokenization(path: Path, batch_lines: int = 4096) -> float:
    """Seconds to read the lines and tokenize them in batches (the fastest plain use of the tokenizer)."""
    backend = load_tokenizer(TOKENIZER).backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    started = time.perf_counter()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        batch = []
        for line in fh:
            line = line.strip()
            if line:
                batch.append(line)
            if len(batch) == batch_lines:
                [e.ids for e in encode(batch, add_special_tokens=False)]
                batch = []
        [e.ids for e in encode(batch, add_special_tokens=False)]
    return time.perf_counter() - started


def sharding(path: Path, out: Path, workers: int) -> tuple[float, dict]:
    params = {"tokenizer": TOKENIZER, "max_seq_len": 128, "seed": 0, "validation_fraction": 0.01}
    started = time.perf_counter()
    manifest = shard(input_files([str(path)]), [str(out / f"shard-{i:03d}.parquet") for i in range(4)],
                     str(out / "manifest.json"), params, workers=workers)
    return time.perf_counter() - started, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--megabytes", type=float, default=12.0, help="MB of text taken from the corpus' start")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5,
                   help="runs of each side (plain, 1 worker, all workers), back to back")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    load_tokenizer(TOKENIZER)  # imports paid once, before either side is timed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "corpus.txt.gz"
        megabytes = text_prefix(args.corpus, args.megabytes, text)
        # This machine's speed drifts by tens of percent within a minute: each ratio comes from runs back
        # to back (plain, sharding with 1 worker, sharding with all workers), and the median is reported.
        runs = []
        for repeat in range(args.repeats):
            plain = plain_tokenization(text)
            one, manifest = sharding(text, tmp / f"one{repeat}", 1)
            many, _ = sharding(text, tmp / f"many{repeat}", args.workers)
            runs.append((plain, one, many))
    ratios = sorted(plain / one for plain, one, _ in runs)
    speedups = sorted(one / many for _, one, many in runs)
    plain, one, many = (statistics.median(column) for column in zip(*runs))
    figures = {
        "text_mb": round(megabytes, 2), "tokens": manifest["tokens"], "sequences": manifest["sequences"],
        "plain_tokenization_mb_per_s": round(megabytes / plain, 3),
        "sharding_mb_per_s_per_core": round(megabytes / one, 3),
        "ratio_sharding_to_plain_tokenization": round(statistics.median(ratios), 3),
        "ratio_of_each_pair": [round(r, 3) for r in ratios],
        f"sharding_mb_per_s_with_{args.workers}_workers": round(megabytes / many, 3),
        "parallel_speedup": round(statistics.median(speedups), 2),
        "speedup_of_each_pair": [round(r, 2) for r in speedups],
        "load_average": os.getloadavg()[0],
    }
    emit(figures, args.json, indent=2)


if __name__ == "__main__":
    main()
