"""Stage 7, report: compare the students -> report.md (and report.html, pipeline/report_html.py), results.csv,
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

from . import cards as model_cards
from . import contract
from .cli import run
from .common import StageError
from .integrity import atomic_output, file_entries, read_record, read_verified, write_record
from .objectives import objective
from .report_html import render_html

ATOMS_SHOWN, TOKENS_SHOWN = 12, 8
BOOTSTRAP_SAMPLES = 10_000
# Rules whose jobs hold a GPU when the config's device is cuda (pretrain_student: its `gpus`).
GPU_RULES = ("pretrain_teacher", "extract_activations", "fit_dictionary", "precompute_targets", "pretrain_student",
             "finetune")


def bootstrap_ci(values, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over seeds (nan with fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summary_cell(values) -> str:
    """mean ± sample std [95 % bootstrap CI] over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    low, high = bootstrap_ci(values)
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} [{low:.3f}, {high:.3f}]"


def collect_scores(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        result = read_record(path)
        params = result["params"]
        rows.append({"student": params["student"], "objective": params["objective"],
                     "snapshot": params.get("snapshot", "final"), "pretrain_steps": result.get("pretrain_steps"),
                     "task": params["task_name"], "seed": params["seed"], "score": result["score"],
                     **{m: result["final"][m] for m in result["metrics"]}})
    return sorted(rows, key=lambda r: (r["student"], r["task"], r["pretrain_steps"] or 0, r["seed"]))


def select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def write_csv(path: str, rows: list[dict]) -> None:
    columns = ["student", "objective", "snapshot", "pretrain_steps", "task", "seed", "score"]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(path: str, rows: list[dict], students: list[str], tasks: list[str]) -> None:
    """Final models: one bar per student and task, mean ± std over seeds."""
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(students)) / 2), 3.6))
    width = 0.8 / len(students)
    for i, student in enumerate(students):
        means, errors = [], []
        for task in tasks:
            values = [r["score"] for r in select(rows, student=student, task=task, snapshot="final")]
            means.append(np.mean(values) if values else np.nan)
            errors.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=errors, capsize=3, label=student)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("dev score (mean ± std over seeds)")
    ax.set_title("Fine-tuning scores by pre-training objective")
    ax.legend(fontsize="small")
    _save(fig, path)


def curve_tasks(rows: list[dict]) -> list[str]:
    """Tasks on which some intermediate checkpoint was fine-tuned."""
    return sorted({r["task"] for r in rows if r["snapshot"] != "final"})


