"""The workflow as a Snakemake module: examples/module/Snakefile, copied into a project directory of its
own with that project's config, plans the same jobs as the workflow run directly and runs them there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config as cfg
from pipeline.data import contract
from pipeline.wiring.workflow import Workflow

from conftest import REPO, venv_env
from test_workflow import planned_jobs, tiny_config

EXAMPLE = REPO / "examples" / "module"


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlm_teacher) -> tuple[Path, dict]:
    """A project directory away from the repository: the example's Snakefile and the tiny config."""
    directory = tmp_path_factory.mktemp("my-project")
    shutil.copy(EXAMPLE / "Snakefile", directory / "Snakefile")
    config = tiny_config(mlm_teacher)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory, config


def in_project(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake run inside the project directory, with the pipeline found through MLSM_PIPELINE."""
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=directory,
                          capture_output=True, text=True, env=venv_env(MLSM_PIPELINE=str(REPO)), timeout=600)


def test_the_example_config_is_valid():
    config = cfg.validate(cfg.load_yaml(EXAMPLE / "config.yaml"))
    assert ("report", {}) in Workflow(config).jobs()


def test_the_module_plans_every_job_of_the_projects_config(project):
    directory, config = project
    result = in_project(directory, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {}
    for rule, _ in Workflow(cfg.validate(config)).jobs():
        expected[rule] = expected.get(rule, 0) + 1
    assert planned_jobs(result) == {**expected, "all": 1}


@pytest.mark.e2e
def test_the_module_runs_in_the_project_directory(project):
    directory, _ = project
    target = f"results/{contract.CORPUS_MANIFEST}"
    result = in_project(directory, target)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (directory / contract.BBC_DIR / "pretrain.txt.gz").is_file()  # the config's relative paths, here
    manifest = directory / "results" / contract.CORPUS_MANIFEST
    assert manifest.is_file() and (directory / "results" / "logs" / "shard_corpus").is_dir()
    assert planned_jobs(in_project(directory, "--dry-run", target)) == {}  # done: the rerun plans nothing
