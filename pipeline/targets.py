"""Stage 4, precompute_targets: per-token MLSM target distributions, one parquet shard per corpus shard.

For every position of every sequence: the teacher's state of the configured layer, L2-normalised,
coded with the non-negative lasso over the dictionary (pipeline.lasso: the reference `fista` or the
converged `fast` solver), normalised to sum 1, cut to its top-k atoms and renormalised. A position
whose code is all zero (its state correlates with no atom above lambda) gets all-zero weights: it
carries no target, the trainer leaves it out of the MLSM loss, and the statistics count it.

The states are computed on the fly by the teacher rather than read from a full activation store: a
BERT-base-shaped forward runs at ~1.7 M tokens/s on an H100, while a store of every token's state
(d=768 float16, 1.5 kB a token) would need 2.5 GB/s of disk reads to keep up and 1.5 TB per billion
tokens. Everything up to the top-k cut stays on the device; only ids and weights come back.

    python -m pipeline.targets --corpus-shard s0.parquet --corpus-manifest m.json --dictionary D.npy \
        --dictionary-metrics metrics.json --out t0.parquet [--resume-dir state/] --params '{"source": ..., "layer": -1, "lambda": 0.05, "top_k": 32, ...}'
    python -m pipeline.targets --summarize t0.parquet t1.parquet [--validation v.parquet] --manifest manifest.json --params '{}'
The validation split (corpus/validation.parquet) is coded the same way, as one more "shard".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from . import contract
from .common import StageError, log, parser, pick_device, run_stage, set_cpu_threads
from .corpus import flat_list, pad_rows, read_parquet, read_shard, write_parquet
from .dictionary import load_dictionary
from .integrity import CHECKSUM_KEY, file_entries, read_verified, write_record
from .lasso import Lasso, l2_normalise
from .resume import Resume
from .teacher import length_batches, load_encoder

STATS_KEY = b"mlsm_target_stats"
# Plain byte-stream-split values with fast zstd: reads back ~3x faster than dictionary encoding on one
# core (the list decoding dominates) and is smaller too (bench/targets.py).
TARGET_ENCODING = {"use_dictionary": False, "compression_level": 1,
                   "column_encoding": {"atom_ids.list.element": "BYTE_STREAM_SPLIT",
                                       "weights.list.element": "BYTE_STREAM_SPLIT"}}
NNZ_BINS = (0, 1, 8, 16, 32, 64, 128, 256, 512, 1024)  # left edges of the nnz histogram's bins


def top_k_distribution(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(atom ids [n, k], weights [n, k] summing to 1 or all 0, mass lost to truncation [n])."""
    total = codes.sum(1, keepdim=True)
    weights, ids = torch.topk(codes, k, dim=1)
    kept = weights.sum(1, keepdim=True)
    lost = torch.where(total > 0, 1.0 - kept / total.clamp_min(1e-30), torch.zeros_like(total)).squeeze(1)
    weights = torch.where(kept > 0, weights / kept.clamp_min(1e-30), torch.zeros_like(weights))
    return ids, weights, lost


def make_solver(dictionary: torch.Tensor, params: dict) -> Lasso:
    """The lasso solver the targets section configures (shared with the trainer's online targets)."""
    return Lasso(dictionary, params["lambda"], params["solver"], params["max_iterations"], params["tolerance"],
                 params.get("precision", "fp32"))


