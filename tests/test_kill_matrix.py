"""kill -9 each stage of the tiny DAG at a seeded random point, rerun, and get the uninterrupted outputs.

One chain of Snakemake runs: run i kills a job of stage i; run i+1 is both the rerun after that kill
and the run in which stage i+1 is killed; a last run completes the DAG. Long stages checkpoint after
every unit (checkpoint_seconds: 0) and are killed after their n-th checkpoint (n seeded) plus a seeded
jitter; short stages at a seeded fraction of their duration in the uninterrupted run. Then:
(a) the DAG completes; (b) every output equals the uninterrupted run's (byte for byte, except the
timings named in `comparable`); (c) each resumed job's journal shows it continued from at least the
checkpoints written before its kill.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.compare import comparable, outputs
from pipeline.data import contract

from conftest import venv_env
from test_workflow import snakemake, snakemake_command

SEED = 20261123


@dataclass
class Stage:
    rule: str
    command: str         # what the job's command line contains
    pick: str = ""       # and, where a rule has several jobs, which one to kill
    resumable: bool = False


STAGES = [
    Stage("bbc_news_data", "-m pipeline.demo_data"),
    Stage("shard_corpus", "-m pipeline.corpus"),
    Stage("extract_activations", "-m pipeline.teacher", resumable=True),
    Stage("fit_dictionary", "-m pipeline.dictionary", resumable=True),
    Stage("precompute_targets", "-m pipeline.targets", "shard-001", resumable=True),
    Stage("summarize_targets", "-m pipeline.target_summary"),
    Stage("pretrain_student", "-m pipeline.pretrain", "students/mlsm/", resumable=True),
    Stage("finetune", "-m pipeline.finetune", "students/mlsm/", resumable=True),
    Stage("report", "-m pipeline.report"),
]


def job_processes(workdir: Path, stage: Stage) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the stage's python processes running in workdir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        line = " ".join(argv)
        if ("python" in argv[0] and stage.command in line and stage.pick in line
                and Path(cwd).resolve() == workdir.resolve()):
            found.append((int(entry.name), argv))
    return sorted(found)


def checkpoints_since_start(journal: Path) -> int:
    if not journal.exists():
        return 0
    count = 0
    for line in journal.read_text().splitlines():
        event = json.loads(line)["event"]
        count = 0 if event in ("start", "resume", "discard") else count + (event == "checkpoint")
    return count


def reference_seconds(results: Path, rule: str) -> float:
    rows = [row for path in (results / contract.BENCHMARKS / rule).glob("*.tsv")
            for row in csv.DictReader(open(path), delimiter="\t")]
    return min(float(r["s"]) for r in rows)


def kill_one(workdir: Path, stage: Stage, reference: Path, rng: random.Random, log: list) -> dict:
    """Start Snakemake, kill -9 a job of `stage`, wait for Snakemake to stop; what happened."""
    runner = subprocess.Popen(snakemake_command(workdir, workdir / "kill.yaml"), env=venv_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (victims := job_processes(workdir, stage)):
            assert runner.poll() is None, \
                f"Snakemake ended before {stage.rule} started:\n{runner.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage.rule} never started"
            time.sleep(0.02)
        pid, argv = victims[0]
        case = {"stage": stage.rule}
        if stage.resumable:
            case["job"] = argv[argv.index("--resume-dir") + 1]
            journal = Path(workdir, case["job"], "journal.jsonl")
            wanted = rng.randint(1, 2)
            while checkpoints_since_start(journal) < wanted:
                assert time.monotonic() < deadline and Path(f"/proc/{pid}").exists(), \
                    f"{stage.rule} ended before its checkpoint {wanted}"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            case.update(journal=journal, checkpoints_before_kill=checkpoints_since_start(journal))
        else:
            delay = rng.uniform(0.05, 0.6) * reference_seconds(reference, stage.rule)
            case["kill_after_s"] = round(delay, 2)
            time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"{stage.rule}: the job ended before the kill; lower the kill point")
        output, _ = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode != 0, f"killing {stage.rule} did not fail the run:\n{output[-2000:]}"
    log.append(case)
    return case


@pytest.mark.e2e
def test_kill_every_stage_and_rerun(tmp_path, workflow_run):
    reference_dir, _, config = workflow_run
    workdir = tmp_path / "killed"
    workdir.mkdir()
    # No retries: each kill ends its run, and the next run is the rerun (retries have their own test below).
    (workdir / "kill.yaml").write_text(yaml.safe_dump({**config, "checkpoint_seconds": 0, "retries": 0}))
    rng, cases = random.Random(SEED), []
    started = time.monotonic()
    for stage in STAGES:
        kill_one(workdir, stage, reference_dir / "results", rng, cases)
    final = snakemake(workdir, workdir / "kill.yaml")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]          # (a)
    wall = time.monotonic() - started

    ours, theirs = outputs(workdir / "results"), outputs(reference_dir / "results")
    assert sorted(ours) == sorted(theirs)
    assert not [p for p in (workdir / "results").rglob("*.tmp")], "a killed writer's temporary was left behind"
    differing = [rel for rel in ours if comparable(ours[rel], workdir / "results")
                 != comparable(theirs[rel], reference_dir / "results")]
    assert not differing, f"outputs differ from the uninterrupted run: {differing}"                # (b)

    for case in cases:                                                                          # (c)
        if "journal" not in case:
            continue
        events = [json.loads(line) for line in case["journal"].read_text().splitlines()]
        resumed = [e for e in events if e["event"] == "resume"]
        assert resumed, f"{case['stage']} started over instead of resuming: {events}"
        assert resumed[-1]["completed"] >= case["checkpoints_before_kill"] >= 1, (case, resumed)
        assert events[-1]["event"] == "done"
        case["resumed_after_units"] = resumed[-1]["completed"]
    print(f"\nkill matrix: {len(cases)} kills, {wall:.0f} s")
    for case in cases:
        print({k: v for k, v in case.items() if k != "journal"})


@pytest.mark.e2e
def test_a_killed_job_is_retried_in_the_same_run_and_resumes(tmp_path, workflow_run):
    """retries: a job killed mid-way (as at a SLURM time limit) is run again by the same Snakemake run and
    continues from its checkpoint, so the run completes with no manual rerun."""
    import shutil

    reference_dir, _, config = workflow_run
    workdir = tmp_path / "retried"
    # With Snakemake's records (.snakemake/metadata), so that it sees what the edit below changes.
    shutil.copytree(reference_dir, workdir, ignore=shutil.ignore_patterns("locks", "incomplete"))
    changed = json.loads(json.dumps(config))
    changed["students"]["mlm"]["max_steps"] = 6  # only this student (and its fine-tuning, the report) reruns
    (workdir / "kill.yaml").write_text(yaml.safe_dump({**changed, "checkpoint_seconds": 0, "retries": 1}))
    runner = subprocess.Popen(snakemake_command(workdir, workdir / "kill.yaml"), env=venv_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage = Stage("pretrain_student", "-m pipeline.pretrain", "students/mlm/", resumable=True)
    try:
        pid, journal = job_past_checkpoints(workdir, runner, stage, 2)
        os.kill(pid, signal.SIGKILL)
        output, _ = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, output[-3000:]
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and resumed[-1]["completed"] >= 2 and events[-1]["event"] == "done", events
    from pipeline.data.integrity import read_record

    assert read_record(workdir / "results" / contract.STUDENT_SUMMARY.format(student="mlm"))["steps"] == 6


def job_past_checkpoints(workdir: Path, runner: subprocess.Popen, stage, checkpoints: int) -> tuple[int, Path]:
    """(pid, resume journal) of the stage's job once it has saved `checkpoints` checkpoints in this run."""
    deadline = time.monotonic() + 600
    while not (victims := job_processes(workdir, stage)):
        assert runner.poll() is None and time.monotonic() < deadline, "the student's job never started"
        time.sleep(0.02)
    pid, argv = victims[0]
    journal = Path(workdir, argv[argv.index("--resume-dir") + 1], "journal.jsonl")
    while checkpoints_since_start(journal) < checkpoints:
        assert time.monotonic() < deadline and not process_ended(pid), "no checkpoint before the end"
        time.sleep(0.005)
    return pid, journal


