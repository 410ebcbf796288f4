"""The GPU path's decisions, tested on the CPU (issue #32): what a job asks the scheduler for under device auto,
TensorFloat-32 in training but never in the solvers, and a warning where torch cannot use the machine's GPU."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline import common
from pipeline import config as cfg
from pipeline.wiring.workflow import Workflow

from test_workflow import tiny_config


@pytest.mark.parametrize("device,gpus,requests", [("auto", 0, 0), ("auto", 1, 1), ("cuda", 0, 1), ("cpu", 1, 0)])
def test_a_gpu_jobs_request_follows_the_machine_under_device_auto(tmp_path, monkeypatch, device, gpus, requests):
    """device: auto asked the scheduler for no GPU, so on a GPU workstation several GPU jobs shared one GPU."""
    monkeypatch.setattr(common, "nvidia_gpus", lambda: gpus)
    workflow = Workflow(cfg.validate({**tiny_config(tmp_path), "device": device}))
    assert workflow.gpu_requests() == requests
    assert workflow.threads("finetune", SimpleNamespace()) == (2 if requests else 1)  # the process, its loader


def test_auto_on_a_machine_whose_gpu_torch_cannot_use_says_so(monkeypatch, caplog):
    monkeypatch.setattr(common, "nvidia_gpus", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert common.pick_device("auto").type == "cpu"
    assert "this machine has 2 NVIDIA GPU(s) but torch sees none (a CPU build of torch" in caplog.text


@pytest.fixture
def tf32_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_on_a_gpu_allows_tf32_and_the_solvers_never_use_it_unless_asked(tf32_flags, monkeypatch):
    from pipeline.solvers import lasso
    from pipeline.training import training_precision

    torch.backends.cuda.matmul.allow_tf32 = False
    training_precision(torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 is False
    training_precision(SimpleNamespace(type="cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True

    seen = []
    real = lasso.Lasso._solve

    def solve(self, x):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(self, x)

    monkeypatch.setattr(lasso.Lasso, "_solve", solve)
    dictionary = torch.nn.functional.normalize(torch.rand(8, 12, generator=torch.Generator().manual_seed(0)), dim=0)
    x = torch.nn.functional.normalize(torch.rand(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    lasso.Lasso(dictionary, 0.05, "fast", 100, 1e-3)(x)  # precision fp32 in a process that allows TF32
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32 is True  # restored after the solve
