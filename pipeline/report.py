"""Stage 7, report: compare the students -> report.md, results.csv and scores.png.

    python -m pipeline.report --scores finetune/*/*/seed*.json --students students/*/summary.json \
        --dictionaries dictionaries/minilm/metrics.json --atoms dictionaries/minilm/atoms.json \
        --targets targets/minilm/manifest.json --benchmarks benchmarks --out-md report.md --out-csv results.csv \
        --out-png scores.png --out-manifest manifest.json --params '{}'
"""

from __future__ import annotations

import csv
import glob
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import contract
from .common import parser, run_stage
from .integrity import atomic_output, file_entries, read_record, read_verified, write_record

ATOMS_SHOWN, TOKENS_SHOWN = 12, 8


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def collect_scores(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        result = read_record(path)
        rows.append({"student": result["params"]["student"], "objective": result["params"]["objective"],
                     "task": result["params"]["task_name"], "seed": result["params"]["seed"],
                     "score": result["score"], **{m: result["final"][m] for m in result["metrics"]}})
    return sorted(rows, key=lambda r: (r["student"], r["task"], r["seed"]))


def write_csv(path: str, rows: list[dict]) -> None:
    columns = ["student", "objective", "task", "seed", "score"]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(path: str, rows: list[dict], students: list[str], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(students)) / 2), 3.6))
    width = 0.8 / len(students)
    for i, student in enumerate(students):
        means, errors = [], []
        for task in tasks:
            values = [r["score"] for r in rows if r["student"] == student and r["task"] == task]
            means.append(np.mean(values))
            errors.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=errors, capsize=3, label=student)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("dev score (mean ± std over seeds)")
    ax.set_title("Fine-tuning scores by pre-training objective")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def stage_costs(benchmark_dir: str) -> list[tuple[str, float, float]]:
    costs = defaultdict(lambda: [0.0, 0.0])
    for path in sorted(glob.glob(f"{benchmark_dir}/**/*.tsv", recursive=True)):
        rule = Path(path).relative_to(benchmark_dir).parts[0]
        with open(path) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            costs[rule][0] += float(rows[-1]["s"])
            rss = rows[-1].get("max_rss", "NA")
            costs[rule][1] = max(costs[rule][1], float(rss) if rss not in ("NA", "-") else 0.0)
    return [(rule, s, rss) for rule, (s, rss) in costs.items()]


LOSSES = ("mlsm", "mlm", "kd", "validation_mlsm", "validation_mlm")  # the entries of a student's history that are losses


