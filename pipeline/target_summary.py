"""Stage 4's record, summarize_targets: the target shards' statistics (carried in each shard's metadata)
summed into targets/{dictionary}/manifest.json, with the validation targets' listed apart.

    python -m pipeline.target_summary --shards t0.parquet t1.parquet --validation v.parquet \
        [--records t0.json t1.json v.json] --manifest manifest.json --params '{...}'
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cli import run
from .common import StageError
from .data import contract
from .data.formats import target_stats, verified_target_shards
from .data.integrity import write_record


def summarize(shards: list[str], manifest: str, params: dict, validation: str | None = None,
              records: list[str] | None = None) -> dict:
    """The stage's record: the training shards' statistics summed, and the validation targets' apart. Each
    shard is first verified against the record its own job wrote, so only the bytes that job wrote are
    listed."""
    files = verified_target_shards([*shards, *filter(None, [validation])], Path(manifest).parent, records)
    per_shard = [target_stats(path) for path in shards]
    tokens = np.array([s["tokens"] for s in per_shard], dtype=float)

    def mean(key):
        return float(np.average([s[key] for s in per_shard], weights=tokens))

    usage = np.sum([s["atom_usage"] for s in per_shard], axis=0)
    dictionaries = {s.get("dictionary") for s in per_shard}
    if len(dictionaries) != 1:
        raise StageError("target shards were coded over different dictionaries; rerun precompute_targets")
    summary = {
        "format_version": contract.FORMAT_VERSION["target_summary"], "params": params, "dictionary": dictionaries.pop(),
        "tokens": int(tokens.sum()),
        **{key: mean(key) for key in ("mean_nnz", "zero_code_fraction", "mean_mass_lost_to_top_k",
                                      "mean_kept_atoms", "mean_entropy_nats", "mean_iterations")},
        "zero_code_tokens": int(round(sum(s["zero_code_fraction"] * s["tokens"] for s in per_shard))),
        "max_mass_lost_to_top_k": max(s["max_mass_lost_to_top_k"] for s in per_shard),
        "nnz_histogram": {"bins": list(contract.NNZ_BINS),
                          "tokens": np.sum([s["nnz_histogram"] for s in per_shard], 0).tolist()},
        # The training targets' mass per atom: the mean target distribution, which an MLSM student must beat.
        "atom_usage": usage.tolist(),
        "atoms_used_fraction": float((usage > 0).mean()),
        "atom_usage_histogram": np.histogram(usage / max(usage.sum(), 1e-30), bins=10)[0].tolist(),
        "shards": [{"path": p.rsplit("/", 1)[-1], "tokens": s["tokens"]} for p, s in zip(shards, per_shard)],
        "files": files,
    }
    if validation:
        stats = target_stats(validation)
        summary["validation"] = {"path": validation.rsplit("/", 1)[-1], "tokens": stats["tokens"],
                                 "mean_nnz": stats["mean_nnz"], "zero_code_fraction": stats["zero_code_fraction"]}
    write_record(manifest, summary)
    return summary


def main(paths, params: dict) -> dict:
    return summarize(paths.shards, paths.manifest, params, paths.validation, paths.records)


if __name__ == "__main__":
    run("target_summary", main)
