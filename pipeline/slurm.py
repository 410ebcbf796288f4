"""SLURM: jobs that no node can hold, found before anything is submitted; the queue, by rule.

A job asking for more CPUs, memory or GPUs than any node of its partition has stays pending forever
(reason PartitionConfig or Resources) while Snakemake prints nothing. Before the first submission (the
workflow's onstart, only when the executor is slurm: elsewhere this costs nothing) the cluster's nodes
are read with one `sinfo` call and each job's threads, mem_mb and gpu are compared with them; a job that
fits no node stops the run with the rule, what it asks, what the largest node has, and the key to change.

The plugin names every job of a run after the run (`<slurm-jobname-prefix>_<run uuid>`, which its
status queries need) and puts the rule and wildcards in the job's comment:

    python -m pipeline.slurm queue      # squeue with each job's rule and wildcards
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from .common import StageError

SINFO = ["sinfo", "--noheader", "--exact", "--format=%P|%c|%m|%G"]
QUEUE_FORMAT = "%.12i %.10T %.10M %.5C %.8m %.6D %R %k"  # id, state, time, cpus, memory, nodes, reason, comment


@dataclass(frozen=True)
class Node:
    """A kind of node of a partition, as sinfo reports it."""

    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    default: bool = False  # of the cluster's default partition


@dataclass
class Request:
    """What one job asks SLURM for."""

    rule: str
    wildcards: dict = field(default_factory=dict)
    cpus: int = 1
    memory_mb: int = 0
    gpus: int = 0
    partition: str | None = None


def job_threads(gpus: int, cuda: int) -> int:
    """Threads of a job that runs `gpus` processes: with CUDA two per GPU (each process feeds its GPU from a
    loader thread, which one CPU would starve); on CPU one per process."""
    return 2 * gpus if cuda else gpus


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from `sinfo --noheader --exact --format=%P|%c|%m|%G` lines."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        partition, cpus, memory, gres = line.strip().split("|")
        nodes.append(Node(partition.rstrip("*"), _number(cpus), _number(memory), gpu_count(gres),
                          partition.endswith("*")))
    return nodes


def _number(text: str) -> int:
    return int(text.rstrip("+").strip() or 0)


def gpu_count(gres: str) -> int:
    """GPUs in a sinfo GRES field: gpu:4, gpu:a100:4(S:0-1), several comma-separated, or (null)."""
    total = 0
    for item in gres.split(","):
        kind, *rest = item.split("(")[0].strip().split(":")
        if kind == "gpu" and rest:
            total += int(rest[-1]) if rest[-1].isdigit() else 1
    return total


def candidates(nodes: list[Node], partition: str | None) -> tuple[str, list[Node]]:
    """Where a job may run: its partition's nodes, else the default partition's, else every node."""
    if partition:
        return f"partition {partition}", [n for n in nodes if n.partition == partition]
    default = [n for n in nodes if n.default]
    return (f"default partition {default[0].partition}", default) if default else ("the cluster", nodes)


def problem(request: Request, nodes: list[Node]) -> str | None:
    """Why no node can run the job (what it asks, what the largest node has, the key to change), or None."""
    where, pool = candidates(nodes, request.partition)
    if not pool:
        return f"rule {request.rule}: {where} has no nodes (sinfo); check slurm_partition in the profile"
    if any(n.cpus >= request.cpus and n.memory_mb >= request.memory_mb and n.gpus >= request.gpus for n in pool):
        return None
    most = Node(where, max(n.cpus for n in pool), max(n.memory_mb for n in pool), max(n.gpus for n in pool))
    asks = [f"{request.cpus} CPUs", f"{request.memory_mb} MB of memory", f"{request.gpus} GPUs"]
    has = [f"{most.cpus} CPUs", f"{most.memory_mb} MB", f"{most.gpus} GPUs"]
    over = [(request.cpus > most.cpus, "threads"), (request.memory_mb > most.memory_mb, "mem_mb"),
            (request.gpus > most.gpus, "gpu")]
    changes = sorted({what_to_change(request, resource, most) for exceeded, resource in over if exceeded})
    if not changes:  # each fits some node, but no node fits all three at once
        changes = [f"lower its threads, mem_mb or gpu (set-threads / set-resources: {request.rule}: ...)"]
    job = request.rule + "".join(f" {k}={v}" for k, v in request.wildcards.items())
    return (f"job {job} asks SLURM for {', '.join(asks)}; no node of {where} has that (the largest: "
            f"{', '.join(has)}, from sinfo), so it would wait forever. Change {'; or '.join(changes)}")


def what_to_change(request: Request, resource: str, most: Node) -> str:
    """The config key (or profile setting) behind a rule's threads, memory or GPUs."""
    rule, wildcards = request.rule, request.wildcards
    if resource == "gpu" and most.gpus == 0:
        return (f"device (cpu: the GPU rules then ask for no GPU), or submit {rule} to a partition with GPUs "
                f"(the profile's set-resources: {rule}: slurm_partition: ...)")
    if rule == "shard_corpus" and resource in ("threads", "mem_mb"):
        return f"corpus.threads (its job asks for that many CPUs and 2000 MB + 2000 MB per thread; {most.cpus} fit)"
    if rule == "pretrain_student" and resource in ("threads", "gpu"):
        return f"students.{wildcards.get('student')}.gpus (or pretrain.gpus; GPU jobs ask for 2 CPUs per GPU)"
    if rule == "pretrain_teacher" and resource in ("threads", "gpu"):
        return f"teachers.{wildcards.get('teacher')}.auxiliary.gpus"
    if resource == "threads":
        return f"the profile's set-threads: {rule}: {most.cpus}"
    return f"the profile's set-resources: {rule}: {resource}: {most.memory_mb if resource == 'mem_mb' else most.gpus}"


