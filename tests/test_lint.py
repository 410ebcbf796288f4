"""The code style the project keeps (`make lint` runs this file): ruff, snakefmt and Snakemake's lint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, venv_env

BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=venv_env(), timeout=300)


def test_ruff_is_clean():
    result = run(str(BIN / "ruff"), "check", "pipeline", "tests", "bench", "tools")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = run(str(BIN / "snakefmt"), "--check", "workflow")
    assert result.returncode == 0, result.stdout + result.stderr


# Every rule runs in the project's one environment (pyproject.toml, pixi.toml): a per-rule conda
# environment would install the same packages once per rule, and could be neither built nor tested here.
ONE_ENVIRONMENT = "Specify a conda environment or container for each rule."


def test_snakemake_lint_is_clean():
    result = run(sys.executable, "-m", "snakemake", "--lint")
    output = result.stdout + result.stderr
    lints = set(re.findall(r"^\s+\* (.+?):?$", output, flags=re.M))
    assert lints <= {ONE_ENVIRONMENT}, output
    assert "Lints for snakefile" not in output, output