def plot_sample_efficiency(path: str, rows: list[dict], students: list[str]) -> None:
    """Score against pre-training updates, one line per student, one panel per curve task (mean over
    seeds, the band its 95 % bootstrap CI)."""
    plt = _pyplot()
    tasks = curve_tasks(rows)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.4), squeeze=False)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no checkpoints were fine-tuned\n(finetune.checkpoint_tasks)", ha="center",
                        va="center")
        axes[0][0].set_axis_off()
    for ax, task in zip(axes[0], tasks):
        for student in students:
            points = sorted({r["pretrain_steps"] for r in select(rows, student=student, task=task)})
            series = [[r["score"] for r in select(rows, student=student, task=task, pretrain_steps=s)] for s in points]
            if not points:
                continue
            bands = np.array([bootstrap_ci(v) for v in series])
            ax.plot(points, [np.mean(v) for v in series], marker="o", label=student)
            ax.fill_between(points, bands[:, 0], bands[:, 1], alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("pre-training updates")
        ax.set_ylabel("dev score")
        ax.legend(fontsize="small")
    _save(fig, path)


def paired_differences(rows: list[dict]) -> list[dict]:
    """Each MLSM student against each MLM student, per task: the mean over seeds of (MLSM - MLM) on
    the final models, paired by seed, with its 95 % bootstrap CI."""
    final = select(rows, snapshot="final")
    students = {r["student"]: r["objective"] for r in final}
    out = []
    for mlsm in sorted(s for s, o in students.items() if objective(o).targets):
        for mlm in sorted(s for s, o in students.items() if o == "mlm"):
            for task in sorted({r["task"] for r in final}):
                a = {r["seed"]: r["score"] for r in select(final, student=mlsm, task=task)}
                b = {r["seed"]: r["score"] for r in select(final, student=mlm, task=task)}
                seeds = sorted(a.keys() & b.keys())
                if not seeds:
                    continue
                diffs = [a[s] - b[s] for s in seeds]
                low, high = bootstrap_ci(diffs)
                out.append({"mlsm": mlsm, "mlm": mlm, "task": task, "seeds": len(seeds),
                            "difference": float(np.mean(diffs)), "low": low, "high": high,
                            "wins": sum(d > 0 for d in diffs)})
    return out


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
LOSSES = ("mlsm", "mlm", "kd", "validation_mlsm", "validation_mlm")


def render(scores, students, dictionaries, atoms, targets, costs, plot_name, curve_name, cards=None) -> str:
    lines = scores_section(scores, plot_name) + pairs_section(scores) + curve_section(scores, curve_name)
    lines += students_section(students) + cards_section(cards or {})
    for teacher, metrics in dictionaries.items():
        lines += dictionary_section(teacher, metrics, atoms.get(teacher, []), targets.get(teacher))
    lines += costs_section(costs)
    lines += ["", f"_Report format version {contract.FORMAT_VERSION['report']}._", ""]
    return "\n".join(lines)


def scores_section(scores: list[dict], plot_name: str) -> list[str]:
    final = select(scores, snapshot="final")
    names = sorted({r["student"] for r in scores})
    tasks = sorted({r["task"] for r in final})
    lines = ["# MLSM pipeline report", "",
             f"{len(names)} students × {len(tasks)} tasks × {len({r['seed'] for r in scores})} seeds. "
             "Scores are dev-set scores at the last fine-tuning epoch (GLUE convention: mean of the task's "
             "official metrics), as mean ± sample std [95 % bootstrap CI of the mean] over seeds; the average "
             "is the GLUE-style unweighted mean over tasks.", "",
             "## Fine-tuning scores of the final models", "",
             "| student | objective | " + " | ".join(tasks) + " | average |",
             "|---|---|" + "---:|" * (len(tasks) + 1)]
    for name in names:
        cells, averages = [], []
        for task in tasks:
            values = [r["score"] for r in select(final, student=name, task=task)]
            cells.append(summary_cell(values) if values else "–")
            averages.append(np.mean(values) if values else np.nan)
        objective_name = next(r["objective"] for r in scores if r["student"] == name)
        lines.append(f"| {name} | {objective_name} | " + " | ".join(cells) + f" | {np.nanmean(averages):.3f} |")
    return lines + ["", f"![scores]({plot_name})"]


def pairs_section(scores: list[dict]) -> list[str]:
    pairs = paired_differences(scores)
    if not pairs:
        return []
    lines = ["", "## MLSM against MLM, paired by seed", "",
             "Mean over seeds of (MLSM student's score − MLM student's score) on the final models, its 95 % "
             "bootstrap CI, and on how many seeds MLSM scored higher.", "",
             "| MLSM student | MLM student | task | difference | 95 % CI | MLSM higher |",
             "|---|---|---|---:|---|---:|"]
    for p in pairs:
        ci = "–" if np.isnan(p["low"]) else f"[{p['low']:+.3f}, {p['high']:+.3f}]"
        lines.append(f"| {p['mlsm']} | {p['mlm']} | {p['task']} | {p['difference']:+.3f} | {ci} | "
                     f"{p['wins']}/{p['seeds']} |")
    return lines


def curve_section(scores: list[dict], curve_name: str) -> list[str]:
    tasks = curve_tasks(scores)
    if not tasks:
        return []
    steps = sorted({r["pretrain_steps"] for r in scores if r["task"] in tasks})
    lines = ["", "## Sample efficiency", "",
             "Scores of the students' checkpoints by pre-training updates (finetune.checkpoint_tasks).", "",
             "| student | task | " + " | ".join(f"updates {s}" for s in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for name in sorted({r["student"] for r in scores}):
        for task in tasks:
            cells = [summary_cell(v) if (v := [r["score"] for r in select(scores, student=name, task=task,
                                                                           pretrain_steps=s)]) else "–" for s in steps]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return lines + ["", f"![sample efficiency]({curve_name})"]


def students_section(students: list[dict]) -> list[str]:
    lines = ["", "## Students", "",
             "| student | objective | teacher | size | updates | final losses | parameters | tokens/s |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for summary in students:
        p = summary["params"]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in summary["final"].items() if k in LOSSES)
        lines.append(f"| {p['student']} | {p['objective']} | {p.get('teacher', '–') or '–'} | {p['size']} | "
                     f"{summary['steps']} | {losses} | {summary['parameters']:,} | "
                     f"{summary['tokens_per_second']:,.0f} |")
    return lines


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


def dictionary_section(teacher: str, metrics: dict, atoms: list[dict], targets: dict | None) -> list[str]:
    lines = ["", f"## Dictionary of teacher `{teacher}`", "",
             f"K = {metrics['atoms']}, λ = {metrics['lambda']}, layer {metrics['layer']}, "
             f"fitted on {metrics['train_tokens']:,} tokens.", "",
             "| held-out objective | relative residual | mean nnz | p99 nnz | atoms used | mutual coherence |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {metrics['heldout_objective']:.4f} | {metrics['relative_residual']:.3f} | {metrics['mean_nnz']:.1f} "
             f"| {metrics['p99_nnz']:.0f} | {metrics['atoms_used_fraction']:.1%} | {metrics['mutual_coherence']:.3f} |"]
    if targets is not None:
        lines += ["", f"Targets: {targets['tokens']:,} tokens; mean nnz "
                  f"{targets['mean_nnz']:.1f}; top-{targets['params']['top_k']} keeps "
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


def report(paths, params: dict) -> None:
    scores = collect_scores(paths.scores)
    summaries = {p: read_record(p) for p in paths.students}
    students = sorted(summaries.values(), key=lambda s: s["params"]["student"])
    dictionaries = {Path(p).parent.name: read_record(p) for p in paths.dictionaries}
    records = {Path(p).parent: p for p in paths.dictionaries}
    atoms = {}
    for path in paths.atoms:  # listed, with its checksum, in its dictionary's metrics record
        if Path(path).parent not in records:
            raise StageError(f"{path}: no dictionary record (--dictionaries) lies beside it")
        read_verified(records[Path(path).parent], [path])
        atoms[Path(path).parent.name] = json.loads(Path(path).read_text())
    targets = {Path(p).parent.name: read_record(p) for p in paths.targets}
    names = sorted({r["student"] for r in scores})
    write_csv(paths.csv, scores)
    plot_scores(paths.scores_plot, scores, names, sorted({r["task"] for r in scores}))
    plot_sample_efficiency(paths.curve_plot, scores, names)
    costs = stage_costs(paths.benchmarks, params.get("device", "cpu"), params.get("student_gpus"))
    report_dir = Path(paths.md).parent
    cards = write_cards(paths.cards, summaries, scores, report_dir) if paths.cards else {}
    text = render(scores, students, dictionaries, atoms, targets, costs, Path(paths.scores_plot).name,
                  Path(paths.curve_plot).name, cards)
    with atomic_output(paths.md) as tmp:
        tmp.write_text(text)
    with atomic_output(paths.html) as tmp:
        tmp.write_text(render_html(text, {Path(paths.scores_plot).name: paths.scores_plot,
                                      Path(paths.curve_plot).name: paths.curve_plot}))
    outputs = [paths.md, paths.csv, paths.scores_plot, paths.curve_plot, paths.html, *filter(None, [paths.cards])]
    write_record(paths.manifest, {"format_version": contract.FORMAT_VERSION["report"],
                                  "files": file_entries(Path(paths.manifest).parent, outputs)})


if __name__ == "__main__":
    run("report", report)
