"""Stage 7, report: compare the students -> report.md (and report.html, pipeline/reporting/report_html.py), results.csv,
scores.png, sample_efficiency.png, and each student's model card with its fine-tuning scores (cards/).

    python -m pipeline.report --scores finetune/*/*/*/seed*.json --students students/*/summary.json \
        --dictionaries dictionaries/minilm/metrics.json --atoms dictionaries/minilm/atoms.json \
        --targets targets/minilm/manifest.json --benchmarks benchmarks/*/*.tsv --md report.md --html report.html \
        --csv results.csv --scores-plot scores.png --curve-plot sample_efficiency.png [--cards cards/] \
        --manifest manifest.json \
        --params '{"device": "cuda", "student_gpus": {"mlsm": 1}}'
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .ablation import coding_parts
from .cli import run
from .common import StageError
from .data import contract
from .data.integrity import atomic_output, file_entries, read_record, read_verified, write_record
from .data.tasks import glue_task
from .objectives import reported_losses
from .reporting import ablation, health
from .reporting import cards as model_cards
from .reporting.comparison import COSINES, Comparison, csv_rows, majority_scores, paired_differences, select
from .reporting.health import ci_cell, summary_cell
from .reporting.plots import curve_tasks, plot_sample_efficiency, plot_scores
from .reporting.report_html import render_html

ATOMS_SHOWN, TOKENS_SHOWN = 12, 8
# Rules whose jobs hold a GPU when the config's device is cuda (pretrain_student: its `gpus`).
GPU_RULES = ("pretrain_teacher", "extract_activations", "fit_dictionary", "precompute_targets", "pretrain_student",
             "finetune")


def collect_scores(paths: list[str]) -> tuple[list[dict], dict[str, tuple[dict, int]]]:
    """Each fine-tuning run's row per dev set it was scored on (MNLI: MNLI-m and MNLI-mm), and each reported
    task's config and dev set (from the runs' params)."""
    rows, evaluations = [], {}
    for path in paths:
        result = read_record(path)
        params = result["params"]
        scored = result.get("evaluations") or [{"name": params["task_name"], "score": result["score"],
                                                "final": result["final"]}]
        for dev_set, evaluation in enumerate(scored):
            if "task" in params:
                evaluations[evaluation["name"]] = params["task"], dev_set
            rows.append({"student": params["student"], "objective": params["objective"],
                         "snapshot": params.get("snapshot", "final"), "pretrain_steps": result.get("pretrain_steps"),
                         "task": evaluation["name"], "seed": params["seed"], "score": evaluation["score"],
                         **{m: evaluation["final"][m] for m in result["metrics"]}})
    return sorted(rows, key=lambda r: (r["student"], r["task"], r["pretrain_steps"] or 0, r["seed"])), evaluations


def write_csv(path: str, rows: list[dict]) -> None:
    columns = ["student", "objective", "snapshot", "pretrain_steps", "task", "seed", "score", "control",
               "control_score", "minus_control", "majority_score", "health"]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


def stage_costs(benchmarks: list[str], device: str = "cpu", student_gpus: dict | None = None) -> list[dict]:
    """Per rule: jobs, wall time and GPU time (wall time x the GPUs a job holds, with device cuda) summed
    over its jobs' benchmark files (benchmarks/<rule>/<job>.tsv, the last run of each), and the peak RSS of
    any of them."""
    costs = {}
    for path in sorted(benchmarks):
        rule, job = Path(path).parent.name, Path(path).stem
        with open(path) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            continue
        seconds, rss = float(rows[-1]["s"]), rows[-1].get("max_rss", "NA")
        gpus = (student_gpus or {}).get(job, 1) if rule == "pretrain_student" else int(rule in GPU_RULES)
        cost = costs.setdefault(rule, {"rule": rule, "jobs": 0, "seconds": 0.0, "gpu_seconds": 0.0, "max_rss_mb": 0.0})
        cost["jobs"] += 1
        cost["seconds"] += seconds
        cost["gpu_seconds"] += seconds * gpus if device == "cuda" else 0.0
        cost["max_rss_mb"] = max(cost["max_rss_mb"], float(rss) if rss not in ("NA", "-") else 0.0)
    return list(costs.values())


# The entries of a student's history that are losses.
LOSSES = reported_losses()


def render(comparison: Comparison, dictionaries, atoms, targets, costs, plot_name, curve_name, cards=None,
           grids=()) -> str:
    lines = scores_section(comparison, plot_name) + health_section(comparison) + control_section(comparison)
    lines += pairs_section(comparison) + list(grids) + curve_section(comparison, curve_name)
    lines += students_section(list(comparison.students.values())) + cards_section(cards or {})
    for teacher, metrics in dictionaries.items():
        lines += dictionary_section(teacher, metrics, atoms.get(teacher, []), targets.get(teacher))
    lines += costs_section(costs)
    lines += ["", f"_Report format version {contract.FORMAT_VERSION['report']}._", ""]
    return "\n".join(lines)


def scores_section(comparison: Comparison, plot_name: str) -> list[str]:
    c, tasks = comparison, comparison.tasks
    lines = ["# MLSM pipeline report", "",
             f"{len(c.names)} students × {len(tasks)} tasks × {len({r['seed'] for r in c.scores})} seeds. "
             "Scores are dev-set scores at the last fine-tuning epoch (GLUE convention: mean of the task's "
             "official metrics), as mean ± sample std [95 % bootstrap CI of the mean] over seeds; the average "
             "is the GLUE-style unweighted mean over tasks. The control (objective none: the same architecture "
             "with fresh weights, no pre-training, fine-tuned the same way) and the majority class are the floor "
             "a pre-trained student must clear; the last column says whether the student passes its "
             "training-health diagnostics (below).", "",
             "## Fine-tuning scores of the final models", "",
             "| student | objective | " + " | ".join(tasks) + " | average | training health |",
             "|---|---|" + "---:|" * (len(tasks) + 1) + "---|"]
    for name in c.names:
        cells = [summary_cell(v) if (v := c.values(name, task)) else "–" for task in tasks]
        average = np.nanmean([np.mean(v) if (v := c.values(name, task)) else np.nan for task in tasks])
        objective_name = next(r["objective"] for r in c.scores if r["student"] == name)
        summary = c.students.get(name)
        lines.append(f"| {name} | {objective_name} | " + " | ".join(cells) + f" | {average:.3f} | "
                     f"{health.health_cell(summary) if summary else '–'} |")
    if any(v is not None for v in c.majority.values()):
        known = [c.majority.get(task) for task in tasks]
        average = "–" if None in known else f"{np.mean(known):.3f}"
        lines.append("| majority class | – | " + " | ".join("–" if v is None else f"{v:.3f}" for v in known)
                     + f" | {average} | – |")
    warnings = [f"Warning: student `{name}` {check.warning}." for name in c.names if name in c.students
                for check in health.failed(c.students[name])]
    unhealthy = [name for name in c.names if name in c.students and health.failed(c.students[name])]
    if unhealthy:
        lines += ["", f"Did not train enough for their scores to say what their objective is worth: "
                  f"{', '.join(f'`{name}`' for name in unhealthy)}. Comparisons involving them are marked "
                  "below, not presented as findings."]
        lines += [line for warning in warnings for line in ("", warning)]
    return lines + glue_section(c) + ["", f"![scores]({plot_name})"]


def glue_section(c: Comparison) -> list[str]:
    """The GLUE score of each student (and of the majority class), where the run has GLUE tasks."""
    if not c.glue:
        return []
    rows = [(name, c.glue_score(lambda task, name=name: np.mean(v) if (v := c.values(name, task)) else None))
            for name in c.names]
    rows.append(("majority class", c.glue_score(c.majority.get)))
    counted = max((score[1] for _, score in rows if score), default=0)
    lines = ["", "### GLUE score", "",
             f"The GLUE benchmark's score over the {counted} GLUE task(s) of this run (of GLUE's nine): the unweighted "
             "mean of the tasks' scores (each the mean of its official metrics, over seeds), MNLI counted once as "
             "the mean of MNLI-m and MNLI-mm. It equals the benchmark's only with all nine tasks; a row with "
             "fewer tasks scored says how many.", "", "| student | GLUE score | tasks |", "|---|---:|---:|"]
    lines += [f"| {name} | {score[0]:.3f} | {score[1]} |" if score else f"| {name} | – | 0 |" for name, score in rows]
    return lines


def health_section(comparison: Comparison) -> list[str]:
    trained = [n for n in comparison.names if n in comparison.students]
    if not any(comparison.students[n].get("diagnostics") for n in trained):
        return []
    lines = ["", "## Training health", "",
             "Measured by pre-training on the validation split with fixed masks (the same masked tokens for "
             "every student of a seed). A loss passes when it is below its baseline by more than the noise (the "
             "95 % CI of the per-token difference, sequences as clusters, lies above 0): MLM against predicting "
             "each masked token from the training tokens' frequencies, MLSM against predicting the mean target "
             "distribution. States or embeddings have collapsed when their mean pairwise cosine moved more than "
             f"{health.COLLAPSE_SHARE:.0%} of the way from its value at initialisation towards 1.", "",
             "| student | MLM loss | MLSM loss | masked states | real-token states | word embeddings | verdict |",
             "|---|---|---|---|---|---|---|"]
    names = ("MLM loss", "MLSM loss", "masked states", "real-token states", "word embeddings")
    for name in trained:
        summary = comparison.students[name]
        found = {c.name: c for c in health.checks(summary)}
        if health.is_control(summary):
            initial = health.measured(summary)[0]
            cells = ["–", "–", *(f"{initial[k]:.3f} (init)" if initial.get(k) is not None else "–" for k in COSINES)]
        else:
            cells = [f"{found[n].shown} {'ok' if found[n].passed else 'FAILS'}" if n in found else "–" for n in names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {health.health_cell(summary)} |")
    return lines


def control_section(comparison: Comparison) -> list[str]:
    lines = ["", "## Against the control (no pre-training)", ""]
    if not comparison.controls:
        return lines + ["No pre-trained student has a control of its architecture in this run (config key "
                        "`control` is false, or none was listed): the scores above cannot be compared with no "
                        "pre-training, and a difference between students may be no more than trained against "
                        "untrained."]
    lines += ["Each student's score minus its control's (the same size, dropout and seed, fresh weights, "
              "fine-tuned the same way), paired by seed, with its 95 % bootstrap CI; and whether the student's "
              "score is above the task's majority-class score beyond noise (the 95 % CI of its mean).", "",
              "| student | control | task | difference | 95 % CI | higher on | against the control | "
              "against the majority class |", "|---|---|---|---:|---|---:|---|---|"]
    for student, control in sorted(comparison.controls.items()):
        for task in comparison.tasks:
            versus = comparison.against_control(student, task)
            if versus is None:
                continue
            majority = comparison.majority.get(task)
            above = "–" if majority is None else (
                "not above" if health.not_above(comparison.values(student, task), majority) else "above")
            lines.append(f"| {student} | {control} | {task} | {versus['difference']:+.3f} | "
                         f"{ci_cell(versus['low'], versus['high'])} | {versus['wins']}/{versus['seeds']} | "
                         f"{health.reading(versus['low'], versus['high'])} | {above} |")
    return lines


def pairs_section(comparison: Comparison) -> list[str]:
    pairs = paired_differences(comparison)
    if not pairs:
        return []
    lines = ["", "## MLSM against MLM, paired by seed", "",
             "Mean over seeds of (MLSM student's score − MLM student's score) on the final models, its 95 % "
             "bootstrap CI, and on how many seeds MLSM scored higher. A difference is a finding only when both "
             "students pass their training-health diagnostics and score above their control and the majority "
             "class beyond noise; otherwise the reading says why it is not one.", "",
             "| MLSM student | MLM student | task | difference | 95 % CI | MLSM higher | reading |",
             "|---|---|---|---:|---|---:|---|"]
    for p in pairs:
        caveats = comparison.caveats(p["mlsm"], p["task"]) + comparison.caveats(p["mlm"], p["task"])
        verdict = {"above": "MLSM higher", "below": "MLM higher", "within noise": "no difference beyond noise"}
        found = verdict.get(health.reading(p["low"], p["high"]), "one seed: no CI")
        shown = "not a finding: " + "; ".join(caveats) if caveats else found
        lines.append(f"| {p['mlsm']} | {p['mlm']} | {p['task']} | {p['difference']:+.3f} | "
                     f"{ci_cell(p['low'], p['high'])} | {p['wins']}/{p['seeds']} | {shown} |")
    return lines


def curve_section(comparison: Comparison, curve_name: str) -> list[str]:
    tasks = curve_tasks(comparison.scores)
    if not tasks:
        return []
    rows = [r for r in comparison.scores if r["task"] in tasks]
    steps = sorted({r["pretrain_steps"] or 0 for r in rows})
    lines = ["", "## Sample efficiency", "",
             "Scores of the students' checkpoints by pre-training updates (finetune.checkpoint_tasks); the "
             "control is the score at 0 updates, where every student of its architecture starts. † marks a "
             "checkpoint that fails a training-health diagnostic.", "",
             "| student | task | " + " | ".join(f"updates {s}" for s in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for name in comparison.names:
        summary = comparison.students.get(name)
        for task in tasks:
            cells = []
            for step in steps:
                values = [r["score"] for r in rows if r["student"] == name and r["task"] == task
                          and (r["pretrain_steps"] or 0) == step]
                mark = " †" if summary and values and health.failed(summary, step) else ""
                cells.append(summary_cell(values) + mark if values else "–")
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return lines + ["", f"![sample efficiency]({curve_name})"]


def students_section(students: list[dict]) -> list[str]:
    lines = ["", "## Students", "",
             "| student | objective | teacher | size | updates | final losses | parameters | tokens/s |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for summary in students:
        p = summary["params"]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in summary["final"].items() if k in LOSSES)
        size = f"init {p['init']}" if p.get("init") else p.get("architecture") or p["size"]
        lines.append(f"| {p['student']} | {p['objective']} | {p.get('teacher', '–') or '–'} | {size} | "
                     f"{summary['steps']} | {losses} | {summary['parameters']:,} | "
                     f"{summary['tokens_per_second']:,.0f} |")
    return lines


def target_cut(params: dict) -> str:
    """How the targets were cut: the whole code, top-k, and a mass threshold."""
    cut = "the whole code" if params["top_k"] == "none" else f"top-{params['top_k']}"
    mass = params.get("top_mass", 1.0)
    return cut if mass >= 1 else f"{cut} up to {mass:g} of the mass"
def cards_section(cards: dict[str, tuple[str, str]]) -> list[str]:
    """Links to each student's model card: the report's (with the scores) and the model directory's."""
    if not cards:
        return []
    return ["", "## Model cards", "",
            "Hugging Face model cards (README.md): with the fine-tuning scores above, and as saved in the model "
            "directory (training details only; each checkpoint directory has its own).", "",
            "| student | card with scores | card in the model directory |", "|---|---|---|",
            *(f"| {name} | [{ours}]({ours}) | [{theirs}]({theirs}) |"
              for name, (ours, theirs) in sorted(cards.items()))]


