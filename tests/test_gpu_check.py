"""`make gpu-check DEVICE=cpu`: the prepared GPU check in its CPU mode, at tiny shapes, so that it cannot rot
while no GPU is at hand (issue #32): every part runs and writes its verdict and figures, in at most two files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, venv_env


@pytest.mark.e2e
def test_the_gpu_check_runs_every_part_in_its_cpu_mode(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--device",
                             "cpu"], capture_output=True, text=True, env=venv_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu"
    parts = report["parts"]
    assert list(parts) == ["environment", "tests", "extraction", "targets", "pretrain", "dictionary", "workflow"]
    assert parts["environment"]["facts"]["torch"] and parts["environment"]["facts"]["missing"] == []
    assert "passed" in parts["tests"]["tail"][-1] and "failed" not in parts["tests"]["tail"][-1]
    for name in ("extraction", "targets", "pretrain"):
        assert parts[name]["figures"] and parts[name]["goals"], name
    assert parts["dictionary"].get("skipped") or parts["dictionary"]["figures"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    assert "gpu check on cpu: 7 of 7 parts passed" in result.stdout
