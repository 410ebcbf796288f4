# The validated config, and what every rule takes from its declaration (pipeline/wiring/<stage>.py) through
# the config's Workflow (pipeline/wiring/workflow.py): its inputs, outputs, logs, params, threads, resources and
# command. The rules themselves are made from the declarations in pipeline.smk.
import re as _re
import sys as _sys

from pipeline import config as cfg
from pipeline.wiring import preflight
from pipeline.wiring import RULES, command, optional_inputs, verbatim_inputs
from pipeline.wiring.workflow import Workflow

try:
    cfg.check_files(workflow.configfiles)
    CONFIG = cfg.validate(config)
    W = Workflow(CONFIG)
    preflight.check_inputs(W)
except cfg.ConfigError as _err:
    _sys.exit(f"Error: {_err}")
# A GPU rule's job asks for a GPU per process with device cuda, and with auto where this machine has one
# (else several GPU jobs would share one GPU at once); on a cluster set device: cuda.
GPU = W.gpu_requests()
# How often long stages save resumable state: a resource, not a param, so changing it reruns nothing.
CHECKPOINT_SECONDS = str(CONFIG["checkpoint_seconds"])
RETRIES = CONFIG["retries"]


def _names(names):
    return "|".join(_re.escape(n) for n in names) or "^$"


wildcard_constraints:
    shard=r"\d{3}",
    part=r"shard-\d{3}|validation|len\d+/shard-\d{3}",
    length=r"\d+",
    teacher=_names(CONFIG["teachers"]),
    dictionary=_names(W.codings),
    student=_names(W.students),
    task=_names(W.tasks),
    seed=r"\d+",
    snapshot=r"final|step\d+",


_OUTPUTS_CHECKED = []
GROUP_SIZES = {}  # a job group's template -> jobs per submission (rule_group)


def _check_outputs_once():
    """Once per run or dry run, in the main Snakemake process (not for --report, --touch or inside a cluster
    job): outputs that vanished or changed after later jobs used them stop the run (pipeline/wiring/damage.py)."""
    if _OUTPUTS_CHECKED or not workflow.is_main_process:
        return
    _OUTPUTS_CHECKED.append(True)
    _pack_groups()
    if getattr(workflow, "executor_plugin", None) is not None and not workflow.touch:
        preflight.check_nodes(workflow, W)
        preflight.check_outputs(workflow, W)


def rule_inputs(rule):
    def inputs(wildcards):
        _check_outputs_once()  # the first input function Snakemake calls builds the DAG: before any plan
        return W.inputs(rule, wildcards)

    return inputs


def rule_outputs(rule):
    """The rule's outputs; those it shows in `snakemake --report` marked with report() (captions in ../report/)."""
    stage = RULES[rule].stage
    outputs = {}
    for port, path in W.outputs(rule).items():
        outputs[port] = directory(path) if stage.port(port).directory else path
        shown = RULES[rule].shown.get(port)
        if shown is not None:
            outputs[port] = report(
                outputs[port],
                caption=f"../report/{shown.caption}.rst",
                category=shown.category,
                labels=dict(shown.labels) or None,
                patterns=list(shown.patterns),
            )
    return outputs


def rule_logs(rule):
    stage = RULES[rule].stage
    return {
        port: directory(path) if port != "main" and stage.port(port).directory else path
        for port, path in W.logs(rule).items()
    }


def rule_params(rule):
    """The stage's config slice, the optional and verbatim inputs of the job, where it resumes from, its launcher."""
    params = {"stage": lambda wildcards: W.params(rule, wildcards), **optional_inputs(rule)}
    for port in verbatim_inputs(rule):  # e.g. hf:<hub id>, which is no file Snakemake could track
        params[port] = lambda wildcards, port=port: W.arguments(port)
    if RULES[rule].resumable:
        params["resume_dir"] = lambda wildcards: W.resume_dir(rule, **dict(wildcards.items()))
    if RULES[rule].gpus_key:
        params["launcher"] = lambda wildcards: W.launcher(rule, wildcards)
    return params


def rule_group(rule):
    """The rule's job group where the config packs its jobs (Rule.group), with the jobs per submission
    (Snakemake's --group-components, set here from the config); else none."""
    declared = RULES[rule].group
    if declared is None or declared[1](CONFIG) <= 1:
        return None
    GROUP_SIZES[declared[0]] = declared[1](CONFIG)
    return declared[0]


def _pack_groups():
    """The groups' sizes, as --group-components would give them (a --group-components of the command wins);
    set when the DAG is built, since Snakemake replaces its group settings after the Snakefile is read."""
    settings = getattr(workflow, "group_settings", None)
    if GROUP_SIZES and settings is not None:
        settings.group_components = {**GROUP_SIZES, **dict(settings.group_components or {})}


def rule_benchmark(rule):
    return W.benchmark(rule)


def rule_threads(rule):
    """The rule's threads per job (pipeline/wiring/workflow.py: Workflow.threads)."""
    return lambda wildcards: W.threads(rule, wildcards)


def job_attempt(wildcards, attempt):
    """The job's attempt, for its command (`--attempt`): a retry after a failure that repeats stops at once."""
    return attempt


def multi_node_resources(rule):
    """A job of several nodes asks SLURM for one task per node (its threads per task, its memory per node, GPUs
    per node as gres); `mpi` keeps the plugin from wrapping the job in `srun -n1`, since the job's launcher
    (pipeline/launch.py) starts one torchrun per node with its own srun. A single-node job of the same rule gets
    an empty mpi and one task."""

    def several(wildcards):
        return W.nodes(rule, wildcards) > 1

    # tasks_per_gpu 0: the plugin would otherwise turn `tasks` into --ntasks-per-gpu for a GPU job.
    return {
        "nodes": lambda wildcards: W.nodes(rule, wildcards),
        "tasks": lambda wildcards: W.nodes(rule, wildcards),
        "tasks_per_gpu": 0,
        "mpi": lambda wildcards: "srun" if several(wildcards) else "",
        "gres": lambda wildcards: f"gpu:{W.gpus(rule, wildcards)}" if GPU and several(wildcards) else "",
    }


def rule_resources(rule):
    """What a job asks the scheduler for. A retried job (one stopped at a time limit, say) resumes and gets
    proportionally more time; with device cuda a GPU rule's job asks for a GPU per process."""
    declared = RULES[rule]
    wanted = declared.resources
    memory = wanted.mem_mb
    resources = {"mem_mb": (lambda wildcards, threads: memory(threads)) if callable(memory) else memory}
    if declared.resumable:
        minutes = wanted.runtime
        resources.update(attempt=job_attempt, runtime=lambda wildcards, attempt: minutes * attempt)
    else:
        resources["runtime"] = wanted.runtime
    if wanted.gpu:
        resources["gpu"] = lambda wildcards: GPU * W.gpus(rule, wildcards) * (W.nodes(rule, wildcards) == 1)
    if declared.gpus_key and W.multi_node():
        resources.update(multi_node_resources(rule))
    if "checkpoint_seconds" in declared.stage.settings:
        resources["checkpoint_seconds"] = CHECKPOINT_SECONDS
    return resources


onstart:
    # Once the jobs are known, before the first starts (never in a dry run): no live writer of an
    # output, task files the fine-tuning jobs can read, and on SLURM no job that no node can hold.
    preflight.before_jobs(workflow, W)
