"""Stage 5: the four objectives, masking, losses and loadable checkpoints."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common import StageError
from pipeline.data.integrity import read_record
from pipeline.pretrain import trainer
from pipeline.pretrain.data import BatchStream, Shard, make_batch
from pipeline.pretrain.losses import kd_loss, loss_parts, mlsm_loss, total_loss
from pipeline.pretrain.model import Student, build_config
from pipeline.pretrain.teachers import KdTeacher
from pipeline.stages import call

from test_dictionary_and_targets import code_targets, random_dictionary, save_dictionary, summarize


def train(shards, targets, manifest, model, summary, params, resume_dir=None, **more):
    """Pre-train through the stage's function; the target shards' record lies beside them."""
    record = {"target_manifest": str(Path(targets[0]).parent / "manifest.json")} if targets else {}
    return call("pretrain", params, corpus_shards=shards, corpus_manifest=manifest, model=model, summary=summary,
                target_shards=targets or [], resume_dir=resume_dir, **record, **more)

TIMINGS = ("tokens_per_second", "mfu", "seconds")


def learning_curve(summary: dict) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMINGS} for entry in summary["history"]]


BASE = {"size": "tiny", "max_steps": 3, "batch_size": 4, "grad_accumulation": 2, "learning_rate": 1e-3,
        "weight_decay": 0.01, "warmup_fraction": 0.1, "max_grad_norm": 1.0, "mask_fraction": 0.15,
        "mask_strategy": "all_mask", "mlm_weight": 0.5, "kd_temperature": 2.0, "targets": "precomputed", "dropout": 0.1,
        "compile": False,
        "checkpoint_fractions": [], "seed": 0, "device": "cpu", "teacher_trust_remote_code": False}


@pytest.fixture(scope="module")
def targets(tmp_path_factory, sharded_corpus, encoder_teacher):
    out = tmp_path_factory.mktemp("targets")
    shards, manifest = sharded_corpus
    save_dictionary(out, random_dictionary(32, 24))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 16, "lambda": 0.05, "top_k": 4,
              "solver": "fast", "max_iterations": 200, "tolerance": 1e-2, "device": "cpu", "trust_remote_code": False}
    paths = []
    for i, shard in enumerate(shards):
        paths.append(str(out / f"t{i}.parquet"))
        code_targets(shard, manifest, out, paths[-1], params)
    validation = str(Path(manifest).parent / "validation.parquet")  # no rows: validation_fraction is 0
    code_targets(validation, manifest, out, str(out / "validation.parquet"), params)
    record = summarize(paths, str(out / "manifest.json"), params, str(out / "validation.parquet"))
    assert record["validation"]["tokens"] == 0
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
    shard = Shard(sharded_corpus[0][0])
    rows = np.arange(16)
    batch = make_batch([(shard, rows)], tokenizer, {"mask_fraction": 0.15, "mask_strategy": strategy}, (0, 0))
    originals = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for b in rows:
        sequence = shard.tokens[shard.offsets[b]:shard.offsets[b + 1]]
        originals[b, : len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
    special = torch.isin(originals, torch.tensor(tokenizer.all_special_ids))
    assert not (batch["masked"] & special).any()
    assert torch.equal(batch["labels"], originals[batch["masked"]])
    assert batch["masked_count"] == batch["masked"].sum()
    fraction = batch["masked"].sum() / (~special).sum()
    assert 0.08 < fraction < 0.25
    unchanged = batch["input_ids"] == originals
    assert unchanged[~batch["masked"]].all()
    if strategy == "all_mask":
        assert (batch["input_ids"][batch["masked"]] == tokenizer.mask_token_id).all()
    else:
        assert (batch["input_ids"][batch["masked"]] == tokenizer.mask_token_id).float().mean() < 0.95


def test_batch_targets_are_those_of_the_masked_positions(sharded_corpus, targets, tokenizer):
    from pipeline.data.formats import read_targets

    shard = Shard(sharded_corpus[0][1], targets[1])
    rows = np.array([5, 0, 3])
    batch = make_batch([(shard, rows)], tokenizer, {"mask_fraction": 0.3, "mask_strategy": "all_mask"}, (1, 2))
    table = read_targets(targets[1])
    expected_atoms, expected_weights = [], []
    for b, r in enumerate(rows):
        counts = table["atom_counts"][int(r)].as_py()
        atoms, weights = table["atom_ids"][int(r)].as_py(), table["weights"][int(r)].as_py()
        starts = np.concatenate([[0], np.cumsum(counts)])
        for position in torch.nonzero(batch["masked"][b]).flatten().tolist():
            expected_atoms.append(atoms[starts[position]:starts[position + 1]])
            expected_weights.append(weights[starts[position]:starts[position + 1]])
    assert batch["target_atoms"].shape[1] == max(len(a) for a in expected_atoms)
    for got_atoms, got_weights, atoms, weights in zip(batch["target_atoms"], batch["target_weights"],
                                                      expected_atoms, expected_weights, strict=True):
        assert got_atoms[:len(atoms)].tolist() == atoms and not got_weights[len(atoms):].any()
        assert got_weights[:len(weights)].tolist() == pytest.approx(weights)
    assert batch["with_target"] == int((batch["target_weights"].sum(1) > 0).sum())


def test_the_stream_visits_every_sequence_once_per_epoch_in_a_seeded_order(sharded_corpus):
    shards, manifest = sharded_corpus
    sizes = [s["sequences"] for s in json.loads(Path(manifest).read_text())["shards"]]
    stream = BatchStream(shards, None, sizes, seed=3)
    total = sum(sizes)
    first = [(s, r) for s, rows in stream.rows(0, total) for r in rows]
    assert sorted(first) == sorted((s, r) for s, n in enumerate(sizes) for r in range(n))
    # Any window of the stream is a pure function of its start: a resumed run sees the same rows.
    window = [(s, r) for s, rows in stream.rows(total - 3, 7) for r in rows]
    assert window[:3] == first[-3:]
    second = [(s, r) for s, rows in BatchStream(shards, None, sizes, seed=3).rows(total, total) for r in rows]
    assert window[3:] == second[:4] and second != first  # a new epoch, a new order
    assert [(s, r) for s, rows in BatchStream(shards, None, sizes, seed=4).rows(0, total) for r in rows] != first


@pytest.mark.parametrize("objective", ["mlsm", "mlm", "mlsm+mlm", "kd"])
def test_each_objective_trains_and_saves_a_loadable_checkpoint(tmp_path, sharded_corpus, targets, mlm_teacher,
                                                               objective):
    from transformers import AutoModel, AutoModelForMaskedLM

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": objective, "student": objective, "atoms": 24, "teacher_source": str(mlm_teacher)}
    summary = train(shards, targets if "mlsm" in objective else None, manifest, str(tmp_path / "model"),
                    str(tmp_path / "summary.json"), params)
    parts = {k for k in summary["final"] if k in ("mlsm", "mlm", "kd")}
    assert parts == {"mlsm+mlm": {"mlsm", "mlm"}}.get(objective, {objective})
    assert {"grad_norm", "lr", "masked_tokens", "tokens_per_second", "mfu"} <= set(summary["final"])
    assert all(np.isfinite(summary["final"][p]) for p in parts)
    model = AutoModel.from_pretrained(tmp_path / "model")
    assert model.config.hidden_size == 128
    if objective != "mlsm":
        _, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "model", output_loading_info=True)
        assert not info["missing_keys"]
    assert (tmp_path / "model" / "mlsm_head.safetensors").exists() == ("mlsm" in objective)
    assert read_record(tmp_path / "summary.json")["steps"] == 3


@pytest.mark.parametrize("objective", ["mlsm", "mlm", "mlsm+mlm", "kd"])
def test_each_objective_lowers_its_loss_on_a_fixed_batch(sharded_corpus, targets, mlm_teacher, tokenizer, objective):
    manifest = json.loads(Path(sharded_corpus[1]).read_text())
    params = {**BASE, "objective": objective, "dropout": 0.0}
    torch.manual_seed(0)
    model = Student(build_config(params, tokenizer, 64), objective, 24)
    teacher = KdTeacher(str(mlm_teacher), torch.device("cpu"), manifest) if objective == "kd" else None
    shard = Shard(sharded_corpus[0][0], targets[0] if "mlsm" in objective else None)
    batch = make_batch([(shard, np.arange(8))], tokenizer, {**params, "mask_fraction": 0.3}, (0, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = total_loss(loss_parts(model(batch), batch, params, teacher), params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_online_targets_match_the_precomputed_ones(tmp_path, sharded_corpus, encoder_teacher):
    """With top_k = K and the same solver, the step's own targets give the precomputed run's losses."""
    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(32, 24, seed=5))
    solver = {"lambda": 0.05, "solver": "fista", "max_iterations": 100, "tolerance": 0.0}
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 16, "top_k": 24, "device": "cpu",
              "trust_remote_code": False, **solver}
    targets = [str(tmp_path / f"t{i}.parquet") for i in range(len(shards))]
    for shard, out in zip(shards, targets):
        code_targets(shard, manifest, tmp_path, out, params)
    summarize(targets, str(tmp_path / "manifest.json"), params)
    student = {**BASE, "objective": "mlsm", "student": "s", "atoms": 24, "max_steps": 2}
    precomputed = train(shards, targets, manifest, str(tmp_path / "a"), str(tmp_path / "a.json"),
                        {**student, "head_bias_init": "zero"}, log_every=1)
    # Online targets have no target record, hence no mean target: the MLSM head starts at zero (head_bias_init
    # prior notwithstanding), as the precomputed run's here.
    online = train(shards, None, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"),
                   {**student, "head_bias_init": "prior", "targets": "online",
                    "online": {**solver, "source": str(encoder_teacher), "layer": -1, "trust_remote_code": False}},
                   dictionary=str(tmp_path / "D.npy"), dictionary_metrics=str(tmp_path / "m.json"), log_every=1)
    for a, b in zip(learning_curve(precomputed), learning_curve(online), strict=True):
        assert a["mlsm"] == pytest.approx(b["mlsm"], rel=2e-3)  # float16 weights in the shards
    assert online["heads_at_prior"] == []


def test_kd_without_an_mlm_head_says_so(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "kd", "student": "kd", "teacher_source": str(encoder_teacher)}
    with pytest.raises(StageError, match="needs a teacher with an MLM head"):
        train(shards, None, manifest, str(tmp_path / "m"), str(tmp_path / "s.json"), params)
    assert not (tmp_path / "m").exists()


def test_misaligned_targets_are_refused(sharded_corpus, targets):
    with pytest.raises(StageError, match="not aligned"):
        Shard(sharded_corpus[0][0], targets[1])


def test_training_is_reproducible(tmp_path, sharded_corpus, targets):
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "s", "atoms": 24}
    a = train(shards, targets, manifest, str(tmp_path / "a"), str(tmp_path / "a.json"), params)
    b = train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params)
    assert learning_curve(a) == learning_curve(b)


@pytest.mark.parametrize("head", ["separate", "tied"])
def test_torchrun_data_parallel_training_matches_one_process(tmp_path, sharded_corpus, targets, head):
    """The rule's own launcher (torchrun, 2 processes, gloo) with half the batch each follows the same loss
    curve as one process with the whole batch; ranks stay in sync and rank 0 saves once. With the tied MLSM
    head (the paper preset), the MLM head's vocabulary bias has no gradient under objective mlsm (issue #32:
    DDP stopped at update 2)."""
    import shlex
    import subprocess

    from transformers import AutoModel

    from pipeline.launch import torchrun_command

    from conftest import venv_env

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "ddp", "atoms": 24, "dropout": 0.0, "max_steps": 4,
              "batch_size": 3, "mlsm_head": head}
    # Checkpoints after every update: the collective save (every rank's random states) runs too.
    command = shlex.split(torchrun_command(2)) + [
        "-m", "pipeline.pretrain", "--corpus-shards", *shards, "--target-shards", *targets,
        "--target-manifest", str(Path(targets[0]).parent / "manifest.json"), "--corpus-manifest", manifest,
        "--model", str(tmp_path / "model"), "--summary", str(tmp_path / "s.json"), "--resume-dir",
        str(tmp_path / "state"), "--checkpoint-seconds", "0", "--log-every", "1", "--params", json.dumps(params)]
    env = venv_env(OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_record(tmp_path / "s.json")
    assert summary["world_size"] == 2
    assert AutoModel.from_pretrained(tmp_path / "model").config.hidden_size == 128
    assert len(list(tmp_path.glob(".model.*"))) == 0  # no temporary left behind
    journal = [json.loads(line)["event"] for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()]
    assert journal == ["start", "checkpoint", "checkpoint", "checkpoint", "done"]  # saved after updates 1-3

    single = train(shards, targets, manifest, str(tmp_path / "one"), str(tmp_path / "one.json"),
                   {**params, "batch_size": 6}, log_every=1)
    assert single["tokens_seen"] == summary["tokens_seen"]  # the same sequences, split over the ranks
    for one, two in zip(learning_curve(single), learning_curve(summary), strict=True):
        assert one["masked_tokens"] == two["masked_tokens"]
        for key in ("mlsm", "grad_norm", "lr"):
            assert one[key] == pytest.approx(two[key], rel=1e-4), (key, one, two)


def kill_at_update(monkeypatch, update: int) -> list[int]:
    """The trainer killed (KeyboardInterrupt) while it logs `update` for the first time, so before that update's
    checkpoint; a rerun goes through. Returns the updates logged, in order, across the runs."""
    real = trainer.Trainer._log
    real = getattr(real, "unkilled", real)
    logged = []

    def killed(self, *args):
        real(self, *args)
        first = self.step not in logged
        logged.append(self.step)
        if self.step == update and first:
            raise KeyboardInterrupt("killed")

    killed.unkilled = real
    monkeypatch.setattr(trainer.Trainer, "_log", killed)
    return logged


def test_a_killed_run_resumes_to_the_same_parameters(tmp_path, sharded_corpus, targets, monkeypatch):
    from safetensors.torch import load_file

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm+mlm", "student": "s", "atoms": 24, "max_steps": 4}
    straight = train(shards, targets, manifest, str(tmp_path / "a"), str(tmp_path / "a.json"), params)

    calls = kill_at_update(monkeypatch, 2)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params, state,
              checkpoint_seconds=0, log_every=1)
    assert not (tmp_path / "b").exists()
    resumed = train(shards, targets, manifest, str(tmp_path / "b"), str(tmp_path / "b.json"), params, state,
                    checkpoint_seconds=0, log_every=1)
    assert calls == [1, 2, 2, 3, 4]  # resumed from the checkpoint after update 1
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert learning_curve(resumed)[-1] == learning_curve(straight)[-1]
    assert resumed["tokens_seen"] == straight["tokens_seen"]


def test_checkpoints_csv_and_validation_losses(tmp_path, corpus_text, tokenizer, encoder_teacher):
    from transformers import AutoModelForMaskedLM

    from pipeline.corpus import shard

    from conftest import MINILM

    shards = [str(tmp_path / "shard-000.parquet")]
    manifest, validation = str(tmp_path / "manifest.json"), str(tmp_path / "validation.parquet")
    shard([corpus_text], shards, manifest, {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0,
                                            "validation_fraction": 0.2}, validation)
    (tmp_path / "targets").mkdir()
    save_dictionary(tmp_path, random_dictionary(32, 24))
    coding = {"source": str(encoder_teacher), "layer": -1, "batch_size": 16, "lambda": 0.05, "top_k": 4,
              "solver": "fast", "max_iterations": 200, "tolerance": 1e-2, "device": "cpu", "trust_remote_code": False}
    targets = [str(tmp_path / "targets" / "shard-000.parquet"), str(tmp_path / "targets" / "validation.parquet")]
    for corpus_part, out in zip([*shards, validation], targets):
        code_targets(corpus_part, manifest, tmp_path, out, coding)
    record = summarize(targets[:1], str(tmp_path / "targets" / "manifest.json"), coding, validation=targets[1])
    assert record["validation"]["tokens"] > 0 and record["tokens"] > 2 * record["validation"]["tokens"]

    params = {**BASE, "objective": "mlsm+mlm", "student": "s", "atoms": 24, "max_steps": 4,
              "checkpoint_fractions": [0.25, 0.5, 1.0], "head_bias_init": "zero"}  # from zero: it learns in 4 updates
    summary = train(shards, targets[:1], manifest, str(tmp_path / "model"), str(tmp_path / "summary.json"), params,
                    str(tmp_path / "state"), checkpoints=str(tmp_path / "checkpoints"),
                    metrics_csv=str(tmp_path / "log.csv"), validation=validation, validation_targets=targets[1],
                    token_counts=str(tmp_path / "token_counts.npy"))
    assert summary["checkpoints"] == ["step1", "step2"]
    for step in (1, 2):
        directory = tmp_path / "checkpoints" / f"step{step}"
        _, info = AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"] and (directory / "mlsm_head.safetensors").exists()
        assert json.loads((directory / "pretraining.json").read_text())["steps"] == step
    assert set(read_record(tmp_path / "summary.json")["files"]) >= {"checkpoints/step1/model.safetensors",
                                                                   "model/model.safetensors"}
    saved = {e["step"]: e for e in summary["history"]}
    assert set(saved) == {1, 2, 4}  # the checkpoints and the last update (LOG_EVERY is 10)
    for entry in saved.values():
        assert np.isfinite(entry["validation_mlm"]) and np.isfinite(entry["validation_mlsm"])
    assert saved[4]["validation_mlm"] < saved[1]["validation_mlm"]  # lr 1e-3 learns even in 4 updates
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,mlsm,mlm,grad_norm,lr") and len(rows) == 4
    # The diagnostics: at initialisation and at each save, on the masked tokens the validation losses use.
    diagnostics = {d["step"]: d for d in summary["diagnostics"]}
    assert set(diagnostics) == {0, 1, 2, 4}
    for step, measured in diagnostics.items():
        assert all(-0.05 < measured[f"{k}_cosine"] <= 1 for k in ("masked", "real", "embedding")), measured
        assert measured["mlm_gain"] == pytest.approx(measured["unigram_loss"] - measured["validation_mlm"], abs=1e-5)
        assert measured["mlsm_gain"] == pytest.approx(measured["mean_target_loss"] - measured["validation_mlsm"],
                                                      abs=1e-5)
        assert measured["mean_target_loss"] < measured["uniform_loss"] and measured["mlm_gain_se"] > 0
        if step:
            assert measured["validation_mlm"] == saved[step]["validation_mlm"]
    assert diagnostics[0]["uniform_loss"] == diagnostics[4]["uniform_loss"]  # the same masked positions
    assert diagnostics[0]["validation_mlm"] > 9  # ~log(30522) at initialisation from zero biases
    assert 4 < summary["baselines"]["unigram_entropy"] < 9 and 0 < summary["baselines"]["unigram_missing_mass"] < 0.5
    assert not (tmp_path / "state" / "models").exists()  # moved into the outputs, the state cleared


def test_tensorboard_events_are_written_when_it_is_installed(tmp_path, sharded_corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlm", "student": "s", "max_steps": 2}
    train(shards, None, manifest, str(tmp_path / "m"), str(tmp_path / "s.json"), params,
          tensorboard=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"pretrain/mlm", "pretrain/grad_norm", "pretrain/lr"} <= set(events.Tags()["scalars"])


def test_a_compiled_encoder_saves_under_the_same_names(tokenizer):
    params = {**BASE, "objective": "mlsm+mlm"}
    plain = Student(build_config(params, tokenizer, 64), "mlsm+mlm", 24)
    compiled = Student(build_config(params, tokenizer, 64), "mlsm+mlm", 24)
    compiled.compile_encoder()  # compiles lazily, at the first call: nothing runs here
    assert compiled.state_dict().keys() == plain.state_dict().keys()


def test_sigterm_saves_the_state_and_stops(tmp_path, sharded_corpus, targets):
    """What SLURM sends at preemption or time limit: the update in progress ends, the state is saved."""
    import signal
    import subprocess
    import time

    from conftest import venv_env

    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "s", "atoms": 24, "max_steps": 100_000}
    state = tmp_path / "state"
    command = [sys.executable, "-m", "pipeline.pretrain", "--corpus-shards", *shards, "--target-shards", *targets,
               "--target-manifest", str(Path(targets[0]).parent / "manifest.json"), "--corpus-manifest", manifest,
               "--model", str(tmp_path / "model"), "--summary", str(tmp_path / "s.json"),
               "--metrics-csv", str(tmp_path / "log.csv"), "--resume-dir", str(state), "--checkpoint-seconds", "3600",
               "--params", json.dumps(params)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=venv_env(OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (tmp_path / "log.csv").exists() and time.monotonic() < deadline:  # 10 updates are done
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr[-3000:]
    assert "stopped by SIGTERM after update" in stderr and "a retry or a rerun" in stderr
    assert not (state / ".failed.json").exists()  # transient (issue #33): Snakemake's retry is not refused
    journal = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    assert journal[-1]["event"] == "checkpoint" and journal[-1]["unit"] >= 10
    assert (state / "state.safetensors").exists() and not (tmp_path / "model").exists()


def test_a_non_finite_loss_stops_the_run_with_the_state_saved(tmp_path, sharded_corpus, targets, monkeypatch):
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm", "student": "s", "atoms": 24, "max_steps": 4}
    original, calls = trainer.loss_parts, []

    def nan_on_the_second_update(out, batch, params, teacher):
        parts = original(out, batch, params, teacher)
        calls.append(1)
        if len(calls) > 2:  # two micro-batches per update
            parts["mlsm"] = parts["mlsm"] * float("nan")
        return parts

    monkeypatch.setattr(trainer, "loss_parts", nan_on_the_second_update)
    with pytest.raises(StageError, match=r"non-finite at update 2 \(mlsm=nan"):
        train(shards, targets, manifest, str(tmp_path / "m"), str(tmp_path / "s.json"), params, str(tmp_path / "state"))
    journal = [json.loads(line) for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()]
    assert journal[-1] == {**journal[-1], "event": "checkpoint", "unit": 1}
    assert not (tmp_path / "m").exists()


def test_diagnostic_statistics_match_direct_computations():
    from pipeline.pretrain.diagnostics import Clusters, mean_pairwise_cosine, unigram

    unit = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) + 1, dim=1)
    pairs = (unit @ unit.T).sum() - 50
    assert mean_pairwise_cosine(unit.sum(0), 50) == pytest.approx(float(pairs) / (50 * 49))
    # Ids 0 and 1 are special; id 6 never occurs: it gets the Good-Turing mass n1/N = 2/20.
    log_probs, entropy, missing = unigram(np.array([7, 9, 5, 3, 1, 1, 0, 10]), [0, 1])
    probabilities = np.exp(log_probs)
    assert missing == pytest.approx(0.1) and probabilities[6] == pytest.approx(0.1)
    assert probabilities[[0, 1]].tolist() == [0, 0] and probabilities.sum() == pytest.approx(1)
    assert probabilities[2] == pytest.approx(5 / 20 * 0.9)
    frequencies = np.array([5, 3, 1, 1, 10]) / 20
    assert entropy == pytest.approx(-(frequencies * np.log(frequencies)).sum())
    # Two held-out sequences: gains 1 and 0 in the first, 2 in the second; the standard error has the
    # sequences as clusters: sqrt(2/1 * ((1 - 2)^2 + (2 - 1)^2)) / 3.
    clusters = Clusters()
    clusters.add(torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 5.0]), 2)
    summary = clusters.summary()
    assert (summary["student"], summary["baseline"], summary["gain"]) == pytest.approx((2, 3, 1))
    assert summary["gain_se"] == pytest.approx(2 / 3) and summary["sequences"] == 2


# What the workflow gives a control student's job (pipeline/wiring/workflow.py: its architecture and masking only).
CONTROL = {"objective": "none", "student": "none", "size": "tiny", "dropout": 0.1, "seed": 0, "max_steps": 0,
           "checkpoint_fractions": [], "mask_fraction": 0.15, "mask_strategy": "all_mask", "device": "cpu"}


def test_the_control_saves_the_students_initial_weights_and_their_diagnostics(tmp_path, corpus_text, tokenizer):
    """Objective none: no update; the saved model is the initialisation every student of that size and seed
    starts from, whatever was drawn before, and its diagnostics are the students' at initialisation."""
    from transformers import AutoModel

    from pipeline.config import option_defaults
    from pipeline.corpus import shard
    from pipeline.pretrain.setup import build_model

    from conftest import MINILM

    shards = [str(tmp_path / "shard-000.parquet")]
    manifest, validation = str(tmp_path / "manifest.json"), str(tmp_path / "validation.parquet")
    shard([corpus_text], shards, manifest, {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0,
                                            "validation_fraction": 0.2}, validation)
    held_out = {"validation": validation, "token_counts": str(tmp_path / "token_counts.npy")}
    control = train(shards, None, manifest, str(tmp_path / "none"), str(tmp_path / "none.json"), CONTROL, **held_out)
    assert control["steps"] == 0 and control["history"] == [] and control["checkpoints"] == []
    assert [d["step"] for d in control["diagnostics"]] == [0]
    mlm = train(shards, None, manifest, str(tmp_path / "mlm"), str(tmp_path / "mlm.json"),
                {**BASE, "objective": "mlm", "student": "mlm", "max_steps": 1}, **held_out)
    cosines = ("masked_cosine", "real_cosine", "embedding_cosine")
    assert [mlm["diagnostics"][0][k] for k in cosines] == [control["diagnostics"][0][k] for k in cosines]
    saved = AutoModel.from_pretrained(tmp_path / "none").state_dict()
    for objective in ("mlm", "mlsm"):
        torch.rand(7)  # whatever was drawn before
        options = {**option_defaults("pretrain_options"), **BASE, "objective": objective, "atoms": 24}
        model, _ = build_model(options, tokenizer,
                               json.loads(Path(manifest).read_text()), torch.device("cpu"), 1)
        for key, value in model.encoder.state_dict().items():
            assert torch.equal(saved[key], value), (objective, key)