def render(scores, students, dictionaries, atoms, targets, costs, plot_name) -> str:
    names = sorted({r["student"] for r in scores})
    tasks = sorted({r["task"] for r in scores})
    lines = ["# MLSM pipeline report", "",
             f"{len(names)} students × {len(tasks)} tasks × {len({r['seed'] for r in scores})} seeds. "
             "Scores are dev-set scores at the last fine-tuning epoch (GLUE convention: mean of the task's "
             "official metrics), mean ± sample std over seeds.", "",
             "## Fine-tuning scores", "",
             "| student | objective | " + " | ".join(tasks) + " | average |",
             "|---|---|" + "---:|" * (len(tasks) + 1)]
    for name in names:
        cells, averages = [], []
        for task in tasks:
            values = [r["score"] for r in scores if r["student"] == name and r["task"] == task]
            cells.append(mean_std(values) if values else "–")
            averages.append(np.mean(values) if values else np.nan)
        objective = next(r["objective"] for r in scores if r["student"] == name)
        lines.append(f"| {name} | {objective} | " + " | ".join(cells) + f" | {np.nanmean(averages):.3f} |")
    lines += ["", f"![scores]({plot_name})", "", "## Students", "",
              "| student | objective | teacher | size | updates | final losses | parameters | tokens/s |",
              "|---|---|---|---|---:|---|---:|---:|"]
    for summary in students:
        p = summary["params"]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in summary["final"].items() if k in LOSSES)
        lines.append(f"| {p['student']} | {p['objective']} | {p.get('teacher', '–') or '–'} | {p['size']} | "
                     f"{summary['steps']} | {losses} | {summary['parameters']:,} | {summary['tokens_per_second']:,.0f} |")
    for teacher, metrics in dictionaries.items():
        lines += ["", f"## Dictionary of teacher `{teacher}`", "",
                  f"K = {metrics['atoms']}, λ = {metrics['lambda']}, layer {metrics['layer']}, "
                  f"fitted on {metrics['train_tokens']:,} tokens.", "",
                  "| held-out objective | relative residual | mean nnz | p99 nnz | atoms used | mutual coherence |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {metrics['heldout_objective']:.4f} | {metrics['relative_residual']:.3f} | {metrics['mean_nnz']:.1f} "
                  f"| {metrics['p99_nnz']:.0f} | {metrics['atoms_used_fraction']:.1%} | {metrics['mutual_coherence']:.3f} |"]
        if teacher in targets:
            t = targets[teacher]
            lines += ["", f"Targets: {t['tokens']:,} tokens; mean nnz "
                      f"{t['mean_nnz']:.1f}; top-{t['params']['top_k']} keeps {1 - t['mean_mass_lost_to_top_k']:.2%} "
                      f"of the mass; mean entropy {t['mean_entropy_nats']:.2f} nats; "
                      f"{t['zero_code_fraction']:.2%} of positions without a target."]
        lines += ["", "Atom browser (most-used atoms on held-out tokens; the tokens loading on each most):", "",
                  "| atom | usage | tokens |", "|---:|---:|---|"]
        for atom in atoms.get(teacher, [])[:ATOMS_SHOWN]:
            tokens = ", ".join(f"`{t['token']}` {t['weight']:.2f}" for t in atom["top_tokens"][:TOKENS_SHOWN])
            lines.append(f"| {atom['atom']} | {atom['usage']:.1f} | {tokens} |")
    if costs:
        lines += ["", "## Cost of each stage", "", "| rule | wall time (s, all jobs) | peak RSS (MB) |", "|---|---:|---:|"]
        lines += [f"| {rule} | {s:.1f} | {rss:.0f} |" for rule, s, rss in costs]
    lines += ["", f"_Report format version {contract.FORMAT_VERSION['report']}._", ""]
    return "\n".join(lines)


def report(score_paths, student_paths, dictionary_paths, atom_paths, target_paths, benchmark_dir, out_md, out_csv, out_png,
           out_manifest):
    scores = collect_scores(score_paths)
    students = sorted((read_record(p) for p in student_paths), key=lambda s: s["params"]["student"])
    dictionaries = {Path(p).parent.name: read_record(p) for p in dictionary_paths}
    atoms = {}
    for path in atom_paths:  # listed, with its checksum, in the metrics record beside it
        read_verified(Path(path).parent / Path(contract.DICTIONARY_METRICS).name, [path])
        atoms[Path(path).parent.name] = json.loads(Path(path).read_text())
    targets = {Path(p).parent.name: read_record(p) for p in target_paths}
    write_csv(out_csv, scores)
    plot(out_png, scores, sorted({r["student"] for r in scores}), sorted({r["task"] for r in scores}))
    text = render(scores, students, dictionaries, atoms, targets, stage_costs(benchmark_dir) if benchmark_dir else [],
                  Path(out_png).name)
    with atomic_output(out_md) as tmp:
        tmp.write_text(text)
    write_record(out_manifest, {"format_version": contract.FORMAT_VERSION["report"],
                                "files": file_entries(Path(out_manifest).parent, [out_md, out_csv, out_png])})


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--students", nargs="+", required=True)
    p.add_argument("--dictionaries", nargs="*", default=[])
    p.add_argument("--atoms", nargs="*", default=[])
    p.add_argument("--targets", nargs="*", default=[])
    p.add_argument("--benchmarks", default=None)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-png", required=True)
    p.add_argument("--out-manifest", required=True, help="checksums of the three files above")
    args = p.parse_args(argv)
    report(args.scores, args.students, args.dictionaries, args.atoms, args.targets, args.benchmarks,
           args.out_md, args.out_csv, args.out_png, args.out_manifest)


if __name__ == "__main__":
    run_stage(main)
