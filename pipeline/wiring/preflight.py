"""Checks that stop a run before any job, with one message each: the corpus inputs (at parse, with the
config), and, once Snakemake knows which jobs it will start (its onstart hook, never in a dry run),
processes still writing into the results and, on SLURM, jobs no node can hold.

Nothing here imports more than the workflow's parse already does.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from .. import config as cfg
from ..common import StageError
from ..data.locks import live_writer
from ..data.text import input_files
from . import RULES, fill
from .workflow import Workflow


def check_inputs(workflow: Workflow) -> None:
    """The corpus inputs name files: every glob and directory matches some, a literal path exists or a
    rule of the workflow writes it, no file is named twice, and no directory holds files of unknown
    format unless corpus.unknown_files says skip; and every task's files are there. ConfigError naming the
    input otherwise."""
    corpus = workflow.config["corpus"]
    produced = set()
    if workflow.config["demo_data"]["bbc_news"]["enabled"]:
        produced = {os.path.normpath(path) for path in RULES["bbc_news_data"].outputs.values()}
    try:
        _results_outside_inputs(corpus["inputs"], workflow.config["results"])
        input_files(corpus["inputs"], unknown_files=corpus["unknown_files"], produced=frozenset(produced))
    except StageError as err:
        raise cfg.ConfigError(f"invalid configuration:\n  config key 'corpus.inputs': {err}") from None
    _check_task_data(workflow, produced)


def _check_task_data(workflow: Workflow, produced: set[str]) -> None:
    """Every task's training and dev files exist (or a rule of the workflow writes them): one message for all
    the tasks that lack some, with what each directory should hold, instead of Snakemake's error for the first
    fine-tuning job that misses one (a preset names nine GLUE tasks and a CoNLL one)."""
    from ..data.tasks import expected_layout, task_files

    missing = []
    for name in workflow.tasks:
        task = workflow.config["tasks"][name]
        train, devs = task_files(task)
        absent = [Path(p).name for p in (train, *devs) if not os.path.isfile(p) and os.path.normpath(p) not in produced]
        if absent:
            where = "does not exist" if not os.path.isdir(task["path"]) else f"lacks {', '.join(absent)}"
            missing.append(f"tasks.{name}: {task['path']} {where}; it should hold {expected_layout(task)}")
    if missing:
        raise cfg.ConfigError(f"invalid configuration: the files of {len(missing)} task(s) are missing (put them in "
                              "place, point the task's path at them, or remove the task):\n  " + "\n  ".join(missing))


def _results_outside_inputs(patterns: list[str], results: str) -> None:
    """No corpus input lies in `results` or holds it: a file or glob there is the run's own output (a corpus
    shard is parquet, a corpus format), so every later run would read its outputs as corpus and rebuild
    everything (or Snakemake would see a cycle); a directory holding it would read them from the second run on."""
    inside = Path(os.path.realpath(results))
    for pattern in patterns:
        if pattern.startswith("hf:"):
            pattern = pattern[3:]
        magic = glob.has_magic(pattern)
        literal = pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)] if magic else pattern
        for match in [literal, *(sorted(glob.glob(pattern)) if magic else [])]:
            where = Path(os.path.realpath(match or "."))
            if where == inside or inside in where.parents:
                raise StageError(f"corpus input {pattern!r} lies in the results directory {results}: the run would "
                                 f"read its own outputs as corpus; name corpus files outside {results}")
            if (match != literal or not magic) and os.path.isdir(match) and where in inside.parents:
                raise StageError(f"corpus input {pattern!r}: directory {match} holds the results directory "
                                 f"{results}, so later runs would read their own outputs as corpus; set results "
                                 f"outside it, or move the corpus files into a directory of their own")


def written_paths(workflow: Workflow) -> Iterator[str]:
    """Every output and resume directory of the config's jobs."""
    for rule, wildcards in workflow.jobs():
        for value in workflow.outputs(rule).values():
            yield from (fill(path, **wildcards) for path in (value if isinstance(value, list) else [value]))
        if RULES[rule].resumable:
            yield workflow.resume_dir(rule, **wildcards)


def check_no_live_writers(workflow: Workflow) -> None:
    """No process holds the lock of an output of this DAG (pipeline/data/locks.py): a job orphaned by a killed
    Snakemake, or a run of another working directory with the same `results:`. Snakemake would delete
    outputs of the jobs it reruns under that process's feet."""
    busy = [(path, holder) for path in written_paths(workflow) if (holder := live_writer(path))]
    if not busy:
        return
    lines = [f"{path}: pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
             for path, holder in busy[:10]]
    pids = sorted({str(holder["pid"]) for _, holder in busy if "pid" in holder})
    raise StageError("other processes are still writing outputs of this workflow (jobs of a Snakemake that was "
                     "killed, or a run in another working directory with the same `results:`):\n  "
                     + "\n  ".join(lines) + (f"\n  and {len(busy) - 10} more" if len(busy) > 10 else "")
                     + f"\nWait for them to end, or stop them (kill {' '.join(pids) or '<pid>'}), then rerun.")


