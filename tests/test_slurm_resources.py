"""What each rule asks SLURM for, built by the SLURM executor plugin's own sbatch argument code.

The jobs and their resources come from a real Snakemake dry run of the tiny config with `device: cuda`;
the sbatch arguments from snakemake_executor_plugin_slurm's get_submit_command and set_gres_string,
exactly as the plugin composes them when it submits. No cluster is needed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from test_slurm import job_blocks, slurm_config, submissions

from test_workflow import snakemake

GPU_RULES = {"extract_activations", "fit_dictionary", "precompute_targets", "pretrain_student", "finetune"}


class Resources(dict):
    """Snakemake's job.resources: both .get() and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PlannedJob:
    def __init__(self, rule: str, threads: int, resources: dict, shell: str):
        self.name, self.threads, self.resources, self.shell = rule, threads, Resources(resources), shell

    def is_group(self) -> bool:
        return False


def planned_jobs(workdir: Path, device: str, *extra: str, gpus: int = 1, nodes: int = 1) -> list[PlannedJob]:
    """Every job of a dry run, with the resources Snakemake evaluated for it (and its shell command)."""
    config = slurm_config()
    config["device"] = device
    config["students"]["mlsm"]["gpus"] = gpus
    if nodes > 1:
        config["students"]["mlsm"]["nodes"] = nodes
    configfile = workdir / f"{device}-{gpus}-{nodes}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    # No workstation profile: its one-GPU cap for local runs would scale the jobs' gpu= down.
    result = snakemake(workdir, configfile, "--dry-run", "--printshellcmds", "--workflow-profile", "none", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    # The target rule `all` runs in the main process, never on SLURM.
    return [PlannedJob(block["rule"], block["threads"], block["resources"], block["shell"])
            for block in job_blocks(result.stdout) if block["rule"] != "all"]


def sbatch_arguments(job: PlannedJob) -> list[str]:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": f"rule_{job.name}", "account": "",
              "partition": "", "workdir": "."}
    return shlex.split(get_submit_command(job, params) + set_gres_string(job))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_dry")


def test_gpu_rules_ask_for_one_gpu_with_device_cuda(workdir):
    jobs = planned_jobs(workdir, "cuda")
    assert {job.name for job in jobs} >= GPU_RULES | {"report"}
    for job in jobs:
        arguments = sbatch_arguments(job)
        gpus = [a for a in arguments if a.startswith("--gpus")]
        assert gpus == (["--gpus=1"] if job.name in GPU_RULES else []), (job.name, arguments)
        assert not any(a.startswith("--gres") for a in arguments)
        assert arguments[arguments.index("--mem") + 1] == str(job.resources["mem_mb"])
        assert arguments[arguments.index("-t") + 1] == str(job.resources["runtime"])
        assert f"--cpus-per-task={job.threads}" in arguments


def test_a_gpu_job_gets_two_cpus_per_gpu(workdir):
    """Issue #21, 9: a GPU job's threads equalled its GPU count, one CPU for the process and its loader thread."""
    jobs = planned_jobs(workdir, "cuda", "--cores", "64", gpus=2)  # no local cap, as under the SLURM executor
    for job in jobs:
        gpus = int(job.resources.get("gpu", 0))
        cpus = int(next(a for a in sbatch_arguments(job) if a.startswith("--cpus-per-task=")).split("=")[1])
        assert cpus >= 2 * gpus, (job.name, cpus, gpus)
    assert {job.name for job in jobs if job.resources.get("gpu")} == GPU_RULES


def test_cpu_runs_ask_for_no_gpu(workdir):
    for job in planned_jobs(workdir, "cpu"):
        assert not any(a.startswith(("--gpus", "--gres")) for a in sbatch_arguments(job)), job.name


def test_gpu_model_and_cpus_per_gpu_from_set_resources(workdir):
    jobs = planned_jobs(workdir, "cuda", "--set-resources", "pretrain_student:gpu_model=h100",
                        "pretrain_student:cpus_per_gpu=8")
    pretrain = [job for job in jobs if job.name == "pretrain_student"]
    assert pretrain
    for job in pretrain:
        arguments = sbatch_arguments(job)
        assert "--gpus=h100:1" in arguments and "--cpus-per-gpu=8" in arguments
        assert not any(a.startswith("--cpus-per-task") for a in arguments)
    assert all("--gpus=1" in sbatch_arguments(job) for job in jobs if job.name == "finetune")


def test_a_two_gpu_student_asks_for_two_gpus_and_runs_torchrun(workdir):
    jobs = planned_jobs(workdir, "cuda", "--cores", "64", gpus=2)
    pretrain = [job for job in jobs if job.name == "pretrain_student"]
    two = next(job for job in pretrain if "--model results/students/mlsm/model" in job.shell)
    one = next(job for job in pretrain if "--model results/students/mlm/model" in job.shell)
    assert "--gpus=2" in sbatch_arguments(two) and "--cpus-per-task=4" in sbatch_arguments(two)
    assert two.shell.startswith("torchrun --standalone --nproc-per-node=2 -m pipeline.pretrain ")
    assert "--gpus=1" in sbatch_arguments(one) and one.shell.startswith("python -m pipeline.pretrain ")


