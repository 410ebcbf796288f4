"""One writer per output, with two real processes: a second writer of a stage's outputs stops with one error
naming the first (which finishes untouched); a live writer's temporary files are never removed by another;
a killed writer's leftovers are; a run finds live writers of its outputs before any job.

Issue #21, 4: two jobs writing one output (two working directories sharing `results:`, or a rerun beside
the jobs of a killed Snakemake) deleted each other's temporaries, and the first died of a raw error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.common import StageError
from pipeline.data.integrity import atomic_output, read_verified
from pipeline.data.locks import holding, live_writer, lock_path

from conftest import MINILM, REPO, venv_env


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=venv_env(PYTHONPATH=str(REPO)), text=True, **kwargs)


def test_a_live_writers_temporary_is_never_removed_and_a_dead_ones_is(tmp_path):
    out = tmp_path / "weights.bin"
    first = python("import sys\n"
                   "from pipeline.data.integrity import atomic_output\n"
                   f"with atomic_output({str(out)!r}) as tmp:\n"
                   "    tmp.write_bytes(b'first')\n"
                   "    print('writing', flush=True)\n"
                   "    sys.stdin.readline()\n", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline() == "writing\n"
        dead = tmp_path / f".{out.name}.leftover.tmp"  # as a writer killed before the lock existed leaves it
        (dead / out.name).mkdir(parents=True)
        with atomic_output(out) as tmp:  # a second writer, while the first still writes
            tmp.write_bytes(b"second")
        assert out.read_bytes() == b"second" and not dead.exists()
        first.stdin.write("go on\n")
        first.stdin.flush()
        assert first.wait(timeout=60) == 0, "the first writer lost its temporary to the second"
    finally:
        first.kill()
    assert out.read_bytes() == b"first"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def corpus_command(tmp_path, corpus_text) -> list[str]:
    out = tmp_path / "corpus"
    return [sys.executable, "-m", "pipeline.corpus", "--text", str(corpus_text),
            "--shards", str(out / "shard-000.parquet"), str(out / "shard-001.parquet"),
            "--validation", str(out / "validation.parquet"), "--token-counts", str(out / "token_counts.npy"),
            "--manifest", str(out / "manifest.json"),
            "--params", json.dumps({"tokenizer": MINILM, "max_seq_len": 64, "seed": 0})]


def start_and_pause_when_locked(command: list[str], output: Path) -> subprocess.Popen:
    """Start a stage; stop it (SIGSTOP) as soon as it holds the lock of `output`."""
    job = subprocess.Popen(command, env=venv_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (live_writer(output) or {}).get("pid") == job.pid or job.poll() is not None,
             "the stage to take its lock")
    job.send_signal(signal.SIGSTOP)
    return job


def test_a_second_writer_of_a_stage_stops_naming_the_first_which_finishes(tmp_path, corpus_command):
    manifest = tmp_path / "corpus" / "manifest.json"
    first = start_and_pause_when_locked(corpus_command, manifest)
    try:
        second = subprocess.run(corpus_command, env=venv_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1, second.stderr
        assert f"is being written by another process (pid {first.pid} on " in errors[0]
        assert str(tmp_path / "corpus") in errors[0] and f"kill {first.pid}" in errors[0]
        first.send_signal(signal.SIGCONT)
        output, _ = first.communicate(timeout=300)
        assert first.returncode == 0, output[-3000:]
    finally:
        first.kill()
    read_verified(manifest, sorted((tmp_path / "corpus").glob("*.parquet")))
    assert not [p.name for p in (tmp_path / "corpus").iterdir() if p.name.startswith(".")]


def test_a_killed_writers_lock_does_not_stop_the_rerun(tmp_path, corpus_command):
    """kill -9 leaves the lock files behind; the kernel released the locks, so the rerun takes them over."""
    manifest = tmp_path / "corpus" / "manifest.json"
    first = start_and_pause_when_locked(corpus_command, manifest)
    first.kill()
    first.wait(timeout=60)
    assert lock_path(manifest).exists() and live_writer(manifest) is None
    rerun = subprocess.run(corpus_command, env=venv_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not [p.name for p in (tmp_path / "corpus").iterdir() if p.name.startswith(".")]


def test_a_run_finds_live_writers_of_its_outputs_before_any_job(tmp_path, monkeypatch, mlm_teacher):
    from pipeline import config as cfg
    from pipeline.wiring.preflight import check_no_live_writers
    from pipeline.wiring.workflow import Workflow

    from test_workflow import tiny_config

    monkeypatch.chdir(tmp_path)
    workflow = Workflow(cfg.validate(tiny_config(mlm_teacher)))
    check_no_live_writers(workflow)
    state = workflow.resume_dir("pretrain_student", student="mlm")
    holder = python("import sys\n"
                    "from pipeline.data.locks import holding\n"
                    f"with holding([{state!r}]):\n"
                    "    print('holding', flush=True)\n"
                    "    sys.stdin.readline()\n", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(StageError, match=rf"{state}: pid {holder.pid} on .*\n.*kill {holder.pid}"):
            check_no_live_writers(workflow)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    check_no_live_writers(workflow)


def test_a_stage_holds_its_outputs_and_resume_directory_but_not_under_other_ranks(monkeypatch):
    from pipeline.cli import parse, written_paths
    from pipeline.wiring import STAGES

    paths, _ = parse("targets", ["--corpus-part", "c.parquet", "--corpus-manifest", "m.json", "--dictionary", "D.npy",
                                 "--dictionary-metrics", "dm.json", "--targets", "t.parquet", "--record", "t.json",
                                 "--resume-dir", "state", "--params", "{}"])
    assert written_paths(STAGES["targets"], paths) == ["t.parquet", "t.json", "state"]
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes write no output
    assert written_paths(STAGES["targets"], paths) == []


def test_locks_are_exclusive_between_open_files_and_gone_after_release(tmp_path):
    out = tmp_path / "x.json"
    with holding([out]):
        assert live_writer(out)["pid"] == os.getpid()
        with pytest.raises(StageError, match=f"x.json is being written by another process \\(pid {os.getpid()}"):
            with holding([out]):
                pass
    assert not lock_path(out).exists() and live_writer(out) is None