def write_cards(out: str, summaries: dict[str, dict], scores: list[dict], report_dir: Path) -> dict:
    """Each student's card (summaries: its pre-training record by path) completed with its fine-tuning
    scores, in out/<student>/README.md; returns student -> (that card, the model directory's card),
    relative to the report's directory."""
    links = {}
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for path, summary in summaries.items():
            if "card" not in summary:  # a record from before model cards
                continue
            name = summary["params"]["student"]
            text = model_cards.render(summary["card"], model_cards.training_of(summary),
                                      model_cards.score_rows(select(scores, student=name)))
            (tmp / name).mkdir()
            model_cards.write(tmp / name, text)
            model_card = Path(path).parent / Path(contract.STUDENT_MODEL).name / model_cards.CARD
            links[name] = (Path(out, name, model_cards.CARD).relative_to(report_dir).as_posix(),
                           os.path.relpath(model_card, report_dir))
    return links


def dictionary_section(coding: str, metrics: dict, atoms: list[dict], targets: dict | None) -> list[str]:
    teacher, variant = coding_parts(coding)
    lines = ["", f"## Dictionary {f'`{variant}` ' if variant else ''}of teacher `{teacher}`", "",
             f"K = {metrics['atoms']}, λ = {metrics['lambda']}, layer {metrics['layer']}, "
             f"fitted on {metrics['train_tokens']:,} tokens.", "",
             "| held-out objective | relative residual | mean nnz | p99 nnz | atoms used | mutual coherence |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {metrics['heldout_objective']:.4f} | {metrics['relative_residual']:.3f} | {metrics['mean_nnz']:.1f} "
             f"| {metrics['p99_nnz']:.0f} | {metrics['atoms_used_fraction']:.1%} | {metrics['mutual_coherence']:.3f} |"]
    if targets is not None:
        lines += ["", f"Targets: {targets['tokens']:,} tokens; mean nnz "
                  f"{targets['mean_nnz']:.1f}; {target_cut(targets['params'])} keeps "
                  f"{1 - targets['mean_mass_lost_to_top_k']:.2%} of the mass; mean entropy "
                  f"{targets['mean_entropy_nats']:.2f} nats; {targets['zero_code_fraction']:.2%} of positions "
                  "without a target."]
    lines += ["", "Atom browser (most-used atoms on held-out tokens; the tokens loading on each most):", "",
              "| atom | usage | tokens |", "|---:|---:|---|"]
    for atom in atoms[:ATOMS_SHOWN]:
        tokens = ", ".join(f"`{t['token']}` {t['weight']:.2f}" for t in atom["top_tokens"][:TOKENS_SHOWN])
        lines.append(f"| {atom['atom']} | {atom['usage']:.1f} | {tokens} |")
    return lines