def compute(corpus_shard: str, manifest_path: str, dictionary_path: str, metrics_path: str, out: str, params: dict,
            resume_dir: str | None = None) -> dict:
    set_cpu_threads()
    device = pick_device(params.get("device", "auto"))
    manifest = read_verified(manifest_path, [corpus_shard])
    dictionary_record = read_verified(metrics_path, [dictionary_path])
    encoder = load_encoder(params["source"], params["layer"], device, manifest, params["trust_remote_code"])
    dictionary = torch.from_numpy(load_dictionary(dictionary_path)).float().to(device)
    if dictionary.shape[0] != encoder.hidden_size:
        raise StageError(f"dictionary {dictionary_path} has atoms of size {dictionary.shape[0]} but teacher "
                         f"{params['source']!r} has hidden size {encoder.hidden_size}")
    k = params["top_k"]
    if k > dictionary.shape[1]:
        raise StageError(f"top_k {k} exceeds the dictionary's {dictionary.shape[1]} atoms")
    solver = make_solver(dictionary, params)

    table = read_shard(corpus_shard)
    offsets, tokens = flat_list(table, "input_ids")
    _, types = flat_list(table, "token_type_ids")
    tokens, types = tokens[offsets[0]:offsets[-1]], types[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if len(tokens) * k >= 2**31:  # the list columns' offsets are int32
        raise StageError(f"corpus shard {corpus_shard} has {len(tokens):,} tokens: with top_k {k} its target shard "
                         f"would exceed 2^31 values per column; use more corpus shards (corpus.shards)")
    resume = Resume(resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY],
                                 "dictionary": dictionary_record[CHECKSUM_KEY], "shard": corpus_shard})
    done = resume.load_parts()
    atoms = np.zeros((len(tokens), k), np.uint16)
    weights = np.zeros((len(tokens), k), np.float16)
    results = []
    started, computed = time.perf_counter(), 0
    for unit, rows in enumerate(length_batches(np.diff(offsets), params["batch_size"])):
        index, ids = pad_rows(offsets, tokens, rows, encoder.pad_id)
        if unit not in done:
            done[unit] = _code_batch(ids, pad_rows(offsets, types, rows, 0)[1], index >= 0, encoder, solver, k,
                                     params, corpus_shard)
            resume.add_part(unit, done[unit])
            computed += int((index >= 0).sum())
        flat = index[index >= 0]  # row-major, as the batch's states were gathered
        atoms[flat], weights[flat] = done[unit]["atoms"], done[unit]["weights"]
        results.append(done[unit])
    seconds = time.perf_counter() - started

    stats = statistics(results, dictionary.shape[1])
    stats["dictionary"] = dictionary_record[CHECKSUM_KEY]
    list_offsets = pa.array(offsets * k, pa.int32())
    out_table = pa.table({
        "seq_id": table["seq_id"],
        "atom_ids": pa.ListArray.from_arrays(list_offsets, pa.array(atoms.ravel(), pa.uint16())),
        "weights": pa.ListArray.from_arrays(list_offsets, pa.array(weights.ravel(), pa.float16())),
    }, schema=contract.TARGET_SCHEMA.with_metadata({STATS_KEY: json.dumps(stats).encode()}))
    write_parquet(out, out_table, **TARGET_ENCODING)
    resume.finish()
    # Timing stays in the log: the shard's bytes depend only on its inputs and params.
    log.info("targets %s: %d tokens (%d computed) at %.0f tokens/s, mean nnz %.1f, %.1f solver iterations, "
             "top-%d loses %.2f%% of the mass", out, stats["tokens"], computed, computed / max(seconds, 1e-9),
             stats["mean_nnz"], stats["mean_iterations"], k, 100 * stats["mean_mass_lost_to_top_k"])
    return stats


def _code_batch(ids, types, valid, encoder, solver: Lasso, k: int, params, corpus_shard) -> dict[str, np.ndarray]:
    """Top-k target distributions of one padded batch's real positions (row-major), with their statistics."""
    hidden = encoder.hidden(ids, types, valid.sum(1))
    x = l2_normalise(hidden[torch.from_numpy(valid).to(hidden.device)].float())
    if not torch.isfinite(x).all():
        raise StageError(f"teacher {params['source']!r} produced non-finite states on shard {corpus_shard}")
    solution = solver(x)
    codes = solution.codes
    ids_k, weights_k, lost = top_k_distribution(codes, k)
    usage = torch.zeros(codes.shape[1], dtype=torch.float64, device=codes.device).index_add_(
        0, ids_k.flatten(), weights_k.flatten().double())
    entropy = -(weights_k * weights_k.clamp_min(1e-30).log()).sum(1)
    return {
        "atoms": ids_k.int().cpu().numpy().astype(np.uint16), "weights": weights_k.half().cpu().numpy(),
        "nnz": (codes > 0).sum(1).int().cpu().numpy(), "lost": lost.cpu().numpy(),
        "entropy": entropy.cpu().numpy(), "iterations": solution.iterations.cpu().numpy(),
        "usage": usage.cpu().numpy(),
    }


