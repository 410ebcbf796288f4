"""Stage 4, precompute_targets: per-token MLSM target distributions of one corpus part (a training shard or
the validation split), as one parquet shard.

For every position of every sequence: the teacher's state of the configured layer, L2-normalised,
coded with the non-negative lasso over the dictionary (pipeline.solvers.lasso: the reference `fista` or the
converged `fast` solver), normalised to sum 1, cut to its top_k atoms (`none`: the whole code, as the
reference) and to the first of them that hold top_mass of the mass, and renormalised. Only the kept
non-zero (atom, weight) entries are stored, a variable number per position. A position whose code is all
zero (its state correlates with no atom above lambda) has no entries: it carries no target, the trainer
leaves it out of the MLSM loss (or counts it, zero_code_positions: count) and the statistics count it.

The states are computed on the fly by the teacher rather than read from a full activation store: a
BERT-base-shaped forward runs at ~1.7 M tokens/s on an H100, while a store of every token's state
(d=768 float16, 1.5 kB a token) would need 2.5 GB/s of disk reads to keep up and 1.5 TB per billion
tokens. Everything up to the top-k cut stays on the device; only ids and weights come back.

    python -m pipeline.targets --corpus-part shard-000.parquet --corpus-manifest m.json --dictionary D.npy \
        --dictionary-metrics metrics.json --targets t0.parquet [--resume-dir state/] \
        --params '{"source": ..., "layer": -1, "lambda": 0.05, "top_k": 32, "top_mass": 1.0, ...}'
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .cli import run
from .common import StageError, log, pick_device, set_cpu_threads
from .data import contract
from .data.formats import load_dictionary, pad_rows, shard_tokens, write_targets
from .data.integrity import CHECKSUM_KEY, read_verified
from .models import length_batches, load_encoder, verify_model
from .resume import Resume
from .solvers.lasso import Lasso, l2_normalise, make_solver


def sparse_distribution(codes: torch.Tensor, top_k: int | None, top_mass: float = 1.0):
    """The kept entries of each code as a distribution: (entries per row [n], their atom ids [m] and weights
    [m] row after row, each row's by decreasing weight and summing to 1, mass lost to the cuts [n]).

    A row keeps its non-zeros, at most top_k of them (None: all), and only the first that reach top_mass of
    its mass (the atom that crosses it included). An all-zero row keeps nothing and loses nothing."""
    nonzero = (codes > 0).sum(1)
    width = max(1, int(nonzero.max())) if len(codes) else 1
    width = min(width, top_k) if top_k is not None else width
    values, ids = torch.topk(codes, width, dim=1)
    total = codes.sum(1, keepdim=True)
    keep = values > 0
    if top_mass < 1:
        before = (values.cumsum(1) - values) / total.clamp_min(1e-30)
        keep &= before < top_mass
    kept = (values * keep).sum(1, keepdim=True)
    counts = keep.sum(1)
    # An uncut code loses nothing (its sums in two orders could differ by an ulp).
    cut_some = (counts < nonzero).unsqueeze(1)
    lost = torch.where(cut_some, (1.0 - kept / total.clamp_min(1e-30)).clamp_min(0), torch.zeros_like(total))
    weights = values / kept.clamp_min(1e-30)
    return counts, ids[keep], weights[keep], lost.squeeze(1)


def cut(params: dict) -> tuple[int | None, float]:
    """(top_k or None for no cut, top_mass) of the targets params."""
    top_k = params["top_k"]
    return (None if top_k == "none" else int(top_k)), float(params.get("top_mass", 1.0))


def compute(paths, params: dict) -> dict:
    set_cpu_threads()
    device = pick_device(params.get("device", "auto"))
    manifest = read_verified(paths.corpus_manifest, [paths.corpus_part])
    dictionary_record = read_verified(paths.dictionary_metrics, [paths.dictionary])
    verify_model(paths.teacher_model, paths.teacher_summary)
    encoder = load_encoder(params["source"], params["layer"], device, manifest, params["trust_remote_code"],
                           params.get("teacher_precision", "bf16"))
    dictionary = torch.from_numpy(load_dictionary(paths.dictionary)).float().to(device)
    if dictionary.shape[0] != encoder.hidden_size:
        raise StageError(f"dictionary {paths.dictionary} has atoms of size {dictionary.shape[0]} but teacher "
                         f"{params['source']!r} has hidden size {encoder.hidden_size}")
    top_k, _ = cut(params)
    if top_k is not None and top_k > dictionary.shape[1]:
        raise StageError(f"top_k {top_k} exceeds the dictionary's {dictionary.shape[1]} atoms")
    solver = make_solver(dictionary, params)
    offsets, tokens, types, table = shard_tokens(paths.corpus_part)
    if top_k is not None and len(tokens) * top_k >= 2**31:  # the list columns' offsets are int32
        raise StageError(f"corpus shard {paths.corpus_part} has {len(tokens):,} tokens: with top_k {top_k} its "
                         f"target shard could exceed 2^31 values per column; use more corpus shards (corpus.shards)")
    resume = Resume(paths.resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY],
                                       "dictionary": dictionary_record[CHECKSUM_KEY], "shard": paths.corpus_part},
                    interval=paths.checkpoint_seconds)
    done = resume.load_parts()
    placed, results = [], []
    started, computed = time.perf_counter(), 0
    for unit, rows in enumerate(length_batches(np.diff(offsets), params["batch_size"])):
        index, ids = pad_rows(offsets, tokens, rows, encoder.pad_id)
        if unit not in done:
            done[unit] = _code_batch(ids, pad_rows(offsets, types, rows, 0)[1], index >= 0, encoder, solver,
                                     params, paths.corpus_part)
            resume.add_part(unit, done[unit])
            computed += int((index >= 0).sum())
        placed.append(index[index >= 0])  # row-major, as the batch's states were gathered
        results.append(done[unit])
    seconds = time.perf_counter() - started
    stats = statistics(results, dictionary.shape[1])
    stats["dictionary"] = dictionary_record[CHECKSUM_KEY]
    write_targets(paths.targets, table["seq_id"], offsets, *in_token_order(len(tokens), placed, results), stats,
                  paths.record)
    resume.finish()
    # Timing stays in the log: the shard's bytes depend only on its inputs and params.
    log.info("targets %s: %d tokens (%d computed) at %.0f tokens/s, mean nnz %.1f, %.1f solver iterations, "
             "%.1f atoms kept a token, the cuts lose %.2f%% of the mass", paths.targets, stats["tokens"], computed,
             computed / max(seconds, 1e-9), stats["mean_nnz"], stats["mean_iterations"], stats["mean_kept_atoms"],
             100 * stats["mean_mass_lost_to_top_k"])
    return stats


def in_token_order(tokens: int, placed: list[np.ndarray], results: list[dict]):
    """(entry counts [tokens], atom ids, weights) in the shard's token order, from the batches' results
    (batch b's tokens are the shard's tokens placed[b], its entries token after token)."""
    counts = np.zeros(tokens, np.int64)
    for where, result in zip(placed, results):
        counts[where] = result["counts"]
    starts = np.concatenate([[0], np.cumsum(counts)])
    atoms, weights = np.zeros(starts[-1], np.uint16), np.zeros(starts[-1], np.float16)
    for where, result in zip(placed, results):
        batch_counts = result["counts"].astype(np.int64)
        first_in_batch = np.cumsum(batch_counts) - batch_counts
        # Entry j of the batch belongs to its token r: it goes to that token's start plus j's rank within r.
        owner = np.repeat(np.arange(len(where)), batch_counts)
        destination = starts[where][owner] + np.arange(len(owner)) - first_in_batch[owner]
        atoms[destination], weights[destination] = result["atoms"], result["weights"]
    return counts, atoms, weights


def _code_batch(ids, types, valid, encoder, solver: Lasso, params, corpus_shard) -> dict[str, np.ndarray]:
    """Target distributions of one padded batch's real positions (row-major), with their statistics."""
    hidden = encoder.hidden(ids, types, valid.sum(1))
    x = l2_normalise(hidden[torch.from_numpy(valid).to(hidden.device)].float())
    if not torch.isfinite(x).all():
        raise StageError(f"teacher {params['source']!r} produced non-finite states on shard {corpus_shard}")
    solution = solver(x)
    codes = solution.codes
    counts, atoms, weights, lost = sparse_distribution(codes, *cut(params))
    usage, entropy = code_sums(counts.cpu().numpy(), atoms.cpu().numpy(), weights.float().cpu().numpy(),
                               (-(weights * weights.clamp_min(1e-30).log())).float().cpu().numpy(), codes.shape[1])
    return {
        "counts": counts.cpu().numpy().astype(np.uint16), "atoms": atoms.int().cpu().numpy().astype(np.uint16),
        "weights": weights.half().cpu().numpy(), "nnz": (codes > 0).sum(1).int().cpu().numpy(),
        "lost": lost.cpu().numpy(), "entropy": entropy,
        "iterations": solution.iterations.cpu().numpy(), "usage": usage,
    }


def code_sums(counts: np.ndarray, atoms: np.ndarray, weights: np.ndarray, plogp: np.ndarray,
              n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """Each atom's summed weight (float64) and each token's entropy (float32), added on the CPU entry by entry
    in a fixed order: on a GPU, index_add_ adds in no fixed order, and the sums (and through them the atom
    usage, the MLSM head's prior bias) differed from run to run (issue #32)."""
    usage = np.zeros(n_atoms, np.float64)
    np.add.at(usage, atoms.astype(np.int64), weights.astype(np.float64))
    entropy = np.zeros(len(counts), np.float32)
    np.add.at(entropy, np.repeat(np.arange(len(counts)), counts), plogp.astype(np.float32))
    return usage, entropy


def statistics(results: list[dict], atoms: int) -> dict:
    """A shard's target statistics from its batches' results (zeros for a shard without tokens, such as
    an empty validation split)."""
    if not results:
        return {"tokens": 0, "mean_nnz": 0.0, "p99_nnz": 0.0, "nnz_histogram": [0] * len(contract.NNZ_BINS),
                "zero_code_fraction": 0.0, "mean_mass_lost_to_top_k": 0.0, "max_mass_lost_to_top_k": 0.0,
                "mean_kept_atoms": 0.0, "mean_entropy_nats": 0.0, "mean_iterations": 0.0, "p99_iterations": 0.0,
                "atom_usage": [0.0] * atoms}
    nnz, lost, entropy, iterations, counts = (np.concatenate([r[key] for r in results])
                                              for key in ("nnz", "lost", "entropy", "iterations", "counts"))
    usage = np.sum([r["usage"] for r in results], axis=0)
    return {
        "tokens": int(len(nnz)),
        "mean_nnz": float(nnz.mean()), "p99_nnz": float(np.quantile(nnz, 0.99)),
        "nnz_histogram": np.histogram(nnz, bins=[*contract.NNZ_BINS, max(contract.NNZ_BINS[-1], int(nnz.max())) + 1]
                                      )[0].tolist(),
        "zero_code_fraction": float((nnz == 0).mean()),
        "mean_mass_lost_to_top_k": float(lost.mean()), "max_mass_lost_to_top_k": float(lost.max()),
        "mean_kept_atoms": float(counts.mean()),
        "mean_entropy_nats": float(entropy.mean()),
        "mean_iterations": float(iterations.mean()), "p99_iterations": float(np.quantile(iterations, 0.99)),
        "atom_usage": usage.tolist(),
    }

if __name__ == "__main__":
    run("targets", compute)