def test_a_saved_mlsm_head_is_the_same_bytes_every_time(tmp_path, tokenizer):
    """A resumed run must write what an uninterrupted one writes: safetensors orders several metadata keys by
    a per-map random hash, so the head's file keeps one (the kill matrix found the header bytes differing)."""
    torch.manual_seed(0)
    model = Student(build_config({**BASE, "size": "tiny"}, tokenizer, 64), "mlsm", 24)
    saved = set()
    for attempt in range(8):
        model.save(tmp_path / str(attempt), tokenizer, {})
        saved.add((tmp_path / str(attempt) / "mlsm_head.safetensors").read_bytes())
    assert len(saved) == 1
    fresh = Student(build_config({**BASE, "size": "tiny"}, tokenizer, 64), "mlsm", 24)
    assert fresh.load_mlsm_head(tmp_path / "0") and torch.equal(fresh.mlsm_head.decoder.weight,
                                                                 model.mlsm_head.decoder.weight)


def test_fresh_heads_start_at_their_priors_unless_zero_is_asked(tmp_path, corpus_text, tokenizer):
    """head_bias_init prior: at initialisation an MLM student predicts the training tokens' frequencies (its
    validation loss is the unigram baseline's), where transformers' zero bias predicts ~uniformly over 30k."""
    from pipeline.corpus import shard

    from conftest import MINILM

    shards = [str(tmp_path / "shard-000.parquet")]
    manifest, validation = str(tmp_path / "manifest.json"), str(tmp_path / "validation.parquet")
    shard([corpus_text], shards, manifest, {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0,
                                            "validation_fraction": 0.2}, validation)
    held_out = {"validation": validation, "token_counts": str(tmp_path / "token_counts.npy")}
    gains = {}
    for start in ("prior", "zero"):
        summary = train(shards, None, manifest, str(tmp_path / start), str(tmp_path / f"{start}.json"),
                        {**BASE, "objective": "mlm", "student": start, "max_steps": 1, "head_bias_init": start},
                        **held_out)
        gains[start] = summary["diagnostics"][0]["mlm_gain"]
        assert summary["heads_at_prior"] == (["mlm"] if start == "prior" else [])
    assert abs(gains["prior"]) < 0.3 and gains["zero"] < -2, gains


