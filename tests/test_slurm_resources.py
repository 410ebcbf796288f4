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


def planned_jobs(workdir: Path, device: str, *extra: str, gpus: int = 1) -> list[PlannedJob]:
    """Every job of a dry run, with the resources Snakemake evaluated for it (and its shell command)."""
    config = slurm_config()
    config["device"] = device
    config["students"]["mlsm"]["gpus"] = gpus
    configfile = workdir / f"{device}-{gpus}.yaml"
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
    jobs = planned_jobs(workdir, "cuda", gpus=2)
    pretrain = [job for job in jobs if job.name == "pretrain_student"]
    two = next(job for job in pretrain if "--model results/students/mlsm/model" in job.shell)
    one = next(job for job in pretrain if "--model results/students/mlm/model" in job.shell)
    assert "--gpus=2" in sbatch_arguments(two) and "--cpus-per-task=2" in sbatch_arguments(two)
    assert two.shell.startswith("torchrun --standalone --nproc-per-node=2 -m pipeline.pretrain ")
    assert "--gpus=1" in sbatch_arguments(one) and one.shell.startswith("python -m pipeline.pretrain ")


def test_submission_parser_reads_snakemake_output():
    output = ("rule pretrain_student:\n    jobid: 7\n    threads: 2\n"
              "    resources: tmpdir=<TBD>, mem_mb=8000, runtime=720\n"
              "Job 7 has been submitted with SLURM jobid 42 (log: /w/rule_pretrain_student/mlm/42.log).\n")
    assert submissions(output) == {"42": {"rule": "pretrain_student", "threads": 2, "mem_mb": 8000, "runtime": 720,
                                          "log": "/w/rule_pretrain_student/mlm/42.log"}}
