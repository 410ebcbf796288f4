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


def test_extraction_pads_the_next_group_while_the_device_runs_this_one(monkeypatch):
    """Extraction padded, sent, ran and read each length group one after another, so the GPU waited for the host's
    padding and the host for the GPU. Now group i is read only after group i + 1 is launched; the states land in
    the same rows."""
    import numpy as np
    import pyarrow as pa

    from pipeline import teacher

    events = []

    class Recording:
        hidden_size, pad_id = 2, 0

        def launch_gather(self, ids, types, lengths, rows, positions):
            group = len(events)
            events.append(("launch", group))
            states = np.stack([ids[rows, positions], positions], axis=1).astype(np.float16)  # the token, its place
            return group, states

        @staticmethod
        def collect(pending):
            events.append(("collect", pending[0]))
            return pending[1]

    class Store:
        def append(self, **arrays):
            self.arrays = arrays

    sequences = [[5 + i] * (3 + i % 4) for i in range(9)]
    batch = pa.RecordBatch.from_pydict({"input_ids": sequences, "token_type_ids": [[0] * len(s) for s in sequences],
                                        "seq_id": list(range(9))})
    store = Store()
    keep = np.ones(20)
    params = {"batch_size": 2, "positions_per_sequence": 0, "source": "recording"}
    teacher.extract_batch(Recording(), batch, store, keep, np.random.default_rng(0), 10**6, params, "shard")
    launches = [i for i, (kind, _) in enumerate(events) if kind == "launch"]
    assert len(launches) == 5
    for group, at in enumerate(launches):
        collected = events.index(("collect", at))
        assert collected > (launches[group + 1] if group + 1 < len(launches) else at)
    states = store.arrays["states"]
    assert np.array_equal(states[:, 0], store.arrays["token_ids"]) and np.array_equal(states[:, 1],
                                                                                        store.arrays["positions"])


def test_the_fast_solver_waits_for_the_device_once_a_gap_check():
    """Each gap check of the fast solver selected the rows kept and done with boolean masks: on a GPU a wait for
    the device for every array selected from (about ten a check). Now one a check, and the codes are the same."""
    from pipeline.solvers import lasso

    from host_syncs import HostSyncs

    g = torch.Generator().manual_seed(0)
    dictionary = lasso.l2_normalise(torch.randn(64, 16, generator=g)).T  # [d, K], unit columns
    x = lasso.l2_normalise(torch.randn(40, 16, generator=g))
    solver = lasso.Lasso(dictionary, 0.05, "fast", 200, 1e-3)
    correlation = x @ solver.dictionary
    start = torch.zeros_like(correlation), torch.zeros(len(x), dtype=torch.int32)
    with HostSyncs() as syncs:
        codes, iterations, gap = solver._restarted_fista(x, correlation, *start, 5000, 1e-3)
    checks = -(-int(iterations.max()) // lasso.GAP_CHECK_EVERY)
    assert syncs.counts == {"scalar": checks + 1}  # and one: whether the starting codes are all zero
    assert (gap <= 1e-3).all()
    reference, _ = lasso.fista(x, dictionary, 0.05, max_iterations=3000)
    assert torch.allclose(lasso.objective(x, dictionary, codes, 0.05),
                          lasso.objective(x, dictionary, reference, 0.05), rtol=2e-3)


def compiled_steps_check() -> None:
    from pipeline.solvers import fista_steps

    fused = [fista_steps._Fused(fista_steps.proximal_step), fista_steps._Fused(fista_steps.momentum_step)]
    g = torch.Generator().manual_seed(1)
    for rows, step in ((7, 0.1), (13, 0.02)):
        y, y_product, correlation, a, a_product = (torch.randn(rows, 32, generator=g) for _ in range(5))
        t = 1 + torch.rand(rows, 1, generator=g)
        eager = fista_steps.proximal_step(y, y_product, correlation, step, step / 2)
        compiled = fused[0](y, y_product, correlation, torch.tensor(step), torch.tensor(step / 2))
        assert torch.allclose(compiled, eager, atol=1e-6)
        new_product = torch.randn(rows, 32, generator=g)
        for c, e in zip(fused[1](y, eager, a, new_product, a_product, t),
                        fista_steps.momentum_step(y, eager, a, new_product, a_product, t), strict=True):
            assert torch.allclose(c, e, atol=1e-6)
    assert all(f.compiled is not None for f in fused), "the steps fell back to eager: compiling failed"


def test_the_compiled_fista_steps_equal_the_eager_ones():
    """On a GPU the fast solver's two elementwise steps run compiled into fused kernels (pipeline/solvers/
    fista_steps.py); compiled here on the CPU, they give the eager steps' values for any rows and any step size.
    In a process of its own: the compiled kernels stay out of the test session's."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, venv_env

    here = Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", "import test_gpu_path; test_gpu_path.compiled_steps_check()"],
                         cwd=here, capture_output=True, text=True, timeout=600,
                         env=venv_env(PYTHONPATH=f"{REPO}:{here}"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