def test_a_two_node_student_asks_for_a_task_and_its_gpus_on_each_node(workdir):
    """Issue #33: nodes x one task, GPUs per node as gres, and the launcher's srun starting a torchrun per node;
    a one-node student of the same config keeps its one task and --gpus."""
    jobs = planned_jobs(workdir, "cuda", "--cores", "64", gpus=2, nodes=2)
    pretrain = [job for job in jobs if job.name == "pretrain_student"]
    wide = next(job for job in pretrain if "--model results/students/mlsm/model" in job.shell)
    one = next(job for job in pretrain if "--model results/students/mlm/model" in job.shell)
    arguments = sbatch_arguments(wide)
    assert {"--nodes=2", "--ntasks=2", "--gres=gpu:2", "--cpus-per-task=4"} <= set(arguments), arguments
    assert not any(a.startswith(("--gpus", "--ntasks-per-gpu")) for a in arguments)
    assert wide.shell.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 bash -c 'exec torchrun --nnodes=2 "
                                 "--nproc-per-node=2 --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID ")
    assert "--gpus=1" in sbatch_arguments(one) and not any(a.startswith("--ntasks") for a in sbatch_arguments(one))
    assert one.shell.startswith("python -m pipeline.pretrain ")


def test_a_two_node_student_on_one_machine_is_one_clear_error(tmp_path):
    config = slurm_config()
    config["students"]["mlsm"]["nodes"] = 2
    configfile = tmp_path / "nodes.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, configfile)  # the workstation profile: the local executor
    assert result.returncode == 1, result.stdout[-2000:]
    assert "config key 'students.mlsm.nodes': 2 nodes need a SLURM cluster" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_submission_parser_reads_snakemake_output():
    output = ("rule pretrain_student:\n    jobid: 7\n    threads: 2\n"
              "    resources: tmpdir=<TBD>, mem_mb=8000, runtime=720\n"
              "Job 7 has been submitted with SLURM jobid 42 (log: /w/rule_pretrain_student/mlm/42.log).\n")
    assert submissions(output) == {"42": {"rule": "pretrain_student", "threads": 2, "mem_mb": 8000, "runtime": 720,
                                          "log": "/w/rule_pretrain_student/mlm/42.log"}}


# ---- jobs no node can hold (pipeline/slurm.py), the comparison without a cluster ----------------------

SINFO = "debug*|2|7000|(null)\ngpu|64|512000|gpu:a100:4(S:0-1)\ngpu|32|256000|gpu:2,gpu:v100:1\n"


def test_sinfo_lines_become_nodes():
    from pipeline.slurm import Node, parse_sinfo

    assert parse_sinfo(SINFO) == [Node("debug", 2, 7000, 0, True), Node("gpu", 64, 512000, 4),
                                  Node("gpu", 32, 256000, 3)]


def test_a_job_fits_some_node_of_its_partition_or_is_named_with_the_key_to_change():
    from pipeline.slurm import Request, parse_sinfo, problem, problems

    nodes = parse_sinfo(SINFO)
    assert problem(Request("finetune", cpus=2, memory_mb=6000), nodes) is None  # the default partition
    corpus = problem(Request("shard_corpus", cpus=4, memory_mb=10000), nodes)
    assert corpus.startswith("job shard_corpus asks SLURM for 4 CPUs, 10000 MB of memory, 0 GPUs; no node of "
                             "default partition debug has that (the largest: 2 CPUs, 7000 MB, 0 GPUs")
    assert "Change corpus.threads" in corpus
    student = Request("pretrain_student", {"student": "mlsm"}, cpus=2, memory_mb=6000, gpus=1)
    assert "device (cpu" in problem(student, nodes)  # no GPU in the default partition
    student.partition = "gpu"
    assert problem(student, nodes) is None
    student.cpus, student.gpus = 16, 8
    assert "students.mlsm.gpus" in problem(student, nodes) and "largest: 64 CPUs, 512000 MB, 4 GPUs" in \
        problem(student, nodes)
    assert "no node of partition gpu" in problem(Request("x", cpus=2, memory_mb=1, gpus=5, partition="gpu"), nodes)
    assert "has no nodes" in problem(Request("x", partition="big"), nodes)
    assert len(problems([Request("shard_corpus", cpus=9)] * 3 + [Request("report")], nodes)) == 1


def test_a_job_needs_one_node_with_all_it_asks_for():
    from pipeline.slurm import Request, parse_sinfo, problem

    nodes = parse_sinfo("p*|64|1000|(null)\np*|2|1000|gpu:8\n")  # CPUs on one node, GPUs on the other
    assert problem(Request("x", cpus=2, gpus=8), nodes) is None and problem(Request("x", cpus=64), nodes) is None
    message = problem(Request("finetune", cpus=32, gpus=4), nodes)
    assert "the largest: 64 CPUs, 1000 MB, 8 GPUs" in message and "lower its threads, mem_mb or gpu" in message


def test_gpu_jobs_take_two_cpus_per_gpu_and_cpu_jobs_one_per_process():
    from pipeline.slurm import job_threads

    assert [job_threads(g, cuda=1) for g in (1, 2, 4)] == [2, 4, 8]
    assert [job_threads(g, cuda=0) for g in (1, 2, 4)] == [1, 2, 4]
