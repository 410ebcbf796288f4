"""Model cards: the README.md of every saved student and checkpoint, in the Hugging Face hub's format.

A card is YAML metadata between `---` lines (license, language, library_name, pipeline_tag, tags,
datasets and, once fine-tuning scores exist, a model-index with them), then Markdown: the objective, the
teacher and its layer, the dictionary (sha256 of dictionary.npy and its held-out metrics), the targets, the
corpus (from its manifest), the updates, sequences and tokens seen and the final losses.

Pre-training writes the card into the model directory and each checkpoint directory, from the facts it
gathers before the first update (`facts`, also kept in the pre-training record) and the training so far.
The report writes the same card completed with the fine-tuning scores into report/cards/<student>/, so
that new scores never rewrite a model directory. Cards hold no timings: they are outputs, compared byte
for byte across runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from ..objectives import objective, reported_losses

CARD = "README.md"
LOSSES = reported_losses()
BASE_TAGS = ("mlsm-pipeline", "bert")


def metadata(facts: dict, scores: list[dict] | None = None) -> dict:
    """The card's YAML front matter."""
    chosen = facts["metadata"]
    has_mlm_head = objective(facts["objective"]).mlm_head
    meta = {"license": chosen["license"], "language": chosen["language"], "library_name": "transformers",
            "pipeline_tag": "fill-mask" if has_mlm_head else "feature-extraction",
            "tags": [*BASE_TAGS, *objective(facts["objective"]).tags,
                     *(t for t in chosen["tags"] if t not in BASE_TAGS)],
            "datasets": chosen["datasets"]}
    if scores:
        meta["model-index"] = [{"name": facts["name"], "results": [
            {"task": {"type": "text-classification", "name": row["task"]},
             "dataset": {"name": row["task"], "type": row["task"], "split": "dev"},
             "metrics": [{"type": "score", "value": round(row["mean"], 4),
                          "name": f"dev score, mean over {row['seeds']} fine-tuning seeds"}]}
            for row in scores if row["snapshot"] == "final"]}]
    return meta


def render(facts: dict, training: dict, scores: list[dict] | None = None) -> str:
    """The card: front matter, then the training details; with `scores` (score_rows) a fine-tuning section."""
    front = yaml.safe_dump(metadata(facts, scores), sort_keys=False, allow_unicode=True)
    how = (f"pre-trained from scratch with the **{facts['objective']}** objective"
           if objective(facts["objective"]).trains
           else "with its initial weights and no pre-training (the control of the comparisons)")
    lines = ["---", front.rstrip("\n"), "---", "", f"# {facts['name']}", "",
             f"A BERT-style encoder (`{facts['size']}` preset) {how} by mlsm-pipeline, a reproducible pipeline "
             "for Masked Latent Semantic Modeling (Berend, Findings of ACL 2023; reference code: "
             "[szegedai/MLSM](https://github.com/szegedai/MLSM)) and its baselines.", "",
             "## Training", "", *_training_lines(facts, training)]
    lines += _teacher_lines(facts)
    lines += _corpus_lines(facts["corpus"])
    if scores is not None:
        lines += ["", "## Fine-tuning scores", "",
                  "Dev-set scores after fine-tuning (mean ± sample std over seeds). Few seeds and small models "
                  "give wide intervals: see the pipeline's report before reading a difference as a finding.", "",
                  "| task | snapshot | updates | score | seeds |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['task']} | {r['snapshot']} | {r['updates']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                  f"{r['seeds']} |" for r in scores]
    return "\n".join(lines) + "\n"


def _training_lines(facts: dict, training: dict) -> list[str]:
    t = facts["training"]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in training["losses"].items()) or "–"
    tokens = f"{training['tokens']:,}" if training.get("tokens") is not None else "–"
    weighed = "mlm_weight" in objective(facts["objective"]).weights.values() and "mlm_weight" in t
    return [f"- objective: `{facts['objective']}`" + (f" (MLM weight {t['mlm_weight']})" if weighed else ""),
            f"- updates: {training['updates']:,} of {t['max_steps']:,}; batch size {t['batch_size']} sequences, "
            f"gradient accumulation {t['grad_accumulation']}, world size {t['world_size']}; peak learning rate "
            f"{t['learning_rate']}; masking {t['mask_fraction']} ({t['mask_strategy']}); seed {t['seed']}",
            f"- sequences seen: {training['sequences']:,}; tokens seen: {tokens}",
            f"- final losses: {losses}"]


