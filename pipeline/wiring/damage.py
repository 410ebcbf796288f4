"""Outputs that vanished or changed after their job wrote them, found before Snakemake plans anything.

Snakemake reruns a job whose output is missing only if something it must run needs that output: a deleted
corpus shard, score, model or activation store under outputs that later jobs already used goes unnoticed
("Nothing to be done"), and a later edit then reruns far more than it should. The records the stages write
list their files with sizes and checksums, so a run can tell. A job's outputs are damaged when
- its record is intact but a file it lists is missing or has another size (a cheap stat per file; a
  consumer's own verification still catches an equal-sized change when it reads the file), or
- some or all of its outputs are missing although it completed before (Snakemake keeps its benchmark
  file; after a failed rerun too, whose outputs Snakemake deleted), and another job reads them (a missing
  output that no job reads is a target, which Snakemake builds anyway),
unless a writer's lock lies beside one of them: a job running now, or one that was killed, which the rerun
resumes. The workflow stops naming the damaged outputs and the two ways out (`python -m pipeline.repair`
rebuilds exactly them; `snakemake --forcerun` reruns their jobs and all that reads them).

Nothing here imports more than the workflow's parse already does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..common import StageError
from ..data.integrity import read_record
from ..data.locks import lock_path
from . import fill

SHOWN = 12  # damaged outputs listed in the message


@dataclass(frozen=True)
class Damage:
    rule: str
    wildcards: tuple  # ((name, value), ...)
    path: str         # what is missing or changed
    why: str
    record: str | None = None  # the job's record that lists it, if one is intact

    @property
    def job(self) -> tuple[str, tuple]:
        return self.rule, self.wildcards


def job_outputs(workflow, rule: str, wildcards: dict) -> list[str]:
    """A job's output paths (files and directories), filled in."""
    paths = []
    for value in workflow.outputs(rule).values():
        paths += [fill(p, **wildcards) for p in (value if isinstance(value, list) else [value])]
    return paths


def job_inputs(workflow, rule: str, wildcards: dict) -> list[str]:
    paths = []
    for value in workflow.inputs(rule, SimpleNamespace(**wildcards)).values():
        paths += [str(p) for p in (value if isinstance(value, list) else [value])]
    return paths


def _being_written(paths: list[str]) -> bool:
    return any(lock_path(p).exists() for p in paths)


def _record_problems(record_path: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """The intact record at `record_path` (None if it is none) and (file, why) of each file it lists that is
    missing or has another size."""
    try:
        record = read_record(record_path)
    except StageError:
        return None, []
    base, problems = Path(record_path).parent, []
    for name, entry in (record.get("files") or {}).items():
        file = base / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problems.append((str(file), "missing"))
            continue
        if isinstance(entry, dict) and "bytes" in entry and size != entry["bytes"]:
            problems.append((str(file), f"{size} bytes, {entry['bytes']} when written"))
    return record, problems


def damaged_outputs(workflow) -> list[Damage]:
    """The damaged outputs of the config's jobs, in the order the stages run (module docstring)."""
    jobs = [(rule, dict(wildcards)) for rule, wildcards in workflow.jobs()]
    outputs = {i: job_outputs(workflow, rule, wc) for i, (rule, wc) in enumerate(jobs)}
    producer = {os.path.normpath(path): i for i, paths in outputs.items() for path in paths}
    read = set()  # jobs some other job reads from: a missing output of a job no job reads is rerun as a target
    for rule, wc in jobs:
        read.update(producer[q] for q in map(os.path.normpath, job_inputs(workflow, rule, wc)) if q in producer)
    found: dict[str, Damage] = {}
    for i, (rule, wc) in enumerate(jobs):
        paths = outputs[i]
        if i not in read or _being_written(paths):
            continue
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            # Snakemake writes a job's benchmark when it succeeds (and keeps it when it deletes the outputs of
            # a later attempt that failed): a job that never completed (a new one) has nothing to lose.
            if os.path.exists(workflow.benchmark(rule, **wc)):
                found.update((p, Damage(rule, _key(wc), p, "missing")) for p in missing)
            continue
        for path in paths:
            if path.endswith(".json") and os.path.isfile(path):
                for file, why in _record_problems(path)[1]:
                    owner = _producer_of(file, producer)  # a summary lists other jobs' files too
                    job = jobs[owner] if owner is not None else (rule, wc)
                    found.setdefault(file, Damage(job[0], _key(job[1]), file, why, path))
    return list(found.values())


def _key(wildcards: dict) -> tuple:
    return tuple(sorted(wildcards.items()))


def _producer_of(file: str, producer: dict[str, int]) -> int | None:
    """The job whose output is `file`, or the directory that holds it."""
    path = os.path.normpath(file)
    while path not in producer:
        parent = os.path.dirname(path)
        if parent == path or not parent:
            return None
        path = parent
    return producer[path]


def message(damage: list[Damage], workflow, configfiles=()) -> str:
    lines = [f"{d.path}: {d.why}" + (f" (listed in {d.record})" if d.record else "") + f", written by {d.rule}"
             + (f" ({workflow.job(d.rule, **dict(d.wildcards))})" if d.wildcards else "") for d in damage[:SHOWN]]
    if len(damage) > SHOWN:
        lines.append(f"and {len(damage) - SHOWN} more")
    forced = sorted({job_outputs(workflow, d.rule, dict(d.wildcards))[-1] for d in damage})
    return ("outputs of this workflow went missing or changed after their jobs wrote them, and Snakemake would "
            "not notice (it does not rerun a job whose outputs later jobs have used):\n  " + "\n  ".join(lines)
            + "\nRebuild exactly these, rerunning only the jobs that wrote them (what reads them reruns only where "
            "the rebuilt files differ from the ones it read):\n  python -m pipeline.repair"
            + "".join(f" --configfile {f}" for f in configfiles)
            + "\nor rerun those jobs and everything downstream of them:\n  snakemake --forcerun "
            + " ".join(forced))


def covered(damage: list[Damage], workflow, named_files, forceall: bool) -> bool:
    """Whether Snakemake was told to rerun every damaged job (--forcerun of a rule or an output, --forceall) or
    asked for its outputs (targets: Snakemake builds a missing target)."""
    if forceall:
        return True
    named = {os.path.normpath(str(f)) for f in named_files}
    return all(d.rule in named or any(os.path.normpath(p) in named
                                      for p in job_outputs(workflow, d.rule, dict(d.wildcards))) for d in damage)
