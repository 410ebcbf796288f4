"""The workflow's wiring: every stage declared once, in its home (a module here per stage: its ports, and the
rules that run it with their outputs, jobs, inputs, config slice, threads, resources and cost), and the
registry below that lists the rules in the order the stages run. The Snakemake rules
(workflow/rules/pipeline.smk), the command lines (`command`, pipeline/cli.py), the jobs of a config
(pipeline/wiring/workflow.py) and the cost plan (pipeline/plan.py) are derived from it.

A new stage: a home module here (its Stage and Rule), its module pipeline/<stage>.py, and its rule in RULES.
Nothing here imports torch: the workflow reads it at every parse.
"""

from __future__ import annotations

from collections.abc import Callable

from . import corpus, demo_data, dictionary, finetune, pretrain, report, target_summary, targets, teacher, tokenizer
from .base import INPUT, LOG, OUTPUT, SETTINGS, STATE, Port, Resources, Rule, Shown, Stage  # noqa: F401

# Every rule, in the order its jobs run (a job's inputs come from the rules before it).
RULES = {rule.name: rule for rule in (
    demo_data.BBC_NEWS_DATA,
    tokenizer.TRAIN_TOKENIZER,
    corpus.SHARD_CORPUS,
    corpus.SHARD_CORPUS_PHASE,
    pretrain.PRETRAIN_TEACHER,
    teacher.EXTRACT_ACTIVATIONS,
    dictionary.FIT_DICTIONARY,
    targets.PRECOMPUTE_TARGETS,
    target_summary.SUMMARIZE_TARGETS,
    target_summary.SUMMARIZE_PHASE_TARGETS,
    pretrain.PRETRAIN_STUDENT,
    finetune.FINETUNE,
    report.REPORT,
)}
STAGES = {rule.stage.name: rule.stage for rule in RULES.values()}


def command(rule_name: str, workflow=None) -> str:
    """The rule's shell command: `python -m pipeline.<stage>` with every port the rule has, as Snakemake
    placeholders. Required inputs are `--x {input.x}`; optional ones {params.x}, the flag and its
    paths where the job has that input, else nothing. A port of some configs only (Rule.when) is left out
    unless the workflow's config has it (without a workflow: every port)."""
    rule = RULES[rule_name]
    stage = rule.stage
    launcher = "{params.launcher}" if rule.gpus_key else "python"
    words = [f"{launcher} -m pipeline.{stage.name}"]
    for port in stage.ports:
        if port.name in rule.when and workflow is not None and not rule.when[port.name](workflow):
            continue
        if port.role == INPUT and port.name in rule.input_ports and port.verbatim:
            words.append(f"{port.flag} {{params.{port.name}:q}}")
        elif port.role == INPUT and port.name in rule.input_ports:
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
    rule = RULES[rule_name]
    return [p.name for p in rule.stage.ports if p.role == INPUT and p.verbatim and p.name in rule.input_ports]


def optional_inputs(rule_name: str) -> dict[str, Callable]:
    """Params functions of the rule's optional input ports: [flag, the job's path(s)], or [] where the job
    has no such input."""
    rule = RULES[rule_name]
    return {port.name: _flag_and_paths(port.flag, port.name) for port in rule.stage.ports
            if port.role == INPUT and port.optional and port.name in rule.input_ports}


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
