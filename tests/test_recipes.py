"""The extension recipes of CONTRIBUTING.md, performed as written on a copy of the repository: a new stage,
a new objective and a new config key each touch at most three files, and the workflow runs with them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, venv_env
from test_workflow import planned_jobs, tiny_config

STEP = re.compile(r'<!-- recipe (\w+): (?:new file (\S+) -->\n```\w*\n(.*?)```|in (\S+) replace "((?:[^"\\]|\\.)*)" '
                  r'with "((?:[^"\\]|\\.)*)" -->)', re.S)


def recipe(name: str) -> list[tuple]:
    """The steps of a recipe: ("new", path, text) or ("replace", path, old, new), in the order written."""
    steps = []
    for match in STEP.finditer((REPO / "CONTRIBUTING.md").read_text()):
        if match.group(1) != name:
            continue
        if match.group(2):
            steps.append(("new", match.group(2), match.group(3)))
        else:
            old, new = (json.loads(f'"{text}"') for text in match.group(5, 6))
            steps.append(("replace", match.group(4), old, new))
    return steps


def git(copy: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=copy, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def copy(tmp_path) -> Path:
    """The repository's files (tracked, and untracked ones git does not ignore) in a git repository of their own."""
    target = tmp_path / "repo"
    for name in git(REPO, "ls-files", "-co", "--exclude-standard").splitlines():
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git(target, "init", "-q")
    git(target, "add", "-A")
    git(target, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return target


def perform(copy: Path, name: str) -> list[str]:
    """Perform a recipe on the copy; return the files it touched."""
    steps = recipe(name)
    assert steps, f"CONTRIBUTING.md has no recipe {name!r}"
    for step in steps:
        path = copy / step[1]
        if step[0] == "new":
            assert not path.exists(), path
            path.write_text(step[2])
        else:
            text = path.read_text()
            assert text.count(step[2]) == 1, (step[1], step[2])
            path.write_text(text.replace(step[2], step[3]))
    return sorted(line[3:] for line in git(copy, "status", "--porcelain", "-uall").splitlines())


def run(copy: Path, *argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd or copy, capture_output=True, text=True, timeout=900,
                          env=venv_env(PYTHONPATH=str(copy)))


def snakemake(copy: Path, work: Path, config: dict, *args) -> subprocess.CompletedProcess:
    work.mkdir(exist_ok=True)
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    return run(copy, sys.executable, "-m", "snakemake", "--snakefile", copy / "workflow" / "Snakefile",
               "--directory", work, "--configfile", work / "c.yaml", "--workflow-profile",
               copy / "profiles" / "default", "--cores", "2", *args, cwd=work)


def small(tmp_path: Path, students: dict) -> dict:
    config = tiny_config(tmp_path / "no_kd_teacher")
    config["teachers"].pop("tiny_mlm")
    config["tasks"] = {"bbc_topic": config["tasks"]["bbc_topic"]}
    config["students"] = students
    config["finetune"].update(seeds=[1], checkpoint_tasks=[])
    return config


@pytest.mark.e2e
def test_a_stage_added_by_its_recipe_runs_in_the_workflow(copy, tmp_path):
    assert perform(copy, "stage") == ["pipeline/toy_stats.py", "pipeline/wiring/__init__.py",
                                      "pipeline/wiring/toy_stats.py"]
    work = tmp_path / "work"
    config = small(tmp_path, {"mlm": {"objective": "mlm"}})
    dry = snakemake(copy, work, config, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert planned_jobs(dry)["toy_stats"] == 1  # one of the workflow's targets, beside the report
    done = snakemake(copy, work, config, "results/toy/summary.json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((work / "results/toy/summary.json").read_text())
    corpus = json.loads((work / "results/corpus/manifest.json").read_text())
    assert (summary["sequences"], summary["tokens"], summary["label"]) == (corpus["sequences"], corpus["tokens"], "toy")
    assert "--corpus-manifest" in run(copy, sys.executable, "-m", "pipeline.toy_stats", "--help").stdout


@pytest.mark.e2e
def test_an_objective_added_by_its_recipe_trains_and_is_reported(copy, tmp_path):
    assert perform(copy, "objective") == ["pipeline/objectives.py", "pipeline/pretrain/losses.py"]
    work = tmp_path / "work"
    done = snakemake(copy, work, small(tmp_path, {"smooth": {"objective": "mlm_smooth"}}))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((work / "results/students/smooth/summary.json").read_text())
    assert summary["steps"] == 4 and "mlm_smooth" in summary["final"]
    card = (work / "results/students/smooth/model/README.md").read_text()
    assert "masked-language-modeling" in card
    assert "| smooth | mlm_smooth |" in (work / "results/report/report.md").read_text()


def test_a_config_key_added_by_its_recipe_is_validated_and_sliced(copy, tmp_path):
    assert perform(copy, "key") == ["pipeline/wiring/teacher.py", "workflow/schemas/config.schema.yaml"]
    code = ("import json, sys, yaml; from types import SimpleNamespace; from pipeline import config as cfg\n"
            "from pipeline.wiring.workflow import Workflow\nc = yaml.safe_load(open(sys.argv[1]))\n"
            "c['activations']['note'] = sys.argv[2]\n"
            "try:\n    w = Workflow(cfg.validate(c))\n"
            "except cfg.ConfigError as e:\n    print('error:', e); sys.exit()\n"
            "print(json.loads(w.params('extract_activations', SimpleNamespace(teacher='minilm')))['note'])\n")
    config = small(tmp_path, {"m": {"objective": "mlsm", "teacher": "minilm"}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert run(copy, sys.executable, "-c", code, tmp_path / "c.yaml", "hello").stdout.strip() == "hello"
    code = code.replace("sys.argv[2]", "5")
    assert "activations.note': 5 is not of type 'string'" in run(copy, sys.executable, "-c", code,
                                                                  tmp_path / "c.yaml", "").stdout
