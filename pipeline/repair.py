"""Rebuild the outputs that went missing or changed after their jobs wrote them (pipeline/wiring/damage.py), rerunning
only those jobs, so that nothing downstream reruns where the rebuilt files are the ones it read.

    python -m pipeline.repair [--configfile config/config.yaml] [--dry-run]

Each damaged job runs again as its rule runs it (the same command, its outputs in place: a stage replaces
them atomically), in the order of the stages, its log in logs/<rule>/<job>.repair.log. Then each file its
intact record listed is compared with the record's sha256: the same bytes get back the record's time, so
Snakemake sees nothing new, and a record that differs only in its timings is put back as it was. What differs
keeps its new time, and the jobs that read it rerun at the next `snakemake`, as they should. A job that
fails stops the repair with its log; `snakemake --forcerun <its record>` is then the way on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from . import config as cfg
from .compare import _without
from .data.integrity import atomic_output, read_record, sha256_file
from .wiring import INPUT, LOG, OUTPUT, RULES, fill
from .wiring.damage import Damage, damaged_outputs, job_outputs
from .wiring.workflow import Workflow

TIMESTAMP = ".snakemake_timestamp"  # what Snakemake reads a directory output's time from
# What Snakemake sets from a job's threads (its shell.py): the stages' results may depend on the thread count.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def job_argv(workflow: Workflow, rule: str, wildcards: dict) -> list[str]:
    """The command line the rule runs for this job (pipeline/wiring/__init__.py: command), as a list."""
    declared = RULES[rule]
    stage = declared.stage
    names = SimpleNamespace(**wildcards)
    given = {port: value for port, value in workflow.inputs(rule, names).items()}
    if "text" in declared.input_ports:
        given["text"] = workflow.arguments("text")
    outputs = {port: ([fill(v, **wildcards) for v in value] if isinstance(value, list) else fill(value, **wildcards))
               for port, value in workflow.outputs(rule).items()}
    logs = {port: fill(path, **wildcards) for port, path in workflow.logs(rule).items() if port != "main"}
    launcher = shlex.split(workflow.launcher(rule, names)) if declared.gpus_key else ["python"]
    argv = [*([sys.executable] if launcher == ["python"] else launcher), "-m", f"pipeline.{stage.name}"]
    for port in stage.ports:
        value = (given if port.role == INPUT else outputs if port.role == OUTPUT else logs if port.role == LOG
                 else {}).get(port.name)
        if value is not None and value != []:
            argv += [port.flag, *(value if isinstance(value, list) else [value])]
    if declared.resumable:
        argv += ["--resume-dir", workflow.resume_dir(rule, **wildcards)]
    if "workers" in stage.settings:
        argv += ["--workers", str(workflow.config["corpus"]["threads"])]
    return argv + ["--params", workflow.params(rule, names)]


def _records(paths: list[str]) -> dict[str, tuple[bytes, dict, float]]:
    """The job's intact records: (bytes, content, mtime) by path."""
    kept = {}
    for path in paths:
        if path.endswith(".json") and os.path.isfile(path):
            try:
                kept[path] = (Path(path).read_bytes(), read_record(path), os.stat(path).st_mtime)
            except Exception:  # an altered or foreign record: rebuilt like any other damage
                continue
    return kept


def _set_time(path: Path, when: float) -> None:
    if path.is_dir():
        stamp = path / TIMESTAMP
        stamp.touch()
        os.utime(stamp, (when, when))
    else:
        os.utime(path, (when, when))


def settle(outputs: list[str], before: dict[str, tuple[bytes, dict, float]], started: float) -> list[str]:
    """After a job ran again: give every output that is the same as its intact record said the record's time
    back (a record equal to the old one but for its timings: the old bytes too); return the outputs that are
    new to the jobs reading them."""
    for record_path, (old_bytes, old, when) in before.items():
        base, same = Path(record_path).parent, True
        for name, entry in (old.get("files") or {}).items():
            file = base / name
            if file.is_file() and sha256_file(file) == entry["sha256"]:
                os.utime(file, (when, when))
            else:
                same = False
        new = json.loads(Path(record_path).read_text())
        if same and _without(new) == _without(old):  # equal but for timings (and the checksum over them)
            if new != old:
                with atomic_output(record_path) as tmp:
                    tmp.write_bytes(old_bytes)
            os.utime(record_path, (when, when))
            for output in map(Path, outputs):  # a directory's time is that of a file Snakemake puts in it
                if output.is_dir() and any(name.startswith(_relative(output, base) + "/") for name in old["files"]):
                    _set_time(output, when)
    return [path for path in outputs if _time(Path(path)) >= started]


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _time(path: Path) -> float:
    stamp = path / TIMESTAMP
    return (stamp if path.is_dir() and stamp.exists() else path).stat().st_mtime


def repair(workflow: Workflow, damage: list[Damage], dry_run: bool = False) -> int:
    jobs = list(dict.fromkeys(d.job for d in damage))
    order = {(rule, tuple(sorted(wc.items()))): n for n, (rule, wc) in enumerate(workflow.jobs())}
    jobs.sort(key=lambda job: order.get(job, len(order)))
    for rule, key in jobs:
        wildcards, name = dict(key), workflow.job(rule, **dict(key))
        outputs = job_outputs(workflow, rule, wildcards)
        argv = job_argv(workflow, rule, wildcards)
        print(f"{rule} {name}: " + shlex.join(argv) if dry_run else f"{rule} {name}: running again", flush=True)
        if dry_run:
            continue
        before, started = _records(outputs), time.time() - 1
        log = Path(workflow.log(rule, **wildcards)).with_suffix(".repair.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        threads = str(min(workflow.threads(rule, SimpleNamespace(**wildcards)), os.cpu_count() or 1))
        env = dict(os.environ, **{name: threads for name in THREAD_VARIABLES})  # as Snakemake runs the job
        with open(log, "w") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            print(f"{rule} {name} failed (its log: {log}); rerun it and what reads it with: snakemake --forcerun "
                  f"{outputs[-1]}", file=sys.stderr)
            return 1
        new = settle(outputs, before, started)
        if new:
            print(f"  rebuilt; new to the jobs that read them (snakemake reruns those): {', '.join(new[:4])}"
                  f"{' ...' if len(new) > 4 else ''}")
        else:
            print("  rebuilt byte for byte as its record lists it: nothing downstream reruns")
    return 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.repair", description=__doc__.splitlines()[0])
    p.add_argument("--configfile", default="config/config.yaml", help="the run's config (as given to snakemake)")
    p.add_argument("--dry-run", "-n", action="store_true", help="list the damaged outputs and the jobs' commands")
    args = p.parse_args(argv)
    try:
        workflow = Workflow(cfg.validate(cfg.load_yaml(args.configfile)))
    except cfg.ConfigError as err:
        raise SystemExit(f"Error: {err}") from None
    damage = damaged_outputs(workflow)
    if not damage:
        print("nothing to repair: every output a later job used is in place")
        return
    for d in damage:
        print(f"{d.path}: {d.why}")
    raise SystemExit(repair(workflow, damage, args.dry_run))


if __name__ == "__main__":
    main()