def check_outputs(snakemake_workflow, workflow: Workflow) -> None:
    """Before Snakemake plans a run or a dry run: no output that a later job reads has vanished or changed
    (pipeline/wiring/damage.py), unless the command reruns its job (--forcerun, --forceall) or asks for the output
    itself. SystemExit otherwise."""
    from . import damage

    found = damage.damaged_outputs(workflow)
    settings = getattr(snakemake_workflow, "dag_settings", None)
    named = [*(getattr(settings, "forcerun", ()) or ()), *(getattr(settings, "targets", ()) or ())]
    if found and not damage.covered(found, workflow, named, bool(getattr(settings, "forceall", False))):
        configfiles = getattr(snakemake_workflow, "overwrite_configfiles", None) or ()
        raise SystemExit(f"Error: {damage.message(found, workflow, configfiles)}")


def check_nodes(snakemake_workflow, workflow: Workflow) -> None:
    """A trainee that spans nodes needs SLURM: a run on this machine alone (the local executor) stops here,
    naming the key. (A dry run cannot tell where the jobs would run, so it does not stop.)"""
    plugin = getattr(snakemake_workflow, "executor_plugin", None)
    several = workflow.multi_node()
    if plugin is not None and plugin.name == "local" and several:
        key, (nodes, _) = next(iter(several.items()))
        raise SystemExit(f"Error: config key '{key}': {nodes} nodes need a SLURM cluster (snakemake "
                         "--workflow-profile profiles/slurm); on one machine, spread the processes with gpus instead")


def check_tasks(workflow: Workflow, jobs: list[tuple[str, dict]]) -> None:
    """The task files of the fine-tuning jobs about to run, read and checked as each job will (columns, labels,
    the examples max_train_examples draws for each seed): a bad task file stops the run before Snakemake
    deletes the outputs of the jobs it reruns, instead of failing in each job. Task files a job of this run
    writes are checked by the fine-tuning jobs themselves."""
    from ..data.tasks import capped_examples, check_label_count, read_split, task_files, task_spec

    cap = workflow.config["finetune"]["max_train_examples"]
    for name, seeds in _task_seeds(jobs).items():
        task = workflow.config["tasks"][name]
        spec = task_spec(task)
        train, devs = task_files(task)
        train, devs = Path(train), [Path(dev) for dev in devs]
        if not (train.is_file() and all(dev.is_file() for dev in devs)):  # a job of this run writes them (the
            continue  # demo's): checked there
        texts, labels = read_split(train, spec)
        dev_labels = [label for dev in devs for label in read_split(dev, spec)[1]]
        for seed in sorted(seeds):
            _, drawn = capped_examples(texts, labels, dev_labels, spec, train, cap, seed)
            check_label_count(drawn, spec, train)


def _task_seeds(jobs: list[tuple[str, dict]]) -> dict[str, set[int]]:
    seeds: dict[str, set[int]] = {}
    for rule, wildcards in jobs:
        if rule == "finetune":
            seeds.setdefault(wildcards["task"], set()).add(int(wildcards["seed"]))
    return seeds


CPU_RULES = {"bbc_news_data", "train_tokenizer", "shard_corpus", "shard_corpus_phase", "summarize_targets",
             "summarize_phase_targets", "report"}


def check_cuda(snakemake_workflow, workflow: Workflow, jobs: list[tuple[str, dict]]) -> None:
    """With device: cuda and jobs that run a model on this machine, torch here sees a GPU (asked once, in a
    process of its own). On SLURM the jobs run on compute nodes, where the stage itself checks."""
    import subprocess
    import sys

    plugin = getattr(snakemake_workflow, "executor_plugin", None)
    if workflow.device != "cuda" or (plugin is not None and plugin.name != "local") \
            or not any(rule not in CPU_RULES for rule, _ in jobs):
        return
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        why = "torch sees no CUDA device" if probe.returncode == 0 else f"torch failed: {probe.stderr.strip()[-300:]}"
        raise StageError(f"config key 'device' is cuda, but on this machine {why} (a CPU build of torch, or no "
                         f"GPU); set device: cpu or auto, or install a CUDA build of torch (make setup TORCH=torch)")


def before_jobs(snakemake_workflow, workflow: Workflow) -> None:
    """The checks of Snakemake's onstart: one message and exit status 1 if a check fails."""
    from .. import slurm

    try:
        check_no_live_writers(workflow)
        jobs = [(job.rule.name, dict(job.wildcards_dict)) for job in snakemake_workflow.dag.needrun_jobs()]
        check_tasks(workflow, jobs)
        check_cuda(snakemake_workflow, workflow, jobs)
        slurm.check_before_submitting(snakemake_workflow)
    except StageError as err:
        raise SystemExit(f"Error: {err}") from None