def process_ended(pid: int) -> bool:
    """Whether a process (not our child: an orphan) has exited; a zombie nobody reaps counts as ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.e2e
def test_kill_snakemake_itself_unlock_and_rerun_beside_its_orphaned_job(tmp_path, workflow_run):
    """kill -9 of Snakemake mid-stage leaves its job running (orphaned) and the working directory locked. After
    --unlock, a rerun while the orphan still writes stops before any job, naming it (issue #21, 4: the rerun's
    job used to delete the orphan's temporaries); once the orphan has finished, a rerun completes with the
    uninterrupted run's outputs."""
    import shutil

    reference_dir, _, config = workflow_run
    workdir = tmp_path / "orphans"
    shutil.copytree(reference_dir, workdir, ignore=shutil.ignore_patterns("locks", "incomplete"))
    # One student's training runs again, asked for by its record (a short run: the rest is in place).
    shutil.rmtree(workdir / "results" / "students" / "mlm")
    target = contract.STUDENT_SUMMARY.format(student="mlm")
    (workdir / "kill.yaml").write_text(yaml.safe_dump({**config, "checkpoint_seconds": 0, "retries": 0}))
    # Not a pipe: the orphaned job's shell would hold it open.
    runner = subprocess.Popen(snakemake_command(workdir, workdir / "kill.yaml", f"results/{target}"), env=venv_env(),
                              stdout=open(workdir / "killed.out", "w"), stderr=subprocess.STDOUT)
    stage = Stage("pretrain_student", "-m pipeline.pretrain", "students/mlm/", resumable=True)
    orphan = None
    try:
        orphan, _ = job_past_checkpoints(workdir, runner, stage, 1)
        os.kill(orphan, signal.SIGSTOP)  # hold the job mid-stage (a slow one) until the rerun has started
        runner.kill()  # Snakemake itself; its job goes on
        runner.wait(timeout=60)
        assert not process_ended(orphan)
        assert snakemake(workdir, workdir / "kill.yaml", "--unlock").returncode == 0
        beside = snakemake(workdir, workdir / "kill.yaml", f"results/{target}")
        assert beside.returncode == 1
        message = beside.stdout + beside.stderr
        assert "other processes are still writing outputs of this workflow" in message, message[-3000:]
        assert f"pid {orphan} on " in message and f"kill {orphan}" in message
        assert "Job stats" in message and "localrule" not in message and "\nrule " not in message  # no job ran
        os.kill(orphan, signal.SIGCONT)
        deadline = time.monotonic() + 600
        while not process_ended(orphan):
            assert time.monotonic() < deadline, "the orphaned job never ended"
            time.sleep(0.05)
    finally:
        if runner.poll() is None:
            runner.kill()
        if orphan is not None and not process_ended(orphan):
            os.kill(orphan, signal.SIGCONT)
    final = snakemake(workdir, workdir / "kill.yaml", f"results/{target}")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    ours, theirs = outputs(workdir / "results"), outputs(reference_dir / "results")
    assert sorted(ours) == sorted(theirs), set(ours) ^ set(theirs)
    differing = [rel for rel in ours if comparable(ours[rel], workdir / "results")
                 != comparable(theirs[rel], reference_dir / "results")]
    assert not differing, f"outputs differ from the uninterrupted run: {differing}"
