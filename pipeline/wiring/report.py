"""Stage 7: the students compared: report.md and report.html, results.csv, plots and model cards
(pipeline/report.py)."""

from __future__ import annotations

from .. import ablation
from ..data import contract
from ..data.tasks import task_files
from .base import RESULTS, Resources, Rule, Shown, Stage, inp, out

STAGE = Stage("report", "the students compared: report.md/.html, results.csv and plots", (
    inp("scores", many=True), inp("students", many=True), inp("dictionaries", many=True, optional=True),
    inp("atoms", many=True, optional=True), inp("targets", many=True, optional=True),
    inp("benchmarks", many=True, optional=True, help="Snakemake benchmark files of the jobs"),
    inp("task_files", many=True, optional=True, help="the tasks' train and dev files: majority-class scores"),
    out("md"), out("html"), out("csv"), out("scores_plot"), out("curve_plot"),
    out("cards", directory=True, optional=True, help="model cards with the fine-tuning scores, one per student"),
    out("ablation", directory=True, optional=True, help="a plot per grid and swept key (with config grids)"),
    out("manifest")), entry="report")


def inputs(w, job):
    return {"scores": w.finetune_scores(),
            "students": [w.path(contract.STUDENT_SUMMARY, student=s) for s in w.students],
            "dictionaries": [w.path(contract.DICTIONARY_METRICS, dictionary=c) for c in w.codings],
            "atoms": [w.path(contract.DICTIONARY_ATOMS, dictionary=c) for c in w.codings],
            "targets": [w.path(contract.TARGET_MANIFEST, dictionary=c) for c in w.codings],
            "benchmarks": [w.benchmark(rule, **wildcards) for rule, wildcards in w.jobs() if rule != "report"],
            "task_files": [path for task in w.tasks for train, devs in [task_files(w.config["tasks"][task])]
                           for path in (train, *devs)]}


def params(w, job):
    """The device and the students' processes (the cost table); the grids' students and their swept values."""
    grids = ablation.grid_layout(w.config)
    return {"device": w.device, "student_gpus": {s: w.student_options(s)["gpus"] for s in w.students},
            **({"grids": grids} if grids else {})}


def cost(plan, job):
    from ..plan import BYTES, REPORT_SECONDS

    return plan.rates.startup(False) + REPORT_SECONDS, BYTES["report"] + 3e3 * len(plan.workflow.students), 0


REPORT = Rule(
    "report", STAGE,
    outputs={"md": contract.REPORT_MD, "html": contract.REPORT_HTML, "csv": contract.REPORT_CSV,
             "scores_plot": contract.REPORT_PLOT, "curve_plot": contract.REPORT_CURVE,
             "cards": contract.REPORT_CARDS, "ablation": contract.REPORT_ABLATION,
             "manifest": contract.REPORT_MANIFEST},
    when={"ablation": lambda w: bool(w.config.get("grids"))},
    inputs=inputs, params=params,
    jobs=lambda w: [{}], cost=cost, resources=Resources(mem_mb=2000, runtime=10, local=True),
    shown={"html": Shown("report_html", RESULTS, (("output", "report page"),)),
           "scores_plot": Shown("scores_plot", RESULTS, (("output", "scores plot"),)),
           "curve_plot": Shown("curve_plot", RESULTS, (("output", "sample-efficiency plot"),)),
           "csv": Shown("results_csv", RESULTS, (("output", "scores table"),)),
           "cards": Shown("model_cards", RESULTS, (("output", "model card of {student}"),), ("{student}/README.md",))})
