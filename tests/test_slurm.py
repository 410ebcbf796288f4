"""The workflow through a real two-node SLURM cluster (tests/slurm/cluster.sh) with profiles/slurm.

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
import time
from pathlib import Path

import pytest
import torch
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
    # The two nodes are two slurmd, each in its own UTS and mount namespace (tests/slurm/cluster.sh).
    if not shutil.which("unshare") or subprocess.run(["unshare", "--uts", "--mount", "true"]).returncode != 0:
        return "unshare --uts --mount is refused here: the two-node test cluster needs namespaces (a privileged root)"
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
    config["control"] = False  # no control student: its jobs would tell SLURM nothing new
    return config


def slurm_command(workdir: Path, configfile: Path) -> list[str]:
    # timeout -k: a plugin that loses track of its jobs waits forever; the test must not.
    return ["timeout", "-k", "10", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake",
            "--workflow-profile", str(PROFILE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
            "--configfile", str(configfile), "--jobs", "4", "--latency-wait", "5",
            "--slurm-init-seconds-before-status-checks", "1"]


def slurm_run(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    configfile = workdir / f"config-{len(list(workdir.glob('config-*.yaml')))}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return subprocess.run(slurm_command(workdir, configfile), capture_output=True, text=True, env=venv_env(),
                          timeout=RUN_TIMEOUT + 30)


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
    for job, slurm_id, log in re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.*?)\)\.",
                                         output):
        if job not in planned:  # a group job (finetune.pack): group_submissions
            continue
        block = planned[job]
        jobs[slurm_id] = {"rule": block["rule"], "threads": block["threads"], "mem_mb": block["resources"]["mem_mb"],
                          "runtime": block["resources"]["runtime"], "log": log}
    return jobs


def group_submissions(output: str) -> list[str]:
    """The SLURM job ids of the group jobs Snakemake submitted (several jobs in one submission; a group job's
    id is a UUID, a job's a number)."""
    return re.findall(r"Job [0-9a-f]{8}-[0-9a-f-]{27} has been submitted with SLURM jobid (\d+)", output)  # a UUID


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


# ---- a student on two nodes, and a requeue in the middle of a student's training (issue #33) -----------------

def two_node_config() -> dict:
    """MLM students, no dropout. `wide` (two nodes, one process each, 4 sequences a process) and `narrow` (one
    process, 8 sequences): the same global batch, so their updates differ only by the order in which the ranks'
    gradients are summed. `long` and `twin`: the same two-node student twice, long enough to be requeued mid-way
    (exact resume across nodes)."""
    config = slurm_config()
    config["finetune"].update(seeds=[1, 2], pack=2)  # each model's two fine-tuning jobs in one submission
    student = {"objective": "mlm", "dropout": 0.0, "max_steps": 4}
    config["students"] = {"wide": {**student, "nodes": 2, "batch_size": 4}, "narrow": {**student, "batch_size": 8},
                          "long": {**student, "nodes": 2, "batch_size": 4, "max_steps": 300},
                          "twin": {**student, "nodes": 2, "batch_size": 4, "max_steps": 300}}
    return config


def requeue_when_training(workdir: Path, student: str, update: int, runner: subprocess.Popen) -> str:
    """Once the student's job has logged `update`, `scontrol requeue` it; its SLURM job id."""
    log = workdir / "results" / "logs" / "pretrain_student" / f"{student}.csv"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (log.is_file() and len(log.read_text().splitlines()) > update // 10):  # a line every 10 updates
        assert runner.poll() is None and time.monotonic() < deadline, f"{student} never reached update {update}"
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True, check=True).stdout
    slurm_id = next(line.split()[0] for line in queue.splitlines() if line.endswith(f"wildcards_{student}"))
    subprocess.run(["scontrol", "requeue", slurm_id], check=True, capture_output=True)
    return slurm_id


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_two_nodes")
    configfile = workdir / "two-nodes.yaml"
    configfile.write_text(yaml.safe_dump(two_node_config()))
    runner = subprocess.Popen(slurm_command(workdir, configfile), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=venv_env())
    try:
        requeued = requeue_when_training(workdir, "long", 100, runner)
        output, _ = runner.communicate(timeout=RUN_TIMEOUT + 30)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, output[-6000:]
    return workdir, output, requeued


def test_a_student_spans_two_nodes_and_matches_one_process_with_its_global_batch(cluster, two_node_run):
    from safetensors.torch import load_file

    workdir, output, _ = two_node_run
    students = workdir / "results" / "students"
    wide, narrow = (json.loads((students / s / "summary.json").read_text()) for s in ("wide", "narrow"))
    assert wide["world_size"] == 2 and narrow["world_size"] == 1
    slurm_id = re.search(r"SLURM jobid (\d+) \(log: [^)]*/rule_pretrain_student/wide/", output).group(1)
    record = slurm_records(cluster)[slurm_id]
    assert (record["NodeCnt"], record["NodeList"], record["JobState"]) == ("2", "node[1-2]", "COMPLETED"), record
    assert wide["tokens_seen"] == narrow["tokens_seen"]  # the same sequences, split over the nodes
    for one, two in zip(narrow["history"], wide["history"], strict=True):
        assert one["mlm"] == pytest.approx(two["mlm"], rel=1e-4) and one["masked_tokens"] == two["masked_tokens"]
    a, b = (load_file(students / s / "model" / "model.safetensors") for s in ("wide", "narrow"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # 4 AdamW updates of float sums in other orders


def test_a_student_requeued_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(cluster, two_node_run):
    from safetensors.torch import load_file

    workdir, _, requeued = two_node_run
    states = [fields["JobState"] for line in (cluster / "jobcomp.log").read_text().splitlines()
              if (fields := dict(re.findall(r"(\w+)=(\S*)", line)))["JobId"] == requeued]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states  # SLURM ran it again after the requeue
    journal_file = workdir / "results" / "resume" / "pretrain_student" / "long" / "journal.jsonl"
    journal = [json.loads(line) for line in journal_file.read_text().splitlines()]
    resumed = [e for e in journal if e["event"] == "resume"]
    assert resumed and resumed[0]["completed"] >= 100 and journal[-1]["event"] == "done", journal
    a, b = (load_file(workdir / "results" / "students" / s / "model" / "model.safetensors") for s in ("long", "twin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_node_run_reruns_nothing(cluster, two_node_run):
    workdir, _, _ = two_node_run
    before = len(slurm_records(cluster))
    output = run_on_slurm(workdir, two_node_config())
    assert submissions(output) == {} and "Nothing to be done" in output
    assert len(slurm_records(cluster)) == before


def test_packed_fine_tuning_submits_one_job_per_model_with_the_same_scores(cluster, two_node_run):
    """finetune.pack: 2 puts each model's two fine-tuning jobs (seeds 1 and 2) in one SLURM job: 4 submissions
    for 8 jobs; a packed job's scores equal those of the same command run on its own."""
    from pipeline.compare import comparable

    workdir, output, _ = two_node_run
    assert not [j for j in submissions(output).values() if j["rule"] == "finetune"]
    packed = group_submissions(output)
    assert len(packed) == 4 and all(slurm_records(cluster)[i]["JobState"] == "COMPLETED" for i in packed)
    scores = "results/finetune/narrow/final/bbc_topic/seed2.json"
    command = next(line for line in output.splitlines() if "-m pipeline.finetune " in line and scores in line)
    command = command[command.index("python -m pipeline.finetune"):].split(" > ")[0]
    alone = command.replace(scores, "alone/seed2.json").replace("--resume-dir ", "--resume-dir alone/")
    # One thread, as the job had (its rule's threads): float sums in another order would move the last bits.
    ran = subprocess.run(["bash", "-c", alone], cwd=workdir, capture_output=True, text=True,
                         env=venv_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert comparable(workdir / "alone" / "seed2.json", workdir) == comparable(workdir / scores, workdir)
