"""The report's reading of an ablation grid (config `grids`): its students by the swept keys; for each swept key
a table and a plot of the scores (and the training-health diagnostics) against its values, every point with
its 95 % CI and the control's band; and the paired comparisons of students that differ in that key only."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from . import health
from .comparison import Comparison
from .health import ci_cell, summary_cell
from .plots import _pyplot, _save

# Diagnostics shown against a swept key (pipeline/pretrain/diagnostics.py): gains over the baselines, collapse.
DIAGNOSTICS = (("mlm_gain", "MLM gain (nats)"), ("mlsm_gain", "MLSM gain (nats)"),
               ("masked_cosine", "masked-state cosine"))


def series(students: dict[str, dict], key: str) -> list[tuple[tuple, list[tuple[object, str]]]]:
    """For one swept key: (the other keys' values, [(this key's value, student), ...]) per combination of the
    other keys, the values in the order the grid sweeps them."""
    keys = list(next(iter(students.values())))
    order = {k: list(dict.fromkeys(s[k] for s in students.values())) for k in keys}
    others = [k for k in keys if k != key]
    out = []
    for fixed in itertools.product(*(order[k] for k in others)):
        line = [(value, name) for value in order[key] for name, s in students.items()
                if s[key] == value and all(s[k] == v for k, v in zip(others, fixed))]
        if line:
            out.append((tuple(zip(others, fixed)), line))
    return out


def label(fixed: tuple) -> str:
    return ", ".join(f"{k} {v}" for k, v in fixed) or "all"


def sections(c: Comparison, plot_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """The report's lines on every grid (c.grids), and the plots written into plot_dir (name in the report ->
    path)."""
    lines, plots = [], {}
    for grid, layout in c.grids.items():
        keys = layout["keys"]
        students = {s: dict(zip(keys, values)) for s, values in layout["students"] if s in c.names}
        if not students:
            continue
        lines += ["", f"## Ablation grid `{grid}`: {' × '.join(keys)}", "",
                  f"{len(students)} students that differ only in {', '.join(f'`{k}`' for k in keys)}, pre-trained with "
                  "the same budget and settings. For each swept key: the final models' scores and training-health "
                  "diagnostics against its values, then each pair of students that differ in that key only, "
                  "paired by seed. Scores as above (mean ± std [95 % bootstrap CI] over seeds)."]
        for key in keys:
            lines += key_table(c, students, key)
            if plot_dir is not None:
                path = Path(plot_dir) / f"{grid}.{key}.png"
                name = f"{path.parent.name}/{path.name}"
                plot_key(str(path), c, students, key, grid)
                plots[name] = str(path)
                lines += ["", f"![{grid}: {key}]({name})"]
            lines += pairs_table(c, students, key)
    return lines, plots


def diagnostic(c: Comparison, student: str, key: str) -> float | None:
    summary = c.students.get(student)
    return health.measured(summary)[1].get(key) if summary else None


def key_table(c: Comparison, students: dict[str, dict], key: str) -> list[str]:
    shown = [(k, title) for k, title in DIAGNOSTICS if any(diagnostic(c, s, k) is not None for s in students)]
    lines = ["", f"### Against `{key}`", "",
             "| other keys | " + f"{key} | " + " | ".join(c.tasks) + " | " + " | ".join(t for _, t in shown)
             + " | control | training health |",
             "|---|---|" + "---:|" * (len(c.tasks) + len(shown)) + "---|---|"]
    for fixed, line in series(students, key):
        for value, student in line:
            cells = [summary_cell(v) if (v := c.values(student, task)) else "–" for task in c.tasks]
            cells += ["–" if (d := diagnostic(c, student, k)) is None else f"{d:.3f}" for k, _ in shown]
            summary = c.students.get(student)
            lines.append(f"| {label(fixed)} | {value} | " + " | ".join(cells) + f" | {c.controls.get(student, '–')} | "
                         f"{health.health_cell(summary) if summary else '–'} |")
    controls = sorted({c.controls[s] for s in students if s in c.controls})
    for control in controls:
        cells = [summary_cell(v) if (v := c.values(control, task)) else "–" for task in c.tasks]
        lines.append(f"| control `{control}` | – | " + " | ".join(cells + ["–"] * len(shown)) + " | – | control |")
    return lines


def pairs_table(c: Comparison, students: dict[str, dict], key: str) -> list[str]:
    rows = []
    for fixed, line in series(students, key):
        for (low_value, a), (high_value, b) in itertools.combinations(line, 2):
            for task in c.tasks:
                pair = health.paired(c.scores, b, a, task)
                if pair is None:
                    continue
                caveats = c.caveats(a, task) + c.caveats(b, task)
                found = {"above": f"{key} {high_value} higher", "below": f"{key} {low_value} higher",
                         "within noise": "no difference beyond noise"}.get(health.reading(pair["low"], pair["high"]),
                                                                            "one seed: no CI")
                rows.append(f"| {label(fixed)} | {low_value} → {high_value} | {task} | {pair['difference']:+.3f} | "
                            f"{ci_cell(pair['low'], pair['high'])} | {pair['wins']}/{pair['seeds']} | "
                            + ("not a finding: " + "; ".join(caveats) if caveats else found) + " |")
    if not rows:
        return []
    return ["", f"Pairs that differ in `{key}` only: the second value's score minus the first's, paired by seed. A "
            "difference is a finding only when both students pass their diagnostics and score above their control "
            "and the majority class beyond noise.", "",
            "| other keys | " + f"{key} | task | difference | 95 % CI | higher on | reading |",
            "|---|---|---|---:|---|---:|---|", *rows]


def plot_key(path: str, c: Comparison, students: dict[str, dict], key: str, grid: str) -> None:
    """One panel per task (score) and per diagnostic, against the key's values (in the grid's order): a line
    per combination of the other keys, each point its mean with the 95 % bootstrap CI; the control's mean and
    CI as a grey band."""
    plt = _pyplot()
    panels = [(task, True) for task in c.tasks]
    panels += [(k, False) for k, _ in DIAGNOSTICS if any(diagnostic(c, s, k) is not None for s in students)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (what, is_task) in zip(axes[0], panels):
        for fixed, line in series(students, key):
            x = np.arange(len(line))
            if is_task:
                values = [c.values(s, what) for _, s in line]
                means = [np.mean(v) if v else np.nan for v in values]
                cis = np.array([health.bootstrap_ci(v) if v else (np.nan, np.nan) for v in values])
                errors = np.abs(np.array([cis[:, 0], cis[:, 1]]) - np.array(means))
                ax.errorbar(x, means, yerr=np.nan_to_num(errors), marker="o", capsize=3, label=label(fixed))
            else:
                ax.plot(x, [diagnostic(c, s, what) for _, s in line], marker="o", label=label(fixed))
            ax.set_xticks(x, [str(v) for v, _ in line])
        if is_task:
            for control in sorted({c.controls[s] for s in students if s in c.controls}):
                if values := c.values(control, what):
                    low, high = health.bootstrap_ci(values)
                    ax.axhspan(low if not np.isnan(low) else np.mean(values), high if not np.isnan(high)
                               else np.mean(values), color="grey", alpha=0.2, label=f"control {control}")
                    ax.axhline(np.mean(values), color="grey", linestyle="dashed")
        ax.set_title(what if is_task else dict(DIAGNOSTICS)[what])
        ax.set_xlabel(key)
        ax.set_ylabel("dev score" if is_task else "at the final update")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(f"grid {grid}: against {key}", fontsize="small")
    _save(fig, path)
