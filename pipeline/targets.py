"""Stage 4, precompute_targets: per-token MLSM target distributions of one corpus part (a training shard or
the validation split), as one parquet shard.

For every position of every sequence: the teacher's state of the configured layer, L2-normalised,
coded with the non-negative lasso over the dictionary (pipeline.lasso: the reference `fista` or the
converged `fast` solver), normalised to sum 1, cut to its top-k atoms and renormalised. A position
whose code is all zero (its state correlates with no atom above lambda) gets all-zero weights: it
carries no target, the trainer leaves it out of the MLSM loss, and the statistics count it.

The states are computed on the fly by the teacher rather than read from a full activation store: a
BERT-base-shaped forward runs at ~1.7 M tokens/s on an H100, while a store of every token's state
(d=768 float16, 1.5 kB a token) would need 2.5 GB/s of disk reads to keep up and 1.5 TB per billion
tokens. Everything up to the top-k cut stays on the device; only ids and weights come back.

    python -m pipeline.targets --corpus-part shard-000.parquet --corpus-manifest m.json --dictionary D.npy \
        --dictionary-metrics metrics.json --targets t0.parquet [--resume-dir state/] \
        --params '{"source": ..., "layer": -1, "lambda": 0.05, "top_k": 32, ...}'
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import contract
from .cli import run
from .common import StageError, log, pick_device, set_cpu_threads
from .formats import load_dictionary, pad_rows, shard_tokens, write_targets
from .integrity import CHECKSUM_KEY, read_verified
from .lasso import Lasso, l2_normalise, make_solver
from .models import length_batches, load_encoder, verify_model
from .resume import Resume


def top_k_distribution(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(atom ids [n, k], weights [n, k] summing to 1 or all 0, mass lost to truncation [n])."""
    total = codes.sum(1, keepdim=True)
    weights, ids = torch.topk(codes, k, dim=1)
    kept = weights.sum(1, keepdim=True)
    lost = torch.where(total > 0, 1.0 - kept / total.clamp_min(1e-30), torch.zeros_like(total)).squeeze(1)
    weights = torch.where(kept > 0, weights / kept.clamp_min(1e-30), torch.zeros_like(weights))
    return ids, weights, lost


def compute(paths, params: dict) -> dict:
    set_cpu_threads()
    device = pick_device(params.get("device", "auto"))
    manifest = read_verified(paths.corpus_manifest, [paths.corpus_part])
    dictionary_record = read_verified(paths.dictionary_metrics, [paths.dictionary])
    verify_model(paths.teacher_model, paths.teacher_summary)
    encoder = load_encoder(params["source"], params["layer"], device, manifest, params["trust_remote_code"])
    dictionary = torch.from_numpy(load_dictionary(paths.dictionary)).float().to(device)
    if dictionary.shape[0] != encoder.hidden_size:
        raise StageError(f"dictionary {paths.dictionary} has atoms of size {dictionary.shape[0]} but teacher "
                         f"{params['source']!r} has hidden size {encoder.hidden_size}")
    k = params["top_k"]
    if k > dictionary.shape[1]:
        raise StageError(f"top_k {k} exceeds the dictionary's {dictionary.shape[1]} atoms")
    solver = make_solver(dictionary, params)
    offsets, tokens, types, table = shard_tokens(paths.corpus_part)
    if len(tokens) * k >= 2**31:  # the list columns' offsets are int32
        raise StageError(f"corpus shard {paths.corpus_part} has {len(tokens):,} tokens: with top_k {k} its target "
                         f"shard would exceed 2^31 values per column; use more corpus shards (corpus.shards)")
    resume = Resume(paths.resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY],
                                       "dictionary": dictionary_record[CHECKSUM_KEY], "shard": paths.corpus_part},
                    interval=paths.checkpoint_seconds)
    done = resume.load_parts()
    atoms = np.zeros((len(tokens), k), np.uint16)
    weights = np.zeros((len(tokens), k), np.float16)
    results = []
    started, computed = time.perf_counter(), 0
    for unit, rows in enumerate(length_batches(np.diff(offsets), params["batch_size"])):
        index, ids = pad_rows(offsets, tokens, rows, encoder.pad_id)
        if unit not in done:
            done[unit] = _code_batch(ids, pad_rows(offsets, types, rows, 0)[1], index >= 0, encoder, solver, k,
                                     params, paths.corpus_part)
            resume.add_part(unit, done[unit])
            computed += int((index >= 0).sum())
        flat = index[index >= 0]  # row-major, as the batch's states were gathered
        atoms[flat], weights[flat] = done[unit]["atoms"], done[unit]["weights"]
        results.append(done[unit])
    seconds = time.perf_counter() - started
    stats = statistics(results, dictionary.shape[1])
    stats["dictionary"] = dictionary_record[CHECKSUM_KEY]
    write_targets(paths.targets, table["seq_id"], offsets, atoms, weights, stats, paths.record)
    resume.finish()
    # Timing stays in the log: the shard's bytes depend only on its inputs and params.
    log.info("targets %s: %d tokens (%d computed) at %.0f tokens/s, mean nnz %.1f, %.1f solver iterations, "
             "top-%d loses %.2f%% of the mass", paths.targets, stats["tokens"], computed,
             computed / max(seconds, 1e-9), stats["mean_nnz"], stats["mean_iterations"], k,
             100 * stats["mean_mass_lost_to_top_k"])
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
        return {"tokens": 0, "mean_nnz": 0.0, "p99_nnz": 0.0, "nnz_histogram": [0] * len(contract.NNZ_BINS),
                "zero_code_fraction": 0.0, "mean_mass_lost_to_top_k": 0.0, "max_mass_lost_to_top_k": 0.0,
                "mean_entropy_nats": 0.0, "mean_iterations": 0.0, "p99_iterations": 0.0, "atom_usage": [0.0] * atoms}
    nnz, lost, entropy, iterations = (np.concatenate([r[key] for r in results])
                                      for key in ("nnz", "lost", "entropy", "iterations"))
    usage = np.sum([r["usage"] for r in results], axis=0)
    return {
        "tokens": int(len(nnz)),
        "mean_nnz": float(nnz.mean()), "p99_nnz": float(np.quantile(nnz, 0.99)),
        "nnz_histogram": np.histogram(nnz, bins=[*contract.NNZ_BINS, max(contract.NNZ_BINS[-1], int(nnz.max())) + 1]
                                      )[0].tolist(),
        "zero_code_fraction": float((nnz == 0).mean()),
        "mean_mass_lost_to_top_k": float(lost.mean()), "max_mass_lost_to_top_k": float(lost.max()),
        "mean_entropy_nats": float(entropy.mean()),
        "mean_iterations": float(iterations.mean()), "p99_iterations": float(np.quantile(iterations, 0.99)),
        "atom_usage": usage.tolist(),
    }

if __name__ == "__main__":
    run("targets", compute)