def statistics(results: list[dict], atoms: int) -> dict:
    """A shard's target statistics from its batches' results (zeros for a shard without tokens, such as
    an empty validation split)."""
    if not results:
        return {"tokens": 0, "mean_nnz": 0.0, "p99_nnz": 0.0, "nnz_histogram": [0] * len(NNZ_BINS),
                "zero_code_fraction": 0.0, "mean_mass_lost_to_top_k": 0.0, "max_mass_lost_to_top_k": 0.0,
                "mean_entropy_nats": 0.0, "mean_iterations": 0.0, "p99_iterations": 0.0, "atom_usage": [0.0] * atoms}
    nnz, lost, entropy, iterations = (np.concatenate([r[key] for r in results])
                                      for key in ("nnz", "lost", "entropy", "iterations"))
    usage = np.sum([r["usage"] for r in results], axis=0)
    return {
        "tokens": int(len(nnz)),
        "mean_nnz": float(nnz.mean()), "p99_nnz": float(np.quantile(nnz, 0.99)),
        "nnz_histogram": np.histogram(nnz, bins=[*NNZ_BINS, max(NNZ_BINS[-1], int(nnz.max())) + 1])[0].tolist(),
        "zero_code_fraction": float((nnz == 0).mean()),
        "mean_mass_lost_to_top_k": float(lost.mean()), "max_mass_lost_to_top_k": float(lost.max()),
        "mean_entropy_nats": float(entropy.mean()),
        "mean_iterations": float(iterations.mean()), "p99_iterations": float(np.quantile(iterations, 0.99)),
        "atom_usage": usage.tolist(),
    }


def read_targets(path: str) -> pa.Table:
    return read_parquet(path, contract.TARGET_SCHEMA, "target shard")


def summarize(shards: list[str], manifest: str, params: dict, validation: str | None = None) -> dict:
    """The stage's record: the training shards' statistics summed, and the validation targets' apart."""
    per_shard = [shard_stats(path) for path in shards]
    tokens = np.array([s["tokens"] for s in per_shard], dtype=float)

    def mean(key):
        return float(np.average([s[key] for s in per_shard], weights=tokens))

    usage = np.sum([s["atom_usage"] for s in per_shard], axis=0)
    dictionaries = {s.get("dictionary") for s in per_shard}
    if len(dictionaries) != 1:
        raise StageError("target shards were coded over different dictionaries; rerun precompute_targets")
    summary = {
        "format_version": contract.FORMAT_VERSION["targets"], "params": params, "dictionary": dictionaries.pop(),
        "tokens": int(tokens.sum()),
        **{key: mean(key) for key in ("mean_nnz", "zero_code_fraction", "mean_mass_lost_to_top_k",
                                      "mean_entropy_nats", "mean_iterations")},
        "zero_code_tokens": int(round(sum(s["zero_code_fraction"] * s["tokens"] for s in per_shard))),
        "max_mass_lost_to_top_k": max(s["max_mass_lost_to_top_k"] for s in per_shard),
        "nnz_histogram": {"bins": list(NNZ_BINS), "tokens": np.sum([s["nnz_histogram"] for s in per_shard], 0).tolist()},
        "atoms_used_fraction": float((usage > 0).mean()),
        "atom_usage_histogram": np.histogram(usage / max(usage.sum(), 1e-30), bins=10)[0].tolist(),
        "shards": [{"path": p.rsplit("/", 1)[-1], "tokens": s["tokens"]} for p, s in zip(shards, per_shard)],
        "files": file_entries(Path(manifest).parent, [*shards, *filter(None, [validation])]),
    }
    if validation:
        stats = shard_stats(validation)
        summary["validation"] = {"path": validation.rsplit("/", 1)[-1], "tokens": stats["tokens"],
                                 "mean_nnz": stats["mean_nnz"], "zero_code_fraction": stats["zero_code_fraction"]}
    write_record(manifest, summary)
    return summary


def shard_stats(path: str) -> dict:
    metadata = read_targets(path).schema.metadata or {}
    if STATS_KEY not in metadata:
        raise StageError(f"target shard {path} has no statistics; it was not written by this stage")
    return json.loads(metadata[STATS_KEY])


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--corpus-shard")
    p.add_argument("--corpus-manifest")
    p.add_argument("--dictionary")
    p.add_argument("--dictionary-metrics", help="the dictionary stage's record, to verify the dictionary")
    p.add_argument("--out")
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    p.add_argument("--summarize", nargs="+", help="target shards to summarise into --manifest")
    p.add_argument("--manifest")
    p.add_argument("--validation", help="with --summarize: the validation split's targets, listed apart")
    args = p.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.manifest, args.params, args.validation)
    else:
        compute(args.corpus_shard, args.corpus_manifest, args.dictionary, args.dictionary_metrics, args.out,
                args.params, args.resume_dir)


if __name__ == "__main__":
    run_stage(main)
