"""Outputs that vanish or change after later jobs used them (issue #28, item 2): Snakemake said "Nothing to be
done"; the run now stops naming them and the two commands that repair them, and `python -m pipeline.repair`
rebuilds exactly them, so that nothing downstream reruns where the rebuilt files are the ones it read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pipeline.compare import differences
from pipeline.data.locks import lock_path

from conftest import venv_env
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.e2e

DELETED = ["results/corpus/shard-001.parquet", "results/teachers/minilm/activations.zarr",
           "results/students/kd/model", "results/finetune/mlm/final/bbc_topic/seed1.json"]


@pytest.fixture
def run_copy(workflow_run, tmp_path):
    """A copy of the finished tiny run (its outputs' times and Snakemake's records kept)."""
    workdir, configfile, _ = workflow_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, symlinks=True)
    shutil.copy(configfile, copy / "tiny.yaml")
    return copy, copy / "tiny.yaml"


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def repair(workdir, configfile, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.repair", "--configfile", str(configfile), *args],
                          cwd=workdir, capture_output=True, text=True, env=venv_env(), timeout=900)


def test_deleted_outputs_stop_the_run_and_the_repair_rebuilds_exactly_them(run_copy, tmp_path):
    workdir, configfile = run_copy
    original = tmp_path / "original"
    shutil.copytree(workdir / "results", original)
    for path in DELETED:
        remove(workdir / path)

    dry = snakemake(workdir, configfile, "--dry-run")
    said = dry.stdout + dry.stderr
    assert dry.returncode == 1 and "Job stats" not in dry.stdout, said[-3000:]
    for path in DELETED:
        assert f"{path}: missing" in said
    assert f"python -m pipeline.repair --configfile {configfile}" in said
    assert "snakemake --forcerun results/corpus/manifest.json" in said

    forced = snakemake(workdir, configfile, "--dry-run", "--forcerun", "results/corpus/manifest.json",
                       "results/teachers/minilm/manifest.json", "results/students/kd/summary.json",
                       "results/finetune/mlm/final/bbc_topic/seed1.json")
    assert forced.returncode == 0 and planned_jobs(forced)["shard_corpus"] == 1, forced.stderr[-2000:]

    fixed = repair(workdir, configfile)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert fixed.stdout.count("rebuilt byte for byte as its record lists it") == 3, fixed.stdout
    # The score's record holds its wall time: new to the report, which alone reruns.
    assert planned_jobs(snakemake(workdir, configfile, "--dry-run")) == {"report": 1, "all": 1}
    assert differences(workdir / "results", original) == []
    assert "nothing to repair" in repair(workdir, configfile).stdout


def test_a_file_of_another_size_than_its_record_says_is_named(run_copy):
    workdir, configfile = run_copy
    shard = workdir / "results/targets/minilm/shard-000.parquet"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 10)
    dry = snakemake(workdir, configfile, "--dry-run")
    assert dry.returncode == 1
    assert (f"results/targets/minilm/shard-000.parquet: {size - 10} bytes, {size} when written (listed in "
            f"results/targets/minilm/shard-000.json), written by precompute_targets (minilm_shard-000)"
            in dry.stdout + dry.stderr), dry.stderr[-2000:]


def test_outputs_beside_a_writers_lock_are_left_to_the_rerun(run_copy):
    """A job running now, or killed (its lock stays): Snakemake's rerun of incomplete jobs and the stage's
    resume handle it, not the repair."""
    workdir, configfile = run_copy
    model = workdir / "results/students/kd/model"
    remove(model)
    lock_path(model).write_text("{}")
    assert snakemake(workdir, configfile, "--dry-run").returncode == 0
    os.remove(lock_path(model))


def test_a_bad_task_stops_the_run_before_any_job_deletes_an_output(run_copy):
    """Issue #28: a failure inside a job comes after Snakemake deleted the job's outputs. What a job would find
    wrong in its task files (here: a max_train_examples draw that leaves out labels) stops the run first."""
    import yaml

    workdir, configfile = run_copy
    config = yaml.safe_load(configfile.read_text())
    config["finetune"]["max_train_examples"] = 1  # one example: one label of the task's five
    failing = workdir / "failing.yaml"
    failing.write_text(yaml.safe_dump(config))
    before = {p: p.stat().st_mtime for p in (workdir / "results" / "finetune").rglob("*.json")}
    result = snakemake(workdir, failing)
    assert result.returncode == 1
    assert "that finetune.max_train_examples (1) draws with seed 1 hold no example" in result.stdout + result.stderr
    assert "\nrule " not in result.stdout + result.stderr and "localrule" not in result.stdout  # no job ran
    assert {p: p.stat().st_mtime for p in (workdir / "results" / "finetune").rglob("*.json")} == before


def test_a_failure_that_repeats_is_not_retried_and_the_next_run_names_what_it_deleted(run_copy):
    """Issue #28, 5: a job failing on bad input ran again on every retry. Its later attempts now stop at once
    with the first one's message; the outputs Snakemake deleted before the failed attempt are named by the next
    run (after a failed rerun Snakemake itself says "Nothing to be done")."""
    import yaml

    workdir, configfile = run_copy
    weights = workdir / "results/students/mlm/model/model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # the same size: only the record's sha256 sees it
    config = yaml.safe_load(configfile.read_text())
    config["finetune"]["learning_rate"] = 1e-4  # the fine-tuning jobs rerun
    config["retries"] = 2
    edited = workdir / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    score = "results/finetune/mlm/final/bbc_topic/seed1.json"
    result = snakemake(workdir, edited, score)
    assert result.returncode == 1
    log = (workdir / "results/logs/finetune/mlm_final_bbc_topic_seed1.log").read_text()
    assert "not retried (attempt 3): attempt 1 of this job failed with an error that repeats" in log, log[-2000:]
    assert "model.safetensors is corrupt: its sha256 differs" in log
    assert not (workdir / score).exists()  # Snakemake deletes a job's outputs before it runs

    again = snakemake(workdir, edited, "--dry-run")
    assert again.returncode == 1 and f"{score}: missing" in again.stdout + again.stderr, again.stderr[-2000:]
    weights.write_bytes(intact)
    fixed = repair(workdir, configfile)  # the config as it was: the score comes back
    assert fixed.returncode == 0 and (workdir / score).exists(), fixed.stdout + fixed.stderr
