"""Stage 5: the four objectives, masking, losses and loadable checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common import StageError
from pipeline import pretrain
from pipeline.pretrain import PretrainData, kd_loss, mask_batch, mlsm_loss
from pipeline.integrity import read_record
from pipeline.targets import compute, summarize

from test_dictionary_and_targets import random_dictionary, save_dictionary


def train(shards, targets, manifest, out_model, summary, params, resume_dir=None):
    return pretrain.train(pretrain.Paths(shards, manifest, out_model, summary, targets or [], resume_dir), params)

BASE = {"size": "tiny", "max_steps": 3, "batch_size": 4, "grad_accumulation": 2, "learning_rate": 1e-3,
        "weight_decay": 0.01, "warmup_fraction": 0.1, "max_grad_norm": 1.0, "mask_fraction": 0.15,
        "mask_strategy": "all_mask", "mlm_weight": 0.5, "kd_temperature": 2.0, "seed": 0, "device": "cpu",
        "teacher_trust_remote_code": False}


@pytest.fixture(scope="module")
def targets(tmp_path_factory, sharded_corpus, encoder_teacher):
    out = tmp_path_factory.mktemp("targets")
    shards, manifest = sharded_corpus
    save_dictionary(out, random_dictionary(32, 24))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 16, "lambda": 0.05, "top_k": 4,
              "max_iterations": 50, "tolerance": 1e-4, "device": "cpu", "trust_remote_code": False}
    paths = []
    for i, shard in enumerate(shards):
        paths.append(str(out / f"t{i}.parquet"))
        compute(shard, manifest, str(out / "D.npy"), str(out / "m.json"), paths[-1], params)
    summarize(paths, str(out / "manifest.json"), params)  # the record pretrain verifies the shards against
    return paths


def test_mlsm_loss_equals_dense_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, generator=g)
    atoms = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(5)])
    weights = torch.rand(5, 3, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    weights[2] = 0  # a position without a target is left out of the mean
    dense = torch.zeros(5, 10).scatter(1, atoms, weights)
    keep = [0, 1, 3, 4]
    expected = F.kl_div(F.log_softmax(logits[keep], -1), dense[keep], reduction="batchmean")
    assert torch.isclose(mlsm_loss(logits, atoms, weights), expected, atol=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(6, 30)
    assert kd_loss(logits, logits, 2.0).abs() < 1e-6
    assert kd_loss(logits, torch.randn(6, 30), 2.0) > 0


@pytest.mark.parametrize("strategy", ["all_mask", "bert"])
def test_masking_touches_only_ordinary_tokens(sharded_corpus, tokenizer, strategy):
    data = PretrainData(sharded_corpus[0], None, None)
    batch = mask_batch(data, np.arange(16), tokenizer, {"mask_fraction": 0.15, "mask_strategy": strategy},
                       torch.Generator().manual_seed(0))
    originals = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for b in range(16):
        originals[b, : len(data.input_ids[b])] = torch.from_numpy(data.input_ids[b])
    special = torch.isin(originals, torch.tensor(tokenizer.all_special_ids))
    assert not (batch["masked"] & special).any()
    assert torch.equal(batch["labels"], originals[batch["masked"]])
    fraction = batch["masked"].sum() / (~special).sum()
    assert 0.08 < fraction < 0.25
    unchanged = batch["input_ids"] == originals
    assert unchanged[~batch["masked"]].all()
    if strategy == "all_mask":
        assert (batch["input_ids"][batch["masked"]] == tokenizer.mask_token_id).all()
    else:
        assert (batch["input_ids"][batch["masked"]] == tokenizer.mask_token_id).float().mean() < 0.95


@pytest.mark.parametrize("objective", ["mlsm", "mlm", "mlsm+mlm", "kd"])
def test_each_objective_trains_and_saves_a_loadable_checkpoint(tmp_path, sharded_corpus, targets, mlm_teacher, objective):
    from transformers import AutoModel, AutoModelForMaskedLM

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": objective, "student": objective, "atoms": 24, "teacher_source": str(mlm_teacher)}
    summary = train(shards, targets if "mlsm" in objective else None, manifest, str(tmp_path / "model"),
                    str(tmp_path / "summary.json"), params)
    parts = {k for k in summary["final"] if k not in ("step", "lr")}
    assert parts == {"mlsm+mlm": {"mlsm", "mlm"}}.get(objective, {objective})
    assert all(np.isfinite(summary["final"][p]) for p in parts)
    model = AutoModel.from_pretrained(tmp_path / "model")
    assert model.config.hidden_size == 128
    if objective != "mlsm":
        _, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "model", output_loading_info=True)
        assert not info["missing_keys"]
    assert (tmp_path / "model" / "mlsm_head.safetensors").exists() == ("mlsm" in objective)
    assert read_record(tmp_path / "summary.json")["steps"] == 3


def test_kd_without_an_mlm_head_says_so(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "kd", "student": "kd", "teacher_source": str(encoder_teacher)}
    with pytest.raises(StageError, match="needs a teacher with an MLM head"):
        train(shards, None, manifest, str(tmp_path / "m"), str(tmp_path / "s.json"), params)
    assert not (tmp_path / "m").exists()


def test_misaligned_targets_are_refused(sharded_corpus, targets):
    with pytest.raises(StageError, match="not aligned"):
        PretrainData(sharded_corpus[0], targets[1:], str(Path(targets[0]).parent / "manifest.json"))


def test_training_is_reproducible(tmp_path, sharded_corpus, targets):
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "s", "atoms": 24}
    a = train(shards, targets, manifest, str(tmp_path / "a"), str(tmp_path / "a.json"), params)
    b = train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params)
    assert a["history"] == b["history"]


def test_torchrun_data_parallel_training_on_two_cpu_processes(tmp_path, sharded_corpus, targets):
    """The rule's own launcher (torchrun, 2 processes, gloo): ranks stay in sync, rank 0 saves once."""
    import shlex
    import subprocess

    from transformers import AutoModel

    from conftest import venv_env
    from pipeline.launch import torchrun_command

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "ddp", "atoms": 24, "gpus": 2}
    single = train(shards, targets, manifest, str(tmp_path / "one"), str(tmp_path / "one.json"), params)
    command = shlex.split(torchrun_command(2)) + [
        "-m", "pipeline.pretrain", "--corpus-shards", *shards, "--target-shards", *targets,
        "--corpus-manifest", manifest, "--out-model", str(tmp_path / "model"), "--summary", str(tmp_path / "s.json"),
        "--resume-dir", str(tmp_path / "state"), "--params", json.dumps(params)]
    # Checkpoints after every update: the collective save (every rank's random states) runs too.
    env = venv_env(OMP_NUM_THREADS="1", MLSM_CHECKPOINT_SECONDS="0")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_record(tmp_path / "s.json")
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] > 1.5 * single["tokens_seen"]  # each rank took its own rows
    assert AutoModel.from_pretrained(tmp_path / "model").config.hidden_size == 128
    assert len(list(tmp_path.glob(".model.*"))) == 0  # no temporary left behind
    journal = [json.loads(line)["event"] for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()]
    assert journal == ["start", "checkpoint", "checkpoint", "done"]  # 3 updates: saved after the first two