def costs_section(costs: list[dict]) -> list[str]:
    if not costs:
        return []
    return ["", "## Cost of each stage", "",
            "| rule | jobs | wall time (s, all jobs) | GPU time (s) | peak RSS (MB) |", "|---|---:|---:|---:|---:|",
            *(f"| {c['rule']} | {c['jobs']} | {c['seconds']:.1f} | {c['gpu_seconds']:.1f} | {c['max_rss_mb']:.0f} |"
              for c in costs)]


def grid_sections(comparison: Comparison, plot_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """The ablation grids' sections, and their plots (written into plot_dir, which holds nothing else)."""
    if not comparison.grids:
        return [], {}
    if plot_dir is None:
        return ablation.sections(comparison, None)
    with atomic_output(plot_dir) as tmp:
        tmp.mkdir()
        lines, plots = ablation.sections(comparison, str(tmp))
    return lines, {name: str(Path(plot_dir) / Path(path).name) for name, path in plots.items()}


def report(paths, params: dict) -> None:
    scores, evaluations = collect_scores(paths.scores)
    summaries = {p: read_record(p) for p in paths.students}
    students = {s["params"]["student"]: s for s in sorted(summaries.values(), key=lambda s: s["params"]["student"])}
    dictionaries = {Path(p).parent.name: read_record(p) for p in paths.dictionaries}
    records = {Path(p).parent: p for p in paths.dictionaries}
    atoms = {}
    for path in paths.atoms:  # listed, with its checksum, in its dictionary's metrics record
        if Path(path).parent not in records:
            raise StageError(f"{path}: no dictionary record (--dictionaries) lies beside it")
        read_verified(records[Path(path).parent], [path])
        atoms[Path(path).parent.name] = json.loads(Path(path).read_text())
    targets = {Path(p).parent.name: read_record(p) for p in paths.targets}
    glue = {name: glue_task(task) for name, (task, _) in evaluations.items() if glue_task(task)}
    comparison = Comparison(scores, students, majority_scores(evaluations, paths.task_files), glue,
                            params.get("grids", {}))
    write_csv(paths.csv, csv_rows(comparison))
    plot_scores(paths.scores_plot, scores, comparison.names, comparison.tasks, comparison.majority)
    plot_sample_efficiency(paths.curve_plot, scores, comparison.names, sorted(set(comparison.controls.values())))
    costs = stage_costs(paths.benchmarks, params.get("device", "cpu"), params.get("student_gpus"))
    report_dir = Path(paths.md).parent
    cards = write_cards(paths.cards, summaries, scores, report_dir) if paths.cards else {}
    grids, grid_plots = grid_sections(comparison, paths.ablation)
    text = render(comparison, dictionaries, atoms, targets, costs, Path(paths.scores_plot).name,
                  Path(paths.curve_plot).name, cards, grids)
    with atomic_output(paths.md) as tmp:
        tmp.write_text(text)
    with atomic_output(paths.html) as tmp:
        tmp.write_text(render_html(text, {Path(paths.scores_plot).name: paths.scores_plot,
                                      Path(paths.curve_plot).name: paths.curve_plot, **grid_plots}))
    outputs = [paths.md, paths.csv, paths.scores_plot, paths.curve_plot, paths.html,
               *filter(None, [paths.cards, paths.ablation])]
    write_record(paths.manifest, {"format_version": contract.FORMAT_VERSION["report"],
                                  "files": file_entries(Path(paths.manifest).parent, outputs)})


if __name__ == "__main__":
    run("report", report)
