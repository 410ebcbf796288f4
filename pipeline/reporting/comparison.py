"""The run as the report compares it: every fine-tuning score, the students' records, each pre-trained
student's control and each task's majority-class score (pipeline/reporting/health.py judges them); the rows of
results.csv; the MLSM-against-MLM pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data import tasks
from ..objectives import objective
from . import health

# A student's diagnostics (pipeline/pretrain/diagnostics.py) as results.csv columns.
COSINES = ("masked_cosine", "real_cosine", "embedding_cosine")
DIAGNOSTICS = ("validation_mlm", "unigram_loss", "mlm_gain", "mlm_gain_se", "validation_mlsm", "mean_target_loss",
               "uniform_loss", "mlsm_gain", "mlsm_gain_se", *COSINES)


def select(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


@dataclass
class Comparison:
    """What the sections read: every fine-tuning score, the students' records by name, each pre-trained
    student's control, and each task's majority-class score (None: regression, or its files not given)."""

    scores: list[dict]
    students: dict[str, dict]
    majority: dict[str, float | None]
    glue: dict[str, str] = field(default_factory=dict)  # reported task -> the GLUE task it scores (MNLI-m: MNLI)
    grids: dict[str, dict] = field(default_factory=dict)  # ablation.grid_layout: each grid's keys and students

    def __post_init__(self):
        self.controls = health.controls_of(self.students)
        self.final = select(self.scores, snapshot="final")
        self.tasks = sorted({r["task"] for r in self.final})
        trained = sorted({r["student"] for r in self.scores} - {n for n, s in self.students.items()
                                                                if health.is_control(s)})
        self.names = trained + sorted({r["student"] for r in self.scores} - set(trained))  # controls last

    def values(self, student: str, task: str) -> list[float]:
        """The final model's scores over seeds."""
        return [r["score"] for r in select(self.final, student=student, task=task)]

    def glue_score(self, score_of) -> tuple[float, int] | None:
        """The GLUE benchmark's score over the GLUE tasks here, and their number: the unweighted mean of each
        task's score (the mean of its official metrics), MNLI counted once as the mean of MNLI-m and MNLI-mm.
        `score_of(reported task)` gives a score or None."""
        by_task: dict[str, list[float]] = {}
        for name, task in self.glue.items():
            if (score := score_of(name)) is not None:
                by_task.setdefault(task, []).append(score)
        if not by_task:
            return None
        return float(sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)), len(by_task)

    def against_control(self, student: str, task: str) -> dict | None:
        control = self.controls.get(student)
        return health.paired(self.scores, student, control, task) if control else None

    def caveats(self, student: str, task: str) -> list[str]:
        """Why a score of this student on this task cannot carry a finding: failed diagnostics, not above
        the control or the majority class beyond noise."""
        summary = self.students.get(student)
        bad = [c.name for c in health.failed(summary)] if summary else []
        out = [f"{student} fails {', '.join(bad)}"] if bad else []
        versus = self.against_control(student, task)
        if versus is not None and health.reading(versus["low"], versus["high"]) != "above":
            out.append(f"{student} is not above the control")
        if self.majority.get(task) is not None and health.not_above(self.values(student, task), self.majority[task]):
            out.append(f"{student} is not above the majority class")
        return out


def diagnostic_columns(summary: dict | None, step: int | None) -> dict:
    """A results.csv row's training-health columns: the measurements at the fine-tuned model's update,
    the cosines at initialisation, and the verdict."""
    if summary is None:
        return {}
    initial, at = health.measured(summary, step)
    out = {key: at.get(key) for key in DIAGNOSTICS}
    out.update({f"{key}_init": initial.get(key) for key in COSINES})
    out["health"] = "control" if health.is_control(summary) else health.health_cell(summary, step)
    return out


def csv_rows(comparison: Comparison) -> list[dict]:
    """Each fine-tuning run with its control's score on the same task and seed, the task's majority-class
    score and the student's diagnostics at the fine-tuned model's update."""
    control_scores = {(r["student"], r["task"], r["seed"]): r["score"] for r in comparison.final}
    rows = []
    for row in comparison.scores:
        control = comparison.controls.get(row["student"])
        control_score = control_scores.get((control, row["task"], row["seed"]))
        rows.append({**row, "control": control, "control_score": control_score,
                     "minus_control": None if control_score is None else row["score"] - control_score,
                     "majority_score": comparison.majority.get(row["task"]),
                     **diagnostic_columns(comparison.students.get(row["student"]), row["pretrain_steps"])})
    return rows


def paired_differences(comparison: Comparison) -> list[dict]:
    """Each MLSM student against each MLM student, per task: the mean over seeds of (MLSM - MLM) on
    the final models, paired by seed, with its 95 % bootstrap CI. A grid's students are compared with each other
    in one key at a time (pipeline/reporting/ablation.py), not here."""
    in_grids = {student for grid in comparison.grids.values() for student, _ in grid["students"]}
    objectives = {r["student"]: r["objective"] for r in comparison.final if r["student"] not in in_grids}
    out = []
    for mlsm in sorted(s for s, o in objectives.items() if objective(o).targets):
        for mlm in sorted(s for s, o in objectives.items() if o == "mlm"):
            for task in comparison.tasks:
                pair = health.paired(comparison.scores, mlsm, mlm, task)
                if pair is not None:
                    out.append({"mlsm": mlsm, "mlm": mlm, "task": task, **pair})
    return out


def majority_scores(evaluations: dict[str, tuple[dict, int]], task_files: list[str]) -> dict[str, float | None]:
    """Each reported task's majority-class score (MNLI's per dev set), from its training and dev files where the
    report is given them; `evaluations` maps a reported name to its task's config and dev set."""
    out = {}
    for name, (task, dev_set) in sorted(evaluations.items()):
        train, devs = tasks.task_files(task)
        dev = devs[dev_set]
        spec = tasks.task_spec(task)
        if {train, dev} <= set(task_files) and not spec.token_level:  # entity F1 has no majority class
            out[name] = health.majority_score(spec.metrics, tasks.read_split(Path(train), spec)[1],
                                              tasks.read_split(Path(dev), spec)[1])
    return out
