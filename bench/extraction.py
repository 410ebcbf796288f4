"""Benchmark of extract_activations: teacher tokens/s against a bare forward pass, and peak memory.

Throughput: a BERT-base-shaped teacher (12 layers, d=768, random weights: no download) runs on
contiguous 128-token sequences read from corpus shards; layer 11 (-2) is kept and `positions` states
per sequence are written to the zarr store, so the teacher sees every sequence. The figure is teacher
tokens/s of the whole stage (shard reading, sampling, forward, gather, store appends) and its ratio
to a bare forward pass of the same truncated model, bf16 autocast on a GPU, measured in the same run
(steady state: the stage's per-shard rates; the figure with process start-up is printed too).

Memory: the same stage in a fresh process on a corpus and on one `--rss-factor` times larger (same
number of shards, so each shard is larger too); the peak RSS of the two should be about equal (goal:
ratio <= 1.05). The smaller corpus should fill what the stage holds at its largest: each shard at
least one teacher batch (`--batch-size` sequences) and the store at least one zarr chunk
(pipeline.data.formats.STORE_CHUNK_ROWS sampled states), or the ratio measures how full those are, not growth.

    python bench/extraction.py                       # on the device machine: --shape base
    python bench/extraction.py --shape tiny --sequences 4000 --positions 32 --batch-size 64 --device cpu
                                                      # the CPU smoke run (make bench), ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MINILM as TOKENIZER  # noqa: E402
from bench.common import SHAPES, emit, random_teacher, sync
from pipeline.data import contract  # noqa: E402
from pipeline.data.formats import write_parquet  # noqa: E402
from pipeline.data.integrity import file_entries, write_record  # noqa: E402
from pipeline.models import load_tokenizer, tokenizer_fingerprint  # noqa: E402

SEQ_LEN = 128


def make_corpus(directory: Path, sequences: int, shards: int, seed: int = 0) -> tuple[list[str], str]:
    """Shards of full-length sequences ([CLS] 126 ids [SEP]) and their manifest: the stage's real input."""
    tokenizer = load_tokenizer(TOKENIZER)
    rng = np.random.default_rng(seed)
    paths, entries, first = [], [], 0
    for index, count in enumerate(np.diff(np.linspace(0, sequences, shards + 1).astype(int))):
        body = rng.integers(1996, len(tokenizer), size=(count, SEQ_LEN - 2), dtype=np.int32)
        ids = np.concatenate([np.full((count, 1), tokenizer.cls_token_id, np.int32), body,
                              np.full((count, 1), tokenizer.sep_token_id, np.int32)], axis=1)
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * SEQ_LEN)
        table = pa.table({"seq_id": pa.array(np.arange(first, first + count), pa.int64()),
                          "doc_id": pa.array(np.arange(first, first + count), pa.int64()),
                          "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel())),
                          "token_type_ids": pa.ListArray.from_arrays(offsets, pa.array(np.zeros(ids.size, np.int8)))},
                         schema=contract.CORPUS_SCHEMA)
        path = directory / f"shard-{index:03d}.parquet"
        write_parquet(path, table)
        paths.append(str(path))
        entries.append({"path": path.name, "sequences": int(count), "tokens": int(ids.size)})
        first += count
    manifest = directory / "manifest.json"
    write_record(manifest, {"format_version": contract.FORMAT_VERSION["corpus"], "tokenizer": TOKENIZER,
                            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                            "sequences": sequences, "tokens": sequences * SEQ_LEN, "shards": entries,
                            "files": file_entries(directory, paths)})
    return paths, str(manifest)


def stage_params(teacher: Path, sequences: int, positions: int, batch_size: int, device: str) -> dict:
    return {"teacher": "bench", "source": str(teacher), "layer": -2, "batch_size": batch_size, "device": device,
            "sample_tokens": sequences * positions, "sample_seed": 0, "subsample": "none",
            "subsample_threshold": 1e-4, "positions_per_sequence": positions, "tokenizer": TOKENIZER,
            "trust_remote_code": False}