@pytest.mark.parametrize("head", ["separate", "tied"])
def test_start_heads_at_priors_sets_each_heads_output_bias(tokenizer, head):
    torch.manual_seed(0)
    model = Student(build_config({**BASE, "size": "tiny"}, tokenizer, 64), "mlsm+mlm", 24, head)
    tokens = torch.log(torch.rand(len(tokenizer)))
    tokens[tokenizer.all_special_ids] = -float("inf")
    atoms = torch.log_softmax(torch.randn(24), 0)
    assert model.start_heads_at_priors(tokens, atoms) == ["mlm", "mlsm"]
    bias = model.backbone.cls.predictions.bias
    ordinary = torch.isfinite(tokens)
    assert torch.equal(bias[ordinary], tokens[ordinary])
    assert torch.all(bias[~ordinary] == tokens[ordinary].min())  # special tokens: never a label
    assert model.backbone.cls.predictions.decoder.bias is bias or torch.equal(
        model.backbone.cls.predictions.decoder.bias, bias)
    assert torch.equal(model.mlsm_head.decoder.bias, atoms)
    hidden = torch.zeros(3, model.encoder.config.hidden_size)
    if head == "separate":  # a zero state predicts the prior exactly (the tied head's LayerNorm adds its bias)
        assert torch.allclose(torch.log_softmax(model.heads(hidden)["mlsm_logits"], -1), atoms.expand(3, -1),
                              atol=1e-5)
    assert Student(build_config({**BASE, "size": "tiny"}, tokenizer, 64), "mlsm", 24).start_heads_at_priors(
        None, atoms) == ["mlsm"]  # no MLM head to set


