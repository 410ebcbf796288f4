"""What a stage's home declares: the stage (its module's ports and settings) and the rules that run it, each
with its outputs, how its jobs and inputs are found, its config slice, its threads and resources, and its
cost for the plan. Everything else (the Snakemake rules, the command lines, the DAG the tests compare with
Snakemake's, the plan) is derived from these declarations (pipeline/wiring/__init__.py).

A Rule's functions take the Workflow of the config (pipeline/wiring/workflow.py: names, paths and the helpers the
rules share) or the Planner (pipeline/plan.py), and the job's wildcards as attributes (job.teacher, ...).
Nothing here imports torch: the workflow reads it at every parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

INPUT, OUTPUT, LOG, STATE = "input", "output", "log", "state"


@dataclass(frozen=True)
class Port:
    name: str
    role: str = INPUT       # input | output | log (written while running, not an output) | state (resume)
    many: bool = False      # a list of files
    directory: bool = False
    optional: bool = False
    help: str = ""
    # Passed to the command as given (not only paths: hf:<dataset>); the job's input holds the files among them.
    verbatim: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def inp(name, **kw) -> Port:
    return Port(name, INPUT, **kw)


def out(name, **kw) -> Port:
    return Port(name, OUTPUT, **kw)


RESUME = Port("resume_dir", STATE, directory=True, optional=True,
              help="where the resumable state of this job is kept (outside its outputs)")


@dataclass(frozen=True)
class Stage:
    name: str             # the module pipeline.<name>
    summary: str
    ports: tuple[Port, ...]
    settings: tuple[str, ...] = ()  # of SETTINGS: how it runs, never what it writes (no rerun when changed)
    version: str = ""     # its key in contract.FORMAT_VERSION, if not its name
    entry: str = "main"   # the module's function that takes (paths, params)

    @property
    def format_version(self) -> str:
        return self.version or self.name

    def port(self, name: str) -> Port:
        return next(p for p in self.ports if p.name == name)


# name -> (type, default, help). Passed on the command line, never in params.
SETTINGS = {
    "checkpoint_seconds": (float, 300.0, "seconds between checkpoints of the resumable state (0: every unit)"),
    "workers": (int, 1, "processes (changes the speed, never the output)"),
    "log_every": (int, 10, "updates between entries of the training log"),
}


@dataclass(frozen=True)
class Shown:
    """An output that `snakemake --report` shows: its caption (workflow/report/<caption>.rst), its category,
    the labels of its row (wildcards allowed) and, for a directory, the files shown from it."""
    caption: str
    category: str
    labels: tuple[tuple[str, str], ...] = ()
    patterns: tuple[str, ...] = ()


# Categories of `snakemake --report`, numbered in the order of the stages (the report sorts them by name).
RESULTS, CORPUS, DICTIONARY, TARGETS, STUDENTS = ("1 Results", "2 Corpus", "3 Dictionary", "4 Targets",
                                                  "5 Pre-training")


@dataclass(frozen=True)
class Resources:
    """What a job asks the scheduler for. With `gpu`, a job of a config with device cuda asks for one GPU per
    process; `local` jobs run on the submitting host (Snakemake's localrules)."""
    mem_mb: int | Callable[[int], int]  # or a function of the job's threads
    runtime: int                        # minutes; a retried job's attempt n gets n times as many
    gpu: bool = False
    local: bool = False


@dataclass(frozen=True)
class Rule:
    name: str
    stage: Stage
    outputs: dict                        # port -> path template under results (or beside it, the demo's data)
    inputs: Callable                     # (workflow, job) -> {port: path or paths} of one job
    params: Callable                     # (workflow, job) -> the job's config slice (its format version added)
    jobs: Callable                       # (workflow) -> the wildcards of every job of the config, in order
    cost: Callable                       # (planner, job) -> (seconds, bytes, GPUs) of one job
    resources: Resources
    threads: int | Callable = 1          # or (workflow, job) -> threads
    job: str = ""                        # the job's name in logs, benchmarks and resume state (wildcards)
    logs: dict = field(default_factory=dict)  # port -> path template (beside the main log)
    resumable: bool = False              # keeps resumable state; retried in the same run (`retries`)
    gpus_key: str = ""                   # where its number of processes (torchrun) comes from, if any
    shown: dict = field(default_factory=dict)  # port -> Shown: outputs in `snakemake --report`
    enabled: Callable = lambda config: True  # whether the config has this rule at all
    uses: tuple[str, ...] = ()           # the stage's input ports its jobs may be given (empty: all of them)
    beside_results: bool = False         # its outputs lie beside the results directory (the demo's data)
    final: bool = False                  # its outputs are asked for by the workflow's target (as the report's)
    # port -> (workflow) -> bool: a port of some configs only, left out of the others' commands and outputs (so
    # that adding it reran no job of a config without it: Snakemake reruns a job whose command changed)
    when: dict = field(default_factory=dict)
    # (group template, (config) -> jobs per submission): on a cluster, the jobs of one group (the template filled
    # with their wildcards) are packed that many at a time into one submission (Snakemake's job groups)
    group: tuple | None = None

    @property
    def input_ports(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.stage.ports if p.role == INPUT and (not self.uses or p.name in self.uses))

    def job_threads(self, workflow, job) -> int:
        return self.threads(workflow, job) if callable(self.threads) else self.threads
