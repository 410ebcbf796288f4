"""The workflow through a real one-node SLURM cluster (tests/slurm/cluster.sh) with profiles/slurm.

Every rule runs as a SLURM job with the cpus, memory and time limit the rule declares (read back from
SLURM's own job-completion records); a rerun submits nothing; changing one student submits only that
student's jobs and the report. Without root (or without SLURM and a way to install it) these skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, venv_env
from test_workflow import SNAKEFILE, tiny_config

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
RUN_TIMEOUT = 900


def why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "a SLURM cluster needs root to start slurmctld and slurmd"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "tests/slurm/cluster.sh" not in (conf.read_text().splitlines() or [""])[0]:
        return f"{conf} belongs to a real SLURM installation; the test cluster does not replace it"
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    if not (os.environ.get("CI") or os.environ.get("MLSM_TEST_SLURM")):
        return ("SLURM is not installed; set MLSM_TEST_SLURM=1 (CI sets CI) to let the tests install "
                "slurm-wlm and munge from Debian")
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=900)
    assert started.returncode == 0, started.stdout + started.stderr
    yield state
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


def slurm_config() -> dict:
    """The tiny end-to-end config, cut to what tells the story: one MLSM and one MLM student."""
    config = tiny_config(Path("unused"))
    del config["teachers"]["tiny_mlm"]
    # The MLSM student trains data-parallel: torchrun starts 2 processes inside the job's srun step.
    config["students"] = {"mlsm": {**config["students"]["mlsm"], "gpus": 2}, "mlm": config["students"]["mlm"]}
    config["tasks"] = {"bbc_topic": config["tasks"]["bbc_topic"]}
    config["finetune"]["seeds"] = [1]
    config["finetune"]["checkpoint_tasks"] = []  # the final models only
    return config


def slurm_run(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    configfile = workdir / f"config-{len(list(workdir.glob('config-*.yaml')))}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    env = venv_env()
    # timeout -k: a plugin that loses track of its jobs waits forever; the test must not.
    command = ["timeout", "-k", "10", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake",
               "--workflow-profile", str(PROFILE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
               "--configfile", str(configfile), "--jobs", "4", "--latency-wait", "5",
               "--slurm-init-seconds-before-status-checks", "1"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT + 30)


def run_on_slurm(workdir: Path, config: dict) -> str:
    result = slurm_run(workdir, config)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def job_blocks(output: str) -> list[dict]:
    """The job blocks Snakemake prints: rule, jobid, threads, resources (numbers as int), shell command."""
    blocks = []
    for line in output.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):
            blocks.append({"rule": match.group(1), "threads": 1, "resources": {}, "shell": ""})
        elif not blocks:
            continue
        elif match := re.match(r"^\s+jobid: (\d+)$", line):
            blocks[-1]["jobid"] = match.group(1)
        elif match := re.match(r"^\s+threads: (\d+)$", line):
            blocks[-1]["threads"] = int(match.group(1))
        elif match := re.match(r"^\s+resources: (.*)$", line):
            for part in match.group(1).split(", "):
                key, value = part.split("=", 1)
                blocks[-1]["resources"][key] = int(value) if value.isdigit() else value
        elif line.startswith("Shell command: "):
            blocks[-1]["shell"] = line.removeprefix("Shell command: ")
    return blocks


def submissions(output: str) -> dict[str, dict]:
    """SLURM job id -> {rule, threads, mem_mb, runtime, log} as Snakemake planned and submitted the job."""
    planned = {block["jobid"]: block for block in job_blocks(output) if "jobid" in block}
    jobs = {}
    for job, slurm_id, log in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.*?)\)\.",
                                         output):
        block = planned[job]
        jobs[slurm_id] = {"rule": block["rule"], "threads": block["threads"], "mem_mb": block["resources"]["mem_mb"],
                          "runtime": block["resources"]["runtime"], "log": log}
    return jobs


def slurm_records(state: Path) -> dict[str, dict]:
    """SLURM's own job-completion log (jobcomp/filetxt): job id -> its fields."""
    records = {}
    for line in (state / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_workflow")
    output = run_on_slurm(workdir, slurm_config())
    return workdir, output


def test_every_rule_ran_as_a_slurm_job_with_its_declared_resources(cluster, first_run):
    workdir, output = first_run
    jobs = submissions(output)
    records = slurm_records(cluster)
    # The small rules (demo data, target summary, report) are localrules: they run on the submitting host.
    expected_rules = {"shard_corpus", "extract_activations", "fit_dictionary", "precompute_targets",
                      "pretrain_student", "finetune"}
    assert {job["rule"] for job in jobs.values()} == expected_rules
    assert len(jobs) == 10  # 2 target shards and the validation split's, 2 students, 2 fine-tuning jobs
    for slurm_id, job in jobs.items():
        record = records[slurm_id]
        tres = dict(item.split("=") for item in record["Tres"].split(","))
        assert record["JobState"] == "COMPLETED", (job, record)
        assert int(tres["cpu"]) == job["threads"], (job, record)
        assert tres["mem"] == f"{job['mem_mb']}M", (job, record)
        assert int(record["TimeLimit"]) == job["runtime"], (job, record)
    assert any(job["threads"] == 2 for job in jobs.values())  # threads reach SLURM, not only the default
    assert (workdir / "results" / "report" / "report.md").is_file()


def test_a_two_process_student_trains_under_torchrun_inside_its_slurm_job(cluster, first_run):
    workdir, output = first_run
    summary = json.loads((workdir / "results" / "students" / "mlsm" / "summary.json").read_text())
    assert summary["world_size"] == 2
    slurm_id, job = next((i, j) for i, j in submissions(output).items()
                         if j["rule"] == "pretrain_student" and "/mlsm/" in j["log"])
    assert job["threads"] == 2 and "cpu=2" in slurm_records(cluster)[slurm_id]["Tres"].split(",")


def test_rerun_submits_nothing(cluster, first_run):
    workdir, _ = first_run
    before = len(slurm_records(cluster))
    output = run_on_slurm(workdir, slurm_config())
    assert submissions(output) == {}
    assert "Nothing to be done" in output
    assert len(slurm_records(cluster)) == before


def test_changing_one_student_submits_only_its_jobs(cluster, first_run):
    workdir, _ = first_run
    config = json.loads(json.dumps(slurm_config()))
    config["students"]["mlm"]["max_steps"] = 5
    jobs = submissions(run_on_slurm(workdir, config))
    assert sorted(job["rule"] for job in jobs.values()) == ["finetune", "pretrain_student"]  # the report is local
    assert all("/mlm" in job["log"] for job in jobs.values())
    records = slurm_records(cluster)
    assert all(records[slurm_id]["JobState"] == "COMPLETED" for slurm_id in jobs)


def test_successful_jobs_keep_their_slurm_logs(first_run):
    """Issue #21, 9: the plugin deleted the SLURM log of every successful job."""
    _, output = first_run
    logs = [Path(job["log"]) for job in submissions(output).values()]
    assert logs and all(log.is_file() for log in logs), [str(log) for log in logs if not log.is_file()]
    assert all(".snakemake/slurm_logs/rule_" in str(log) for log in logs)


def test_squeue_shows_each_jobs_rule_and_wildcards(cluster, first_run):
    """Issue #21, 9: every job was named by the run's UUID alone. The run's jobs are now named mlsm_<run>
    (the plugin's status checks need one name per run), and `python -m pipeline.slurm queue` shows each job's
    rule and wildcards (its comment), also for jobs that ended minutes ago."""
    workdir, _ = first_run
    config = json.loads(json.dumps(slurm_config()))
    config["students"]["mlm"]["max_steps"] = 3
    jobs = submissions(run_on_slurm(workdir, config))
    queue = subprocess.run([sys.executable, "-m", "pipeline.slurm", "queue", "--all"], capture_output=True,
                           text=True, env=venv_env(PYTHONPATH=str(REPO)), timeout=60)
    assert queue.returncode == 0, queue.stderr
    lines = {line.split()[0]: line for line in queue.stdout.splitlines()[1:] if line.strip()}
    records = slurm_records(cluster)
    for slurm_id, job in jobs.items():
        assert f"rule_{job['rule']}_wildcards_mlm" in lines[slurm_id], (job, lines.get(slurm_id))
        assert records[slurm_id]["Name"].startswith("mlsm_"), records[slurm_id]


def test_a_job_larger_than_every_node_stops_before_submitting(cluster, tmp_path):
    """Issue #21, 8: shard_corpus asking for more CPUs than the node has waited forever in silence
    (PartitionConfig). One sinfo call before the first submission finds it and names the key."""
    config = slurm_config()
    cpus = os.cpu_count()
    config["corpus"]["threads"] = cpus + 2
    before = len(slurm_records(cluster))
    result = slurm_run(tmp_path, config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "jobs that no SLURM node can run (nothing was submitted)" in output, output[-3000:]
    assert f"job shard_corpus asks SLURM for {cpus + 2} CPUs" in output
    assert f"(the largest: {cpus} CPUs" in output and "Change corpus.threads" in output
    assert "has been submitted" not in output and len(slurm_records(cluster)) == before