def test_every_tensor_collective_goes_through_the_device_aware_helpers():
    """Issue #32: under NCCL every collective's tensor must be on the rank's GPU; CPU tensors were all-reduced,
    which gloo accepts (so the CPU tests passed) and NCCL does not. Only pipeline/pretrain/distributed.py calls
    a tensor collective, and it moves the tensor to the process group's device (tests/test_gpu.py runs it)."""
    import ast

    from conftest import REPO

    tensor_collectives = {"all_reduce", "broadcast", "all_gather", "reduce", "reduce_scatter", "all_to_all"}
    found = []
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in tensor_collectives and getattr(node.func.value, "id", "") == "dist":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found and all(f.startswith("pipeline/pretrain/distributed.py:") for f in found), found


@pytest.mark.parametrize("objective,more", [("mlsm+mlm", {"mlsm_head": "tied"}),
                                            ("kd", {"kd_teacher_input": "original"})])
def test_an_update_waits_for_the_device_once(tmp_path, sharded_corpus, targets, mlm_teacher, monkeypatch, objective,
                                             more):
    """A GPU run waited for the device on every micro-batch (boolean-mask indexing of the states and the input)
    and twice an update (the losses, the gradient norm); now once an update, to read the values that decide
    whether it is applied."""
    from host_syncs import HostSyncs

    seen, real = [], trainer.Trainer._update

    def counted(self, prefetch, accumulation):
        with HostSyncs() as syncs:
            result = real(self, prefetch, accumulation)
        seen.append(dict(syncs.counts))
        return result

    monkeypatch.setattr(trainer.Trainer, "_update", counted)
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": objective, "student": objective, "atoms": 24, "teacher_source": str(mlm_teacher),
              "grad_accumulation": 3, **more}
    train(shards, targets if "mlsm" in objective else None, manifest, str(tmp_path / "model"),
          str(tmp_path / "summary.json"), params)
    assert seen == [{"tolist": 1}] * BASE["max_steps"]