def problems(requests: Iterable[Request], nodes: list[Node]) -> list[str]:
    """One message per rule whose jobs fit no node (its first such job)."""
    found: dict[str, str] = {}
    for request in requests:
        if request.rule not in found and (message := problem(request, nodes)):
            found[request.rule] = message
    return list(found.values())


def cluster_nodes() -> list[Node] | None:
    """The cluster's nodes from sinfo, or None where sinfo is missing or fails (then nothing is checked)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        result = subprocess.run(SINFO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(result.stdout) if result.returncode == 0 else None


def job_request(job) -> Request:
    """What a Snakemake job will ask sbatch for (the plugin's rules: --cpus-per-gpu replaces --cpus-per-task)."""
    resources = job.resources
    gpus = int(resources.get("gpu", 0) or 0)
    cpus = gpus * int(resources.get("cpus_per_gpu")) if gpus and resources.get("cpus_per_gpu") else job.threads
    memory = resources.get("mem_mb") or cpus * (resources.get("mem_mb_per_cpu") or 0)
    return Request(job.rule.name, dict(job.wildcards_dict), int(cpus), int(memory or 0), gpus,
                   resources.get("slurm_partition"))


def check_before_submitting(workflow) -> None:
    """With the slurm executor: StageError listing every rule whose jobs fit no node (one sinfo call)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm" or not workflow.is_main_process:
        return
    nodes = cluster_nodes()
    if not nodes:
        return
    jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local]
    found = problems(map(job_request, jobs), nodes)
    if found:
        raise StageError("jobs that no SLURM node can run (nothing was submitted):\n  " + "\n  ".join(found))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="SLURM helpers of the workflow")
    p.add_argument("command", choices=["queue"], help="queue: your jobs with their rule and wildcards (squeue)")
    p.add_argument("--all", action="store_true", help="also jobs that ended in the last minutes")
    args = p.parse_args(argv)
    command = ["squeue", "--me", f"--format={QUEUE_FORMAT}"] + (["--states=all"] if args.all else [])
    raise SystemExit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
