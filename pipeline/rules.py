"""The rules of the workflow: for each, its stage, its jobs' name, and the paths of its outputs and logs;
and the shell command that runs it, built from the stage's declared ports (pipeline/stages.py).

The paths of a job's inputs and its config slice depend on the config: pipeline/workflow.py gives them.
Nothing here imports torch or pyarrow: Snakemake reads it at every parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import contract
from .stages import INPUT, LOG, OUTPUT, STAGES


@dataclass(frozen=True)
class Shown:
    """An output that `snakemake --report` shows: its caption (workflow/report/<caption>.rst), its category,
    the labels of its row (wildcards allowed) and, for a directory, the files shown from it."""
    caption: str
    category: str
    labels: tuple[tuple[str, str], ...] = ()
    patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    stage: str
    job: str = ""                        # the job's name in logs, benchmarks and resume state (wildcards)
    outputs: dict = field(default_factory=dict)     # port -> path template under results (or BBC_DIR)
    logs: dict = field(default_factory=dict)        # port -> path template (beside the main log)
    inputs: tuple[str, ...] = ()         # the ports its jobs may be given (Workflow.<rule>_inputs gives paths)
    resumable: bool = False
    gpus_key: str = ""                   # where its number of processes (torchrun) comes from, if any
    shown: dict = field(default_factory=dict)       # port -> Shown: outputs in `snakemake --report`


PRETRAIN_LOGS = {"metrics_csv": f"{contract.LOGS}/pretrain_student/{{student}}.csv",
                 "tensorboard": f"{contract.LOGS}/pretrain_student/{{student}}.tensorboard"}
TEACHER_MODEL = ("teacher_model", "teacher_summary")
PHASES = ("phase_shards", "phase_manifests")  # a seq_len_schedule's corpus at its other lengths
PHASE_TARGETS = ("phase_target_shards", "phase_target_manifests")
# Categories of `snakemake --report`, numbered in the order of the stages (the report sorts them by name).
RESULTS, CORPUS, DICTIONARY, TARGETS, STUDENTS = ("1 Results", "2 Corpus", "3 Dictionary", "4 Targets",
                                                  "5 Pre-training")
REPORT_SHOWN = {
    "html": Shown("report_html", RESULTS, (("output", "report page"),)),
    "scores_plot": Shown("scores_plot", RESULTS, (("output", "scores plot"),)),
    "curve_plot": Shown("curve_plot", RESULTS, (("output", "sample-efficiency plot"),)),
    "csv": Shown("results_csv", RESULTS, (("output", "scores table"),)),
    "cards": Shown("model_cards", RESULTS, (("output", "model card of {student}"),), ("{student}/README.md",)),
}

RULES = {rule.name: rule for rule in (
    Rule("bbc_news_data", "demo_data", outputs={
        "pretrain": "pretrain.txt.gz", "train": "topic/train.tsv", "dev": "topic/dev.tsv",
        "manifest": "manifest.json"}),
    Rule("train_tokenizer", "tokenizer", inputs=("text",),
         outputs={"model": contract.TOKENIZER, "manifest": contract.TOKENIZER_MANIFEST}),
    Rule("shard_corpus", "corpus", inputs=("text", "tokenizer_manifest"), outputs={
        "shards": contract.CORPUS_SHARD, "validation": contract.CORPUS_VALIDATION,
        "token_counts": contract.CORPUS_TOKEN_COUNTS, "manifest": contract.CORPUS_MANIFEST},
         shown={"manifest": Shown("corpus_manifest", CORPUS, (("record", "corpus manifest"),))}),
    Rule("shard_corpus_phase", "corpus", "len{length}", inputs=("text", "tokenizer_manifest"), outputs={
        "shards": contract.CORPUS_PHASE_SHARD, "validation": contract.CORPUS_PHASE_VALIDATION,
        "token_counts": contract.CORPUS_PHASE_TOKEN_COUNTS, "manifest": contract.CORPUS_PHASE_MANIFEST}),
    Rule("pretrain_teacher", "pretrain", "{teacher}", inputs=("corpus_shards", "corpus_manifest", *PHASES),
         outputs={"model": contract.AUXILIARY_TEACHER, "summary": contract.AUXILIARY_SUMMARY}, resumable=True,
         gpus_key="teacher"),
    Rule("extract_activations", "teacher", "{teacher}",
         inputs=("corpus_shards", "corpus_manifest", "token_counts", *TEACHER_MODEL, "states"),
         outputs={"store": contract.ACTIVATIONS, "manifest": contract.ACTIVATIONS_MANIFEST}, resumable=True),
    Rule("fit_dictionary", "dictionary", "{teacher}", inputs=("activations", "activations_manifest"),
         outputs={"dictionary": contract.DICTIONARY, "metrics": contract.DICTIONARY_METRICS,
                  "atoms": contract.DICTIONARY_ATOMS}, resumable=True,
         shown={"metrics": Shown("dictionary_metrics", DICTIONARY, (("teacher", "{teacher}"), ("record", "metrics"))),
                "atoms": Shown("dictionary_atoms", DICTIONARY, (("teacher", "{teacher}"), ("record", "atoms")))}),
    Rule("precompute_targets", "targets", "{teacher}_{part}",
         inputs=("corpus_part", "corpus_manifest", "dictionary", "dictionary_metrics", *TEACHER_MODEL),
         outputs={"targets": contract.TARGET_PART, "record": contract.TARGET_PART_RECORD}, resumable=True),
    Rule("summarize_targets", "target_summary", "{teacher}", inputs=("shards", "validation", "records"),
         outputs={"manifest": contract.TARGET_MANIFEST},
         shown={"manifest": Shown("target_manifest", TARGETS, (("teacher", "{teacher}"),))}),
    Rule("summarize_phase_targets", "target_summary", "{teacher}_len{length}", inputs=("shards", "records"),
         outputs={"manifest": contract.TARGET_PHASE_MANIFEST}),
    Rule("pretrain_student", "pretrain", "{student}", inputs=(
        "corpus_shards", "corpus_manifest", "validation", "token_counts", "target_shards", "target_manifest",
        "validation_targets", "dictionary", "dictionary_metrics", *PHASES, *PHASE_TARGETS, *TEACHER_MODEL),
        outputs={"model": contract.STUDENT_MODEL, "checkpoints": contract.STUDENT_CHECKPOINTS,
                 "summary": contract.STUDENT_SUMMARY}, logs=PRETRAIN_LOGS, resumable=True, gpus_key="student",
        shown={"summary": Shown("student_summary", STUDENTS, (("student", "{student}"),))}),
    Rule("finetune", "finetune", "{student}_{snapshot}_{task}_seed{seed}",
         inputs=("train", "dev", "model", "model_summary"), outputs={"scores": contract.FINETUNE_SCORES},
         resumable=True),
    Rule("report", "report", inputs=("scores", "students", "dictionaries", "atoms", "targets", "benchmarks",
                                     "task_files"),
         outputs={"md": contract.REPORT_MD, "html": contract.REPORT_HTML, "csv": contract.REPORT_CSV,
                  "scores_plot": contract.REPORT_PLOT, "curve_plot": contract.REPORT_CURVE,
                  "cards": contract.REPORT_CARDS, "manifest": contract.REPORT_MANIFEST}, shown=REPORT_SHOWN),
)}


def command(rule_name: str) -> str:
    """The rule's shell command: `python -m pipeline.<stage>` with every port the rule has, as Snakemake
    placeholders. Required inputs are `--x {input.x}`; optional ones {params.x}, the flag and its
    paths where the job has that input, else nothing."""
    rule = RULES[rule_name]
    stage = STAGES[rule.stage]
    launcher = "{params.launcher}" if rule.gpus_key else "python"
    words = [f"{launcher} -m pipeline.{stage.name}"]
    for port in stage.ports:
        if port.role == INPUT and port.name in rule.inputs and port.verbatim:
            words.append(f"{port.flag} {{params.{port.name}:q}}")
        elif port.role == INPUT and port.name in rule.inputs:
            words.append(f"{{params.{port.name}:q}}" if port.optional else f"{port.flag} {{input.{port.name}:q}}")
        elif port.role == OUTPUT and port.name in rule.outputs:
            words.append(f"{port.flag} {{output.{port.name}:q}}")
        elif port.role == LOG and port.name in rule.logs:
            words.append(f"{port.flag} {{log.{port.name}:q}}")
    if rule.resumable:  # retried: an attempt after a failure that repeats on every attempt stops at once
        words.append("--resume-dir {params.resume_dir:q} --attempt {resources.attempt:q}")
    if "checkpoint_seconds" in stage.settings:
        words.append("--checkpoint-seconds {resources.checkpoint_seconds:q}")
    if "workers" in stage.settings:
        words.append("--workers {threads:q}")
    words.append("--params {params.stage:q} > {log.main:q} 2>&1")
    return " ".join(words)


def verbatim_inputs(rule_name: str) -> list[str]:
    """The rule's input ports whose values its command gets as given (params), not from its input files."""
    stage = STAGES[RULES[rule_name].stage]
    return [p.name for p in stage.ports if p.role == INPUT and p.verbatim and p.name in RULES[rule_name].inputs]


def optional_inputs(rule_name: str) -> dict[str, Callable]:
    """Params functions of the rule's optional input ports: [flag, the job's path(s)], or [] where the job
    has no such input."""
    rule = RULES[rule_name]
    stage = STAGES[rule.stage]
    return {port.name: _flag_and_paths(port.flag, port.name) for port in stage.ports
            if port.role == INPUT and port.optional and port.name in rule.inputs}


def _flag_and_paths(flag: str, name: str) -> Callable:
    def arguments(wildcards, input) -> list[str]:
        value = getattr(input, name, None)
        if value is None:
            return []
        return [flag, value] if isinstance(value, str) else [flag, *value]

    return arguments


class Keep(dict):
    """format_map fields that stay Snakemake wildcards when no value is given."""

    def __missing__(self, key):
        return f"{{{key}}}"


def fill(template: str, **wildcards) -> str:
    return template.format_map(Keep(wildcards))