@torch.inference_mode()
def bare_forward(teacher: Path, batch_size: int, device: torch.device, seconds: float = 10.0) -> float:
    """Tokens/s of the truncated teacher alone on device-resident random ids (no data, no store)."""
    from pipeline.models import load_encoder

    encoder = load_encoder(str(teacher), -2, device)
    ids = torch.randint(1996, 30000, (batch_size, SEQ_LEN), device=device)
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    step = lambda: encoder.model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state  # noqa: E731
    with encoder.autocast():
        for _ in range(3):
            step()
        sync(device)
        started, batches = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            step()
            batches += 1
            if device.type != "cuda" or batches % 10 == 0:
                sync(device)
        sync(device)
    return batches * batch_size * SEQ_LEN / (time.perf_counter() - started)


def run_stage_in_child(shards: list[str], manifest: str, out: Path, params: dict) -> dict:
    """The stage's command line in a fresh process: wall seconds and its own peak RSS (MB)."""
    command = [sys.executable, "-m", "pipeline.teacher", "--corpus-manifest", manifest, "--corpus-shards", *shards,
               "--store", str(out), "--manifest", str(out.with_suffix(".json")), "--params", json.dumps(params)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
        # wait4 gives this child's peak alone (RUSAGE_CHILDREN holds the largest of all children so far).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        log.seek(0)
        stderr = log.read()
    if child.returncode != 0:
        raise SystemExit(stderr[-3000:])
    # The stage logs each shard's teacher tokens and rate: their sum is the throughput without start-up.
    shards = [(float(n), float(n) / float(rate)) for n, rate in
              re.findall(r"teacher ran on (\d+) tokens \(([\d.]+) tokens/s\)", stderr)]
    steady = sum(n for n, _ in shards) / max(1e-9, sum(s for _, s in shards))
    return {"seconds": seconds, "steady_tokens_per_s": steady, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the truncated teacher's "unexpected keys" (the layers above) are intended
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="base")
    p.add_argument("--sequences", type=int, default=160_000, help="sequences of 128 tokens in the corpus")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--positions", type=int, default=8, help="states written per sequence")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--rss-factor", type=int, default=4)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = Path(random_teacher(tmp / "teacher", args.shape))
        bare = bare_forward(teacher, args.batch_size, device)
        figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
                   "layer": "11 of 12" if args.shape == "base" else "-2", "seq_len": SEQ_LEN,
                   "bare_forward_tokens_per_s": round(bare)}
        sizes = {"small": args.sequences // args.rss_factor, "large": args.sequences}
        for name, sequences in sizes.items():
            (tmp / name).mkdir()
            shards, manifest = make_corpus(tmp / name, sequences, args.shards)
            params = stage_params(teacher, sequences, args.positions, args.batch_size, device.type)
            run = run_stage_in_child(shards, manifest, tmp / name / "activations.zarr", params)
            tokens = sequences * SEQ_LEN
            figures[f"{name}_corpus"] = {"tokens": tokens, "sampled_states": sequences * args.positions,
                                         "stage_seconds": round(run["seconds"], 2),
                                         "stage_tokens_per_s_with_startup": round(tokens / run["seconds"]),
                                         "stage_tokens_per_s": round(run["steady_tokens_per_s"]),
                                         "peak_rss_mb": run["peak_rss_mb"]}
        large = figures["large_corpus"]
        figures["ratio_stage_to_bare_forward"] = round(large["stage_tokens_per_s"] / bare, 3)
        small_rss = figures["small_corpus"]["peak_rss_mb"]
        figures["peak_rss_ratio_large_to_small"] = round(large["peak_rss_mb"] / small_rss, 3)
    emit(figures, args.json, indent=2)


if __name__ == "__main__":
    main()
