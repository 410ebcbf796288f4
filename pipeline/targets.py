"""Stage 4, precompute_targets: per-token MLSM target distributions, one parquet shard per corpus shard.

For every position of every sequence: the teacher's state of the configured layer, L2-normalised,
coded with the non-negative lasso over the dictionary, normalised to sum 1, cut to its top-k atoms
and renormalised. Positions whose code is all zero get all-zero weights (they carry no target).

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
from .corpus import read_parquet, read_shard, write_parquet
from .dictionary import load_dictionary
from .integrity import CHECKSUM_KEY, file_entries, read_verified, write_record
from .lasso import fista, l2_normalise, lipschitz
from .resume import Resume
from .teacher import length_batches, load_encoder

STATS_KEY = b"mlsm_target_stats"


def top_k_distribution(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(atom ids [n, k], weights [n, k] summing to 1 or all 0, mass lost to truncation [n])."""
    total = codes.sum(1, keepdim=True)
    weights, ids = torch.topk(codes, k, dim=1)
    kept = weights.sum(1, keepdim=True)
    lost = torch.where(total > 0, 1.0 - kept / total.clamp_min(1e-30), torch.zeros_like(total)).squeeze(1)
    weights = torch.where(kept > 0, weights / kept.clamp_min(1e-30), torch.zeros_like(weights))
    return ids, weights, lost


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
    gram = dictionary.T @ dictionary
    lip = lipschitz(gram)

    table = read_shard(corpus_shard)
    sequences = [np.asarray(s, dtype=np.int32) for s in table["input_ids"].to_pylist()]
    types = [np.asarray(s, dtype=np.int8) for s in table["token_type_ids"].to_pylist()]
    resume = Resume(resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY],
                                 "dictionary": dictionary_record[CHECKSUM_KEY], "shard": corpus_shard})
    done = resume.load_parts()
    units = []  # per batch: atoms, weights, nnz, lost mass, entropy, iterations, atom usage
    started = time.perf_counter()
    for unit, batch in enumerate(length_batches(np.array([len(s) for s in sequences]), params["batch_size"])):
        if unit not in done:
            done[unit] = _code_batch([sequences[i] for i in batch], [types[i] for i in batch], encoder, dictionary,
                                     gram, lip, params, corpus_shard)
            resume.add_part(unit, done[unit])
        units.append((batch, done[unit]))
    seconds = time.perf_counter() - started

    atom_rows: list = [None] * len(sequences)
    weight_rows: list = [None] * len(sequences)
    for batch, result in units:
        start = 0
        for i in batch:
            stop = start + len(sequences[i])
            atom_rows[i], weight_rows[i] = result["atoms"][start:stop].ravel(), result["weights"][start:stop].ravel()
            start = stop
    stats = statistics([result for _, result in units], dictionary.shape[1])
    out_table = pa.table({
        "seq_id": table["seq_id"],
        "atom_ids": pa.array(atom_rows, pa.list_(pa.uint16())),
        "weights": pa.array(weight_rows, pa.list_(pa.float16())),
    }, schema=contract.TARGET_SCHEMA.with_metadata({STATS_KEY: json.dumps(stats).encode()}))
    write_parquet(out, out_table)
    resume.finish()
    # Timing stays in the log: the shard's bytes depend only on its inputs and params.
    log.info("targets %s: %d tokens at %.0f tokens/s, mean nnz %.1f, top-%d loses %.2f%% of the mass",
             out, stats["tokens"], stats["tokens"] / max(seconds, 1e-9), stats["mean_nnz"], k,
             100 * stats["mean_mass_lost_to_top_k"])
    return stats


def statistics(results: list[dict], atoms: int) -> dict:
    """A shard's target statistics from its batches' results (zeros for a shard without tokens, such as
    an empty validation split)."""
    if not results:
        return {"tokens": 0, "mean_nnz": 0.0, "p99_nnz": 0.0, "zero_code_fraction": 0.0,
                "mean_mass_lost_to_top_k": 0.0, "max_mass_lost_to_top_k": 0.0, "mean_entropy_nats": 0.0,
                "mean_iterations": 0.0, "atom_usage": [0.0] * atoms}
    nnz, lost, entropy = (torch.from_numpy(np.concatenate([r[key] for r in results])) for key in ("nnz", "lost", "entropy"))
    usage = np.zeros(atoms)
    for result in results:
        usage += result["usage"]
    return {
        "tokens": int(len(nnz)),
        "mean_nnz": float(nnz.float().mean()), "p99_nnz": float(torch.quantile(nnz.float(), 0.99)),
        "zero_code_fraction": float((nnz == 0).float().mean()),
        "mean_mass_lost_to_top_k": float(lost.mean()), "max_mass_lost_to_top_k": float(lost.max()),
        "mean_entropy_nats": float(entropy.mean()),
        "mean_iterations": float(np.mean([r["iterations"][0] for r in results])),
        "atom_usage": usage.tolist(),
    }


def _code_batch(sequences, types, encoder, dictionary, gram, lip, params, corpus_shard) -> dict[str, np.ndarray]:
    """Sparse codes of one batch of sequences, cut to top-k distributions, with their statistics."""
    states = encoder.states(sequences, types)
    x = l2_normalise(torch.from_numpy(np.concatenate(states)).to(dictionary.device))
    if not torch.isfinite(x).all():
        raise StageError(f"teacher {params['source']!r} produced non-finite states on shard {corpus_shard}")
    codes, used = fista(x, dictionary, params["lambda"], params["max_iterations"], params["tolerance"],
                        gram=gram, lip=lip)
    ids, weights, lost = top_k_distribution(codes, params["top_k"])
    p = weights.clamp_min(1e-30)
    usage = torch.zeros(dictionary.shape[1], dtype=torch.float64).index_add_(
        0, ids.flatten().cpu(), weights.flatten().cpu().double())
    return {
        "atoms": ids.cpu().numpy().astype(np.uint16), "weights": weights.cpu().numpy().astype(np.float16),
        "nnz": (codes > 0).sum(1).cpu().numpy().astype(np.int32), "lost": lost.cpu().numpy(),
        "entropy": (-(weights * p.log()).sum(1)).cpu().numpy(), "iterations": np.array([used], np.int32),
        "usage": usage.numpy(),
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
    summary = {
        "format_version": contract.FORMAT_VERSION["targets"], "params": params, "tokens": int(tokens.sum()),
        **{key: mean(key) for key in ("mean_nnz", "zero_code_fraction", "mean_mass_lost_to_top_k",
                                      "mean_entropy_nats", "mean_iterations")},
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
