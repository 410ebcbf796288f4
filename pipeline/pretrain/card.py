"""The facts a pre-training run's model cards state (pipeline/reporting/cards.py renders them), gathered from its
verified inputs before the first update: the params, the corpus record, the dictionary record and the
targets record."""

from __future__ import annotations

from pathlib import Path

from ..data.integrity import read_verified
from ..objectives import objective
from ..reporting import cards

DICTIONARY_KEYS = ("atoms", "lambda", "backend", "train_tokens", "heldout_objective", "relative_residual", "mean_nnz",
                   "atoms_used_fraction")
TRAINING_KEYS = ("max_steps", "batch_size", "grad_accumulation", "learning_rate", "mask_fraction", "mask_strategy",
                 "mlm_weight", "seed")


def facts(paths, params: dict, corpus: dict, target_record: dict | None, world: int) -> dict:
    """Everything a card of this run says besides the training so far (JSON, kept in the record too)."""
    needs = objective(params["objective"])
    dictionary_record = _dictionary_record(paths, needs.targets)
    chosen = params.get("model_card") or {"license": "unknown", "language": [], "tags": [], "datasets": []}
    return {
        "name": params.get("student", "model"), "objective": params["objective"], "size": params["size"],
        "metadata": chosen,
        "teacher": _teacher(params, dictionary_record) if needs.teacher else None,
        "dictionary": _dictionary(dictionary_record, paths) if dictionary_record else None,
        "targets": _targets(params, target_record) if needs.targets else None,
        "corpus": {"inputs": corpus["inputs"], "documents": corpus["documents"], "sequences": corpus["sequences"],
                   "tokens": corpus["tokens"], "validation_documents": corpus["validation"]["documents"],
                   "tokenizer": corpus["tokenizer"], "tokenizer_fingerprint": corpus["tokenizer_fingerprint"],
                   "packing": corpus["params"]["packing"], "max_seq_len": corpus["params"]["max_seq_len"]},
        "training": {**{k: params[k] for k in TRAINING_KEYS}, "world_size": world},
    }


def _dictionary_record(paths, needs_targets: bool) -> dict | None:
    if not (needs_targets and paths.dictionary_metrics):
        return None
    return read_verified(paths.dictionary_metrics, [paths.dictionary] if paths.dictionary else [])


def _teacher(params: dict, dictionary_record: dict | None) -> dict:
    layer = (dictionary_record or {}).get("layer", (params.get("online") or {}).get("layer"))
    return {"name": params.get("teacher"), "source": params.get("teacher_source"), "layer": layer}


def _dictionary(record: dict, paths) -> dict:
    name = Path(paths.dictionary).name if paths.dictionary else "dictionary.npy"
    identity = {"sha256": record["files"][name]["sha256"]}
    if not all(k in record for k in DICTIONARY_KEYS):  # not the dictionary stage's record: its checksum alone
        return identity
    return {**identity, **{k: record[k] for k in DICTIONARY_KEYS}}


def _targets(params: dict, record: dict | None) -> dict:
    if record is None:  # made in every step
        return {"mode": "online", "solver": (params.get("online") or {}).get("solver", "fista")}
    return {"mode": "precomputed", "solver": record["params"]["solver"], "top_k": record["params"]["top_k"],
            "tokens": record["tokens"], "mean_nnz": record["mean_nnz"],
            "mass_kept": 1 - record["mean_mass_lost_to_top_k"]}


def write(directory: Path, card_facts: dict, step: int, history: list[dict], tokens: int | None) -> None:
    """The card of the model saved in `directory` after `step` updates (tokens: None where unknown)."""
    t = card_facts["training"]
    training = {"updates": step, "tokens": tokens,
                "sequences": step * t["batch_size"] * t["grad_accumulation"] * t["world_size"],
                "losses": cards.losses_of(history[-1]) if history else {}}
    cards.write(directory, cards.render(card_facts, training))