def _teacher_lines(facts: dict) -> list[str]:
    teacher, dictionary, targets = facts.get("teacher"), facts.get("dictionary"), facts.get("targets")
    lines = []
    if teacher:
        layer = "its MLM logits" if teacher.get("layer") is None else f"layer {teacher['layer']} (from the last)"
        lines += ["", "## Teacher", "", f"- `{teacher['name']}`: `{teacher['source']}`, {layer}"]
    if dictionary and "atoms" not in dictionary:  # a dictionary whose metrics were not recorded
        lines += ["", "## Dictionary", "", f"- sha256 of dictionary.npy: `{dictionary['sha256']}`"]
    elif dictionary:
        lines += ["", "## Dictionary", "",
                  f"- K = {dictionary['atoms']} atoms, λ = {dictionary['lambda']}, backend {dictionary['backend']}, "
                  f"fitted on {dictionary['train_tokens']:,} token states",
                  f"- sha256 of dictionary.npy: `{dictionary['sha256']}`",
                  f"- held-out objective {dictionary['heldout_objective']:.4f}, relative residual "
                  f"{dictionary['relative_residual']:.3f}, mean non-zeros {dictionary['mean_nnz']:.1f}, "
                  f"atoms used {dictionary['atoms_used_fraction']:.1%}"]
    if targets:
        lines += [f"- targets: {targets['mode']}" + (
            f", solver {targets['solver']}, top-{targets['top_k']} keeping {targets['mass_kept']:.2%} of the "
            f"code mass, mean non-zeros {targets['mean_nnz']:.1f} over {targets['tokens']:,} tokens"
            if targets["mode"] == "precomputed" else f", solver {targets['solver']} in every step")]
    return lines


def _corpus_lines(corpus: dict) -> list[str]:
    return ["", "## Corpus", "",
            f"- inputs: {', '.join(f'`{i}`' for i in corpus['inputs'])}",
            f"- {corpus['documents']:,} training documents, {corpus['sequences']:,} sequences, "
            f"{corpus['tokens']:,} tokens ({corpus['packing']}, at most {corpus['max_seq_len']} tokens); "
            f"{corpus['validation_documents']:,} documents held out for validation",
            f"- tokenizer `{corpus['tokenizer']}` (fingerprint `{corpus['tokenizer_fingerprint']}`)"]


def score_rows(rows: list[dict]) -> list[dict]:
    """One student's fine-tuning results (the report's rows) per task and snapshot: mean, std, seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["pretrain_steps"] or 0, row["snapshot"]), []).append(row)
    out = []
    for (task, updates, snapshot), group in sorted(groups.items()):
        values = [r["score"] for r in group]
        out.append({"task": task, "snapshot": snapshot, "updates": updates, "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "seeds": len(values)})
    return out


def training_of(summary: dict) -> dict:
    """What a pre-training record says of the finished run, as the card shows it."""
    t = summary["card"]["training"]
    return {"updates": summary["steps"], "tokens": summary["tokens_seen"],
            "sequences": summary["steps"] * t["batch_size"] * t["grad_accumulation"] * t["world_size"],
            "losses": losses_of(summary["final"])}


def losses_of(entry: dict) -> dict:
    return {k: round(float(entry[k]), 4) for k in LOSSES if k in entry}


def write(directory: str | Path, text: str) -> None:
    """The card into a model directory being written (atomicity is the directory's)."""
    (Path(directory) / CARD).write_text(text, encoding="utf-8")


def read(path: str | Path) -> tuple[dict, str]:
    """(front matter, Markdown body) of a card."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{path} has no YAML front matter between '---' lines")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body
