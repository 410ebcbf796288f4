"""The report's figures: scores.png (final models' scores per student and task, with the control and the
majority-class baseline as lines) and sample_efficiency.png (scores of the checkpoints by pre-training
updates; the control, which has none, is the score at 0 updates)."""

from __future__ import annotations

import numpy as np

from ..data.integrity import atomic_output
from .health import bootstrap_ci


def select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def curve_tasks(rows: list[dict]) -> list[str]:
    """Tasks on which some intermediate checkpoint was fine-tuned."""
    return sorted({r["task"] for r in rows if r["snapshot"] != "final"})


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


def plot_scores(path: str, rows: list[dict], students: list[str], tasks: list[str], majority: dict) -> None:
    """Final models: one bar per student and task, mean ± std over seeds; the majority-class score of each
    task as a dashed line across its bars."""
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(students)) / 2), 3.6))
    width = 0.8 / len(students)
    for i, student in enumerate(students):
        means, errors = [], []
        for task in tasks:
            values = [r["score"] for r in select(rows, student=student, task=task, snapshot="final")]
            means.append(np.mean(values) if values else np.nan)
            errors.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=errors, capsize=3, label=student)
    for i, task in enumerate(tasks):
        if majority.get(task) is not None:
            ax.hlines(majority[task], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="majority class" if i == 0 else None)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("dev score (mean ± std over seeds)")
    ax.set_title("Fine-tuning scores by pre-training objective")
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_sample_efficiency(path: str, rows: list[dict], students: list[str], controls: list[str]) -> None:
    """Score against pre-training updates, one line per student, one panel per curve task (mean over
    seeds, the band its 95 % bootstrap CI); a control is a dashed line (and its point at 0 updates)."""
    plt = _pyplot()
    tasks = curve_tasks(rows)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.4), squeeze=False)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no checkpoints were fine-tuned\n(finetune.checkpoint_tasks)", ha="center",
                        va="center")
        axes[0][0].set_axis_off()
    for ax, task in zip(axes[0], tasks):
        for student in students:
            points = sorted({r["pretrain_steps"] or 0 for r in select(rows, student=student, task=task)})
            series = [[r["score"] for r in select(rows, student=student, task=task) if (r["pretrain_steps"] or 0) == s]
                      for s in points]
            if not points:
                continue
            if student in controls:
                ax.axhline(np.mean(series[0]), color="grey", linestyle="dashed", label=f"{student} (control)")
                ax.plot([0], [np.mean(series[0])], marker="o", color="grey")
                continue
            bands = np.array([bootstrap_ci(v) for v in series])
            ax.plot(points, [np.mean(v) for v in series], marker="o", label=student)
            ax.fill_between(points, bands[:, 0], bands[:, 1], alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("pre-training updates")
        ax.set_ylabel("dev score")
        ax.legend(fontsize="small")
    _save(fig, path)
