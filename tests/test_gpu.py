"""The GPU path, run on the GPU (issue #32): each test compares what a stage computes on the device with the same
computation in float32 or on the CPU, with the tolerance it states. They run with CUDA, or on the CPU when
GPU_CHECK_DEVICE=cpu (the CPU mode of bench/gpu_check.py, which the test suite runs so they cannot rot), and
are skipped otherwise."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.pretrain.data import Shard, make_batch
from pipeline.pretrain.losses import loss_parts, total_loss
from pipeline.pretrain.model import Student, build_config
from pipeline.solvers.lasso import Lasso, objective

from conftest import venv_env
from test_dictionary_and_targets import random_dictionary
from test_pretrain import BASE, kill_at_update, targets, train  # noqa: F401 (targets: a fixture)

DEVICE = os.environ.get("GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or GPU_CHECK_DEVICE=cpu: the check's CPU mode)")]


def student_and_batch(tokenizer, sharded_corpus, targets):  # noqa: F811
    import numpy as np

    torch.manual_seed(0)
    params = {**BASE, "objective": "mlsm+mlm", "atoms": 24, "dropout": 0.0}
    model = Student(build_config(params, tokenizer, 64), "mlsm+mlm", 24).to(DEVICE)
    batch = make_batch([(Shard(sharded_corpus[0][0], targets[0]), np.arange(8))], tokenizer,
                       {**params, "mask_fraction": 0.3}, (0, 0))
    return model, {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}, params


def step(model, batch, params, dtype):
    model.zero_grad()
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype is not None):
        loss = total_loss(loss_parts(model(batch), batch, params, None), params)
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_a_low_precision_training_step_is_close_to_fp32(tokenizer, sharded_corpus, targets, dtype, tolerance):  # noqa: F811
    """The loss within `tolerance` (relative) of the float32 step's, the gradient's direction within 1 % of it."""
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a GPU precision")
    model, batch, params = student_and_batch(tokenizer, sharded_corpus, targets)
    exact_loss, exact_grad = step(model, batch, params, None)
    loss, grad = step(model, batch, params, dtype)
    assert abs(loss - exact_loss) <= tolerance * abs(exact_loss)
    assert float(torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0)) > 0.99


def test_the_lasso_and_its_finish_on_the_device_solve_as_on_the_cpu():
    """The same codes' objective to 1e-5 (relative), every row certified to the tolerance on both."""
    dictionary = random_dictionary(48, 256, seed=3)
    x = torch.nn.functional.normalize(torch.randn(400, 48, generator=torch.Generator().manual_seed(4)), dim=1)
    cpu = Lasso(dictionary, 0.05, "fast", 500, 1e-3)(x)
    here = Lasso(dictionary.to(DEVICE), 0.05, "fast", 500, 1e-3)(x.to(DEVICE))
    assert (cpu.gap <= 1e-3).all() and (here.gap.cpu() <= 1e-3).all()
    ours, theirs = (objective(x, dictionary, s.codes.cpu().float(), 0.05).mean() for s in (here, cpu))
    assert abs(float(ours) - float(theirs)) <= 1e-5 * abs(float(theirs))


def test_the_dictionary_learner_on_the_device_learns_as_on_the_cpu():
    """The same seed: the held-out objective within 2 % of the CPU's (float sums differ in order)."""
    from pipeline.solvers.dictlearn import learn

    from test_dictionary_and_targets import synthetic_states

    x, _ = synthetic_states(n=3000, d=24)
    learned = [learn(x[:2500].to(device), 20, 0.05, 256, 2, 30, torch.Generator().manual_seed(0))[0].cpu()
               for device in ("cpu", DEVICE)]
    held_out = x[2500:]
    cpu, here = (objective(held_out, d, Lasso(d, 0.05, "fast", 500, 1e-4)(held_out).codes, 0.05).mean()
                 for d in learned)
    assert float(here) <= 1.02 * float(cpu)


def test_a_killed_run_on_the_device_resumes_to_the_same_weights(tmp_path, sharded_corpus, targets, monkeypatch):  # noqa: F811
    """Killed after update 2 and resumed from the checkpoint of update 1, the weights equal an uninterrupted
    run's: bit for bit on the CPU, to 1e-6 (relative) on a GPU, whose kernels may add in another order."""
    from safetensors.torch import load_file

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm+mlm", "student": "s", "atoms": 24, "max_steps": 4, "device": DEVICE}
    train(shards, targets, manifest, str(tmp_path / "a"), str(tmp_path / "a.json"), params)
    kill_at_update(monkeypatch, 2)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params, state,
              checkpoint_seconds=0, log_every=1)
    train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params, state,
          checkpoint_seconds=0, log_every=1)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    for key in a:
        if DEVICE == "cpu":
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key


def test_data_parallel_training_on_the_device(tmp_path, sharded_corpus, targets):  # noqa: F811
    """Two processes: NCCL on two GPUs (the collectives' tensors on each rank's GPU), gloo on the CPU."""
    from pipeline.launch import torchrun_command

    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("data parallelism with NCCL needs two GPUs")
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "ddp", "atoms": 24, "max_steps": 3, "batch_size": 2,
              "mlsm_head": "tied", "device": DEVICE}
    command = shlex.split(torchrun_command(2)) + [
        "-m", "pipeline.pretrain", "--corpus-shards", *shards, "--target-shards", *targets,
        "--target-manifest", str(Path(targets[0]).parent / "manifest.json"), "--corpus-manifest", manifest,
        "--model", str(tmp_path / "model"), "--summary", str(tmp_path / "s.json"), "--params", json.dumps(params)]
    result = subprocess.run(command, capture_output=True, text=True, env=venv_env(OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((tmp_path / "s.json").read_text())["world_size"] == 2
