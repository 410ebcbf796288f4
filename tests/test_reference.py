"""The reference implementation's behaviour (github szegedai/MLSM), each behind an option, on small inputs:
the KD teacher's input, the tied MLSM head, zero-code positions in the loss, SPAMS's iteration count, the
optimizer and schedules, the shared classifier initialisation, the sequence-length schedule, students from
a model config or a checkpoint, and the tokenizer's normalizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import phase_plan
from pipeline.pretrain.data import Shard, make_batch
from pipeline.pretrain.losses import loss_parts, mlsm_loss
from pipeline.pretrain.model import Student, build_config, reference_layout
from pipeline.pretrain.teachers import KdTeacher
from pipeline.stages import call
from pipeline.training import adamw, warmup_then_decay

from conftest import MINILM
from test_dictionary_and_targets import code_targets, random_dictionary, save_dictionary, summarize
from test_pretrain import kill_at_update

BASE = {"size": "tiny", "max_steps": 4, "batch_size": 4, "grad_accumulation": 1, "learning_rate": 1e-3,
        "weight_decay": 0.01, "warmup_fraction": 0.25, "max_grad_norm": 1.0, "mask_fraction": 0.15,
        "mask_strategy": "all_mask", "mlm_weight": 0.5, "kd_temperature": 1.0, "targets": "precomputed",
        "dropout": 0.0, "compile": False, "checkpoint_fractions": [], "seed": 0, "device": "cpu",
        "teacher_trust_remote_code": False, "atoms": 24}


def pretrain(out: Path, shards, manifest, params: dict, targets=None, **more) -> dict:
    record = {"target_manifest": str(Path(targets[0]).parent / "manifest.json")} if targets else {}
    return call("pretrain", {**BASE, "student": out.name, **params}, corpus_shards=shards, corpus_manifest=manifest,
                model=out / "model", summary=out / "summary.json", target_shards=targets or [], log_every=1,
                **record, **more)


def batch_of(shard: Shard, tokenizer, rows=8, seed=(0, 0)) -> dict:
    return make_batch([(shard, np.arange(rows))], tokenizer, {"mask_fraction": 0.3, "mask_strategy": "all_mask"},
                      seed)


# ---- knowledge distillation: the teacher's input ---------------------------------------------------------

def test_the_kd_teacher_sees_the_original_sentence_as_in_the_reference(sharded_corpus, mlm_teacher, tokenizer):
    """kd_teacher_input original: the teacher's logits at the masked positions are those of its forward on the
    unmasked sentence (the reference runs the teacher before masking); masked: on the student's input."""
    manifest = json.loads(Path(sharded_corpus[1]).read_text())
    teacher = KdTeacher(str(mlm_teacher), torch.device("cpu"), manifest)
    shard = Shard(sharded_corpus[0][0])
    batch = batch_of(shard, tokenizer)
    unmasked = batch["input_ids"].clone()
    unmasked[batch["masked"]] = batch["labels"]
    with torch.no_grad():
        whole = teacher.model(input_ids=unmasked, token_type_ids=batch["token_type_ids"],
                              attention_mask=batch["attention_mask"]).logits[batch["masked"]]
    original, masked = teacher.logits(batch, original=True), teacher.logits(batch)
    assert torch.allclose(original, whole, atol=1e-5)
    assert not torch.allclose(masked, whole, atol=1e-2)
    assert torch.equal(batch["input_ids"][batch["masked"]],
                       torch.full_like(batch["labels"], tokenizer.mask_token_id))  # the student's input is masked
    params = {**BASE, "objective": "kd", "kd_teacher_input": "original"}
    student_logits = torch.randn(len(batch["labels"]), len(tokenizer))
    reference = F.kl_div(F.log_softmax(student_logits, 1), F.softmax(whole, 1), reduction="batchmean")
    kd = loss_parts({"mlm_logits": student_logits}, batch, params, teacher)["kd"]
    assert torch.isclose(kd, reference, atol=1e-5)  # the reference's KLDivLoss(batchmean) of softmax at T = 1


# ---- MLSM: zero-code positions in the loss ----------------------------------------------------------------

def test_zero_code_positions_count_in_the_denominator_as_the_reference_batchmean():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=generator)
    dense = torch.rand(5, 6, generator=generator)
    dense[[1, 3]] = 0  # two masked positions whose code is all zero
    dense = dense / dense.sum(1, keepdim=True).clamp_min(1e-30)
    atoms = torch.arange(6).expand(5, 6)
    batch = {"target_atoms": atoms, "target_weights": dense, "with_target": torch.tensor(3),
             "masked_count": torch.tensor(5)}
    out = {"mlsm_logits": logits}
    counted = loss_parts(out, batch, {"objective": "mlsm", "zero_code_positions": "count"}, None)["mlsm"]
    excluded = loss_parts(out, batch, {"objective": "mlsm", "zero_code_positions": "exclude"}, None)["mlsm"]
    # The reference: KLDivLoss(reduction="batchmean") over every masked position, an all-zero row adding 0.
    reference = F.kl_div(F.log_softmax(logits, 1), dense, reduction="batchmean")
    assert torch.isclose(counted, reference, atol=1e-6)
    assert torch.isclose(excluded, reference * 5 / 3, atol=1e-6)
    assert torch.isclose(excluded, mlsm_loss(logits, atoms, dense), atol=1e-6)


# ---- MLSM: the tied head -------------------------------------------------------------------------------

def test_the_tied_head_is_k_extra_rows_of_the_mlm_decoder(tmp_path, sharded_corpus, tokenizer):
    """A tied head's logits are the reference model's logits past the vocabulary (its K [MASK-i] rows behind
    the MLM head's transform, LayerNorm and bias); its loss trains that transform; saved, it rebuilds the
    reference's model and the encoder loads for fine-tuning as before."""
    from transformers import AutoModelForSequenceClassification

    params = {**BASE, "objective": "mlsm"}
    torch.manual_seed(0)
    tied = Student(build_config(params, tokenizer, 64), "mlsm", 24, "tied")
    separate = Student(build_config(params, tokenizer, 64), "mlsm", 24, "separate")
    assert tied.has_mlm_head and not separate.has_mlm_head
    batch = batch_of(Shard(sharded_corpus[0][0]), tokenizer)
    out = tied(batch)
    assert set(out) == {"mlsm_logits"} and out["mlsm_logits"].shape[1] == 24
    hidden = tied.hidden(batch)
    vocabulary = tied.backbone.config.vocab_size
    with torch.no_grad():  # the reference's model: the decoder and its bias extended by the K rows
        rows = torch.cat([tied.backbone.get_output_embeddings().weight, tied.mlsm_head.decoder.weight])
        bias = torch.cat([tied.backbone.cls.predictions.bias, tied.mlsm_head.decoder.bias])
        reference = tied.backbone.cls.predictions.transform(hidden) @ rows.T + bias
    assert torch.allclose(out["mlsm_logits"], reference[:, vocabulary:], atol=1e-5)

    weights = torch.full((len(hidden), 1), 1.0)
    mlsm_loss(out["mlsm_logits"], torch.zeros_like(weights, dtype=torch.long), weights).backward()
    transform = tied.backbone.cls.predictions.transform
    assert transform.dense.weight.grad.abs().sum() > 0 and transform.LayerNorm.weight.grad.abs().sum() > 0

    tied.save(tmp_path, tokenizer, {})
    rebuilt = reference_layout(tmp_path)
    assert rebuilt.config.vocab_size == vocabulary + 24
    with torch.no_grad():
        logits = rebuilt(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"]).logits[batch["masked"]]
    assert torch.allclose(logits[:, vocabulary:], out["mlsm_logits"], atol=1e-4)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert classifier.config.vocab_size == vocabulary  # the encoder as before, without the K rows
    assert torch.equal(classifier.bert.embeddings.word_embeddings.weight,
                       tied.backbone.bert.embeddings.word_embeddings.weight)


def test_the_tied_heads_rows_start_as_the_references_added_rows(tokenizer):
    """The reference adds the K [MASK-i] tokens and resizes the embeddings (pretrainer.py:141-145); transformers
    (4.34, when the reference ran) drew the added rows from N(0, initializer_range) with its _init_weights and
    padded the decoder bias with zeros. The tied head's K rows start so, for any initializer_range."""
    for std in (0.02, 0.05):
        params = {**BASE, "objective": "mlsm"}
        config = build_config(params, tokenizer, 64)
        config.initializer_range = std
        torch.manual_seed(0)
        head = Student(config, "mlsm", 3000, "tied").mlsm_head.decoder
        assert head.weight.shape == (3000, config.hidden_size) and torch.equal(head.bias, torch.zeros(3000))
        assert float(head.weight.std()) == pytest.approx(std, rel=0.02) and abs(float(head.weight.mean())) < std / 50


def test_a_tied_mlsm_mlm_student_trains_and_saves(tmp_path, sharded_corpus, targets_by_length):
    shards, manifest = sharded_corpus
    summary = pretrain(tmp_path / "tied", shards, manifest, {"objective": "mlsm+mlm", "mlsm_head": "tied",
                                                             "max_steps": 2}, targets_by_length[64])
    assert {"mlsm", "mlm"} <= set(summary["final"]) and np.isfinite(summary["final"]["mlsm"])
    assert reference_layout(tmp_path / "tied" / "model").config.vocab_size == 30522 + 24


# ---- dictionary: SPAMS's iteration count ----------------------------------------------------------------

def test_spams_runs_the_configured_iterations_as_the_reference_call():
    """iterations: trainDL's iter as the reference's train_dict.py passes it (iter=1000, batchsize=400 there),
    not epochs x states / batch_size."""
    spams = pytest.importorskip("spams")
    from pipeline.dictionary import learn_spams, spams_iterations
    from pipeline.solvers.lasso import l2_normalise

    x = l2_normalise(torch.randn(600, 16, generator=torch.Generator().manual_seed(0)))
    params = {"atoms": 20, "lambda": 0.05, "batch_size": 50, "epochs": 10, "iterations": 7, "seed": 0}
    assert spams_iterations(params, 600) == 7
    assert spams_iterations({**params, "iterations": None}, 600) == 120
    assert spams_iterations({"batch_size": 400, "epochs": 1, "iterations": 1000}, 10**6) == 1000
    ours = learn_spams(x, params, threads=1)
    data = np.asfortranarray(x.numpy().T.astype(np.float64))
    reference = spams.trainDL(data, K=20, lambda1=0.05, numThreads=1, iter=7, batchsize=50, posAlpha=True,
                              verbose=False)
    reference = torch.from_numpy(reference / np.linalg.norm(reference, axis=0)).float()
    assert torch.allclose(ours, reference, atol=1e-6)
    assert not torch.allclose(learn_spams(x, {**params, "iterations": 8}, threads=1), reference, atol=1e-3)


def test_spams_called_as_the_reference_calls_it():
    """dictionary.spams_call: reference is train_dict.py's call, written out here (lines 102-107): sklearn's
    normalize on float32 states, trainDL with numThreads 8, the dictionary kept as trainDL returns it. The
    pipeline's default calls it on float64 with every core and scales the columns to unit norm after."""
    spams = pytest.importorskip("spams")
    from sklearn.preprocessing import normalize

    from pipeline.dictionary import learn_spams

    states = np.random.default_rng(3).standard_normal((800, 16)).astype(np.float32)
    params = {"atoms": 20, "lambda": 0.05, "batch_size": 400, "epochs": 1, "iterations": 5, "seed": 0}
    reference = spams.trainDL(normalize(states).T, K=20, lambda1=0.05, numThreads=8, iter=5, batchsize=400,
                              posAlpha=True, verbose=False)
    x = torch.from_numpy(normalize(states))
    ours = learn_spams(x, {**params, "spams_call": "reference"})
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(np.asarray(reference)))
    pipeline_call = learn_spams(x, params)
    assert torch.allclose(torch.linalg.vector_norm(pipeline_call, dim=0), torch.ones(20), atol=1e-6)
    assert not torch.equal(pipeline_call, ours)


# ---- optimizer and schedules ------------------------------------------------------------------------------

def test_weight_decay_on_every_parameter_as_the_reference():
    """decay_biases_and_norms: the reference's optimizer, torch.optim.AdamW(model.parameters(), lr=args.lr)
    (pretrainer.py:344: torch's default decay 0.01 on every parameter), built here as the reference builds it:
    three updates on the same gradients give the same weights; exempting biases and norms does not."""
    def model_and_steps(make_optimizer):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        optimizer = make_optimizer(model)
        for step in range(3):
            model.zero_grad()
            model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    reference = model_and_steps(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    everything = model_and_steps(lambda m: adamw(m, 1e-3, 0.01, exempt_biases_and_norms=False))
    exempt = model_and_steps(lambda m: adamw(m, 1e-3, 0.01, exempt_biases_and_norms=True))
    assert all(torch.equal(a, b) for a, b in zip(reference, everything, strict=True))
    assert not torch.equal(reference[1], exempt[1])  # the bias, decayed by the reference only


def test_the_hf_linear_schedule_is_transformers_get_scheduler():
    from transformers import get_scheduler

    for fraction in (0.0, 0.01, 0.25):
        ours = warmup_then_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 200, fraction,
                                 "hf_linear")
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        theirs = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=int(200 * fraction) // 1,
                               num_training_steps=200)
        for _ in range(200):
            assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), abs=1e-12)
            for scheduler in (ours, theirs):
                scheduler.optimizer.step()
                scheduler.step()
    linear = warmup_then_decay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 200, 0.01)
    assert linear.get_last_lr() == [0.5]  # the pipeline's own: the first update at 1/warmup of the peak


# ---- fine-tuning: one classifier initialisation per seed -------------------------------------------------

@pytest.fixture(scope="module")
def students(tmp_path_factory, tokenizer):
    """Three different models of the same width: an MLSM student with 2 layers, a 3-layer BERT checkpoint that
    has a pooler (as a hub model would), an MLM student with 3 layers."""
    from transformers import BertModel

    out = tmp_path_factory.mktemp("students")
    torch.manual_seed(1)
    Student(build_config({**BASE, "objective": "mlsm"}, tokenizer, 64), "mlsm", 24).save(out / "a", tokenizer, {})
    config = build_config({**BASE, "objective": "mlm"}, tokenizer, 64)
    config.num_hidden_layers = 3
    BertModel(config).save_pretrained(out / "b")
    tokenizer.save_pretrained(out / "b")
    Student(config, "mlm", None).save(out / "c", tokenizer, {})
    return out / "a", out / "b", out / "c"


def test_every_student_gets_the_same_classifier_head_for_a_seed(tmp_path, students, monkeypatch):
    from pipeline import finetune

    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"word {i} here\t{i % 3}\n" for i in range(12)))
    (tmp_path / "dev.tsv").write_text("text\tlabel\nword 1 here\t1\nword 2 here\t2\n")
    heads, real = {}, finetune.shared_head

    def recorded(model, seed, missing):
        real(model, seed, missing)
        heads[len(heads)] = model.classifier.weight.detach().clone(), model.bert.pooler.dense.weight.detach().clone()

    monkeypatch.setattr(finetune, "shared_head", recorded)
    params = {"task": {"format": "tsv", "path": str(tmp_path), "text_columns": ["text"], "label_column": "label",
                       "metric": "accuracy"}, "epochs": 1, "batch_size": 4, "learning_rate": 1e-4,
              "weight_decay": 0.01, "warmup_fraction": 0.0, "max_seq_len": 32, "max_train_examples": 0,
              "device": "cpu", "classifier_init": "per_seed", "lr_schedule": "hf_linear", "max_grad_norm": 0}
    for seed in (3, 4):
        for model in students:
            call("finetune", {**params, "seed": seed}, train=tmp_path / "train.tsv", dev=tmp_path / "dev.tsv",
                 model=model, scores=tmp_path / f"{seed}-{model.name}.json")
    (a3, b3, c3, a4, b4, c4) = (heads[i] for i in range(6))
    assert torch.equal(a3[0], b3[0]) and torch.equal(a3[0], c3[0]) and torch.equal(a4[0], b4[0])
    assert not torch.equal(a3[0], a4[0])
    assert torch.equal(a3[1], c3[1]) and not torch.equal(a3[1], b3[1])  # b keeps its own pooler
    assert a3[0].shape == (3, 128) and float(a3[0].std()) == pytest.approx(0.02, rel=0.2)


def test_transformers_own_initialisation_depends_on_the_checkpoint(students):
    """What classifier_init: model gives: the head depends on what the checkpoint holds (here, a pooler)."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.common import seed_everything

    heads = []
    for model in students[:2]:
        seed_everything(3)
        heads.append(AutoModelForSequenceClassification.from_pretrained(model, num_labels=3).classifier.weight)
    assert not torch.equal(heads[0], heads[1])


# ---- the sequence-length schedule ---------------------------------------------------------------------------

def test_phase_plan():
    schedule = [{"fraction": 0.9, "max_seq_len": 128}, {"fraction": 0.1, "max_seq_len": 512}]
    assert phase_plan({"max_steps": 300000, "seq_len_schedule": schedule}, 128) == [(0, 270000, 128),
                                                                                     (270000, 300000, 512)]
    assert phase_plan({"max_steps": 5, "seq_len_schedule": []}, 64) == [(0, 5, 64)]
    assert phase_plan({"max_steps": 4, "seq_len_schedule": [{"fraction": 0.01, "max_seq_len": 32},
                                                            {"fraction": 0.99, "max_seq_len": 64}]}, 64) == [(0, 4, 64)]


def test_the_control_of_a_scheduled_preset_has_the_students_architecture(tmp_path, sharded_corpus, corpus_at_32):
    """Issue #34: the paper preset's control (no update, so no phase) failed with 'max() arg is an empty
    sequence'; it now has the position embeddings of the schedule's longest phase, as the trained students."""
    from transformers import AutoConfig

    shards, manifest = sharded_corpus
    schedule = [{"fraction": 0.5, "max_seq_len": 32}, {"fraction": 0.5, "max_seq_len": 64}]
    phase = {"phase_shards": corpus_at_32[0], "phase_manifests": [corpus_at_32[1]]}
    control = pretrain(tmp_path / "control", shards, manifest, {"objective": "none", "max_steps": 0,
                                                               "seq_len_schedule": schedule}, **phase)
    student = pretrain(tmp_path / "mlm", shards, manifest, {"objective": "mlm", "max_steps": 2,
                                                           "seq_len_schedule": schedule}, **phase)
    assert control["steps"] == 0 and student["steps"] == 2
    widths = {AutoConfig.from_pretrained(tmp_path / name / "model").max_position_embeddings for name in ("control",
                                                                                                        "mlm")}
    assert len(widths) == 1


@pytest.fixture(scope="module")
def corpus_at_32(tmp_path_factory, corpus_text):
    """The sharded_corpus's text packed at length 32 (what shard_corpus_phase writes)."""
    from pipeline.corpus import shard

    out = tmp_path_factory.mktemp("len32")
    shards = [str(out / "shard-000.parquet"), str(out / "shard-001.parquet")]
    shard([corpus_text], shards, str(out / "manifest.json"), {"tokenizer": MINILM, "max_seq_len": 32, "seed": 0})
    return shards, str(out / "manifest.json")


@pytest.fixture(scope="module")
def targets_by_length(tmp_path_factory, sharded_corpus, corpus_at_32, encoder_teacher):
    """Target shards of the corpus at its own length (64) and at 32, over one dictionary."""
    made = {}
    for length, (shards, manifest) in ((64, sharded_corpus), (32, corpus_at_32)):
        out = tmp_path_factory.mktemp(f"targets{length}")
        save_dictionary(out, random_dictionary(32, 24))
        params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 16, "lambda": 0.05, "top_k": "none",
                  "solver": "fista", "max_iterations": 50, "tolerance": 0.0, "device": "cpu",
                  "trust_remote_code": False}
        made[length] = [str(out / f"shard-{i:03d}.parquet") for i in range(len(shards))]
        for shard, path in zip(shards, made[length]):
            code_targets(shard, manifest, out, path, params)
        summarize(made[length], str(out / "manifest.json"), params)
    return made


def test_the_sequence_length_switches_at_the_phase_boundary_and_resumes_exactly(
        tmp_path, sharded_corpus, corpus_at_32, targets_by_length, monkeypatch):
    """Updates 1-2 train on the corpus packed at 32 tokens, 3-4 on the one at 64 (with its own targets); a run
    killed at the boundary or inside the second phase resumes to bit-identical weights."""
    from safetensors.torch import load_file

    from pipeline.pretrain import data

    shards, manifest = sharded_corpus
    schedule = {"objective": "mlsm+mlm", "seq_len_schedule": [{"fraction": 0.5, "max_seq_len": 32},
                                                               {"fraction": 0.5, "max_seq_len": 64}]}
    phase = {"phase_shards": corpus_at_32[0], "phase_manifests": [corpus_at_32[1]],
             "phase_target_shards": targets_by_length[32],
             "phase_target_manifests": [str(Path(targets_by_length[32][0]).parent / "manifest.json")]}
    widths, real_batch = [], data.make_batch
    monkeypatch.setattr(data, "make_batch", lambda *a, **k: widths.append(real_batch(*a, **k)) or widths[-1])
    straight = pretrain(tmp_path / "straight", shards, manifest, schedule, targets_by_length[64], **phase)
    lengths = [int(b["lengths"].max()) for b in widths[:4]]
    assert max(lengths[:2]) <= 32 < max(lengths[2:])
    assert all(b["target_atoms"].shape[0] == b["masked_count"] for b in widths[:4])

    for kill_after in (2, 3):
        calls = kill_at_update(monkeypatch, kill_after)
        out, state = tmp_path / f"killed{kill_after}", str(tmp_path / f"state{kill_after}")
        with pytest.raises(KeyboardInterrupt):
            pretrain(out, shards, manifest, schedule, targets_by_length[64], resume_dir=state, checkpoint_seconds=0,
                     **phase)
        resumed = pretrain(out, shards, manifest, schedule, targets_by_length[64], resume_dir=state,
                           checkpoint_seconds=0, **phase)
        a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "straight", out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kill_after
        assert resumed["history"][-1]["mlsm"] == straight["history"][-1]["mlsm"]
        assert calls[kill_after] == kill_after  # resumed from the checkpoint before the kill


def test_a_schedule_without_its_phase_corpus_is_refused(tmp_path, sharded_corpus):
    from pipeline.common import StageError

    shards, manifest = sharded_corpus
    schedule = [{"fraction": 0.5, "max_seq_len": 32}, {"fraction": 0.5, "max_seq_len": 64}]
    with pytest.raises(StageError, match=r"seq_len_schedule lengths \[32\] need the corpus shards"):
        pretrain(tmp_path / "s", shards, manifest, {"objective": "mlm", "seq_len_schedule": schedule})


# ---- students from any BERT config, and from a checkpoint ---------------------------------------------------

def test_a_student_takes_the_shape_of_a_model_sources_config_with_fresh_weights(encoder_teacher, tokenizer):
    from transformers import BertModel

    config = build_config({**BASE, "architecture": str(encoder_teacher)}, tokenizer, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 3, len(tokenizer))
    student = Student(config, "mlm", None)
    teacher = BertModel.from_pretrained(encoder_teacher)
    assert not torch.equal(student.encoder.encoder.layer[0].attention.self.query.weight,
                           teacher.encoder.layer[0].attention.self.query.weight)


def test_a_student_initialised_from_a_checkpoint_starts_at_its_loss(tmp_path, sharded_corpus, targets_by_length,
                                                                     tokenizer):
    """init: the first update's losses (measured before it) are the checkpoint's own losses on that batch, its
    MLM and its tied MLSM head both continued; a fresh student starts far higher."""
    shards, manifest = sharded_corpus
    first = {"objective": "mlsm+mlm", "mlsm_head": "tied", "max_steps": 6, "learning_rate": 3e-3}
    pretrain(tmp_path / "first", shards, manifest, first, targets_by_length[64])
    checkpoint = str(tmp_path / "first" / "model")
    again = pretrain(tmp_path / "again", shards, manifest, {**first, "init": checkpoint, "seed": 5},
                     targets_by_length[64])
    fresh = pretrain(tmp_path / "fresh", shards, manifest, {**first, "seed": 5}, targets_by_length[64])

    # The checkpoint's losses on the first micro-batch of the seed-5 run, computed outside the trainer.
    from pipeline.pretrain.setup import build

    setup = build(0, 1, torch.device("cpu"), _paths(shards, manifest, targets_by_length[64], tmp_path / "x"),
                  {**BASE, **first, "init": checkpoint, "seed": 5, "student": "x"})
    batch = setup.stream.micro_batch(0, BASE["batch_size"], tokenizer, setup.params)
    setup.model.eval()
    with torch.no_grad():
        expected = loss_parts(setup.model(batch), batch, setup.params, None)
    step1 = again["history"][0]
    assert step1["mlm"] == pytest.approx(float(expected["mlm"]), rel=1e-4)
    assert step1["mlsm"] == pytest.approx(float(expected["mlsm"]), rel=1e-4)
    assert fresh["history"][0]["mlm"] > step1["mlm"] + 0.2


def _paths(shards, manifest, targets, out: Path):
    from pipeline.stages import paths

    return paths("pretrain", corpus_shards=shards, corpus_manifest=manifest, model=out / "model",
                 summary=out / "summary.json", target_shards=targets,
                 target_manifest=str(Path(targets[0]).parent / "manifest.json"))


def test_init_from_a_checkpoint_on_another_vocabulary_is_refused(tmp_path, sharded_corpus):
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    from pipeline.common import StageError

    other = tmp_path / "other"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(other)
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(60)} | {"[PAD]": 60, "[UNK]": 61, "[CLS]": 62, "[SEP]": 63}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]", pad_token="[PAD]").save_pretrained(other)
    shards, manifest = sharded_corpus
    with pytest.raises(StageError, match="different vocabulary"):
        pretrain(tmp_path / "s", shards, manifest, {"objective": "mlm", "init": str(other)})


# ---- the tokenizer's normalizer ---------------------------------------------------------------------------

def test_the_reference_normalizer_keeps_case_and_accents_and_joins_quotes(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.tokenizer import train

    sentences = ["``Café Über'' she said, ``naïve''.", "The Quick brown fox."] * 50
    train(sentences, tmp_path / "ref", {"model": "unigram", "vocab_size": 120, "lowercase": False,
                                        "normalizer": "reference"})
    train(sentences, tmp_path / "bert", {"model": "unigram", "vocab_size": 120, "lowercase": True})
    reference, bert = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("ref", "bert"))
    assert reference.backend_tokenizer.normalizer.normalize_str("``Café''") == '"Café"'
    assert bert.backend_tokenizer.normalizer.normalize_str("``Café''") == "``cafe''"


# ---- the reference's sentence pairs ----------------------------------------------------------------------

def test_reference_pairs_are_the_reference_tokenizers_pairs(tokenizer):
    """Lines two by two, with the reference's filters, cut longest-first exactly as its fast tokenizer cuts a
    pair (tokenizer(A, B, truncation=True, max_length=L))."""
    from pipeline.data.packing import pack_reference_pairs

    texts = ["Hi.", "The first line of the document is here.", "And a second, somewhat longer line follows it.",
             "Short", "ok", "A third pair starts with this line", "and ends with this one, which is long enough.",
             "Two words", "three more words", "An odd last line."]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected_pairs = [(1, 2), (5, 6)]  # "Hi." skipped; (Short, ok): B too short; (Two.., three..): 5 words kept
    expected_pairs.append((7, 8))
    for max_len in (64, 16, 13, 9):
        got = [ids for ids, _ in pack_reference_pairs(texts, encoded, max_len, tokenizer.cls_token_id,
                                                      tokenizer.sep_token_id)]
        want = [tokenizer(texts[a], texts[b], truncation=True, max_length=max_len)["input_ids"]
                for a, b in sorted(expected_pairs)]
        assert got == want, max_len


def test_the_shard_stage_packs_reference_pairs_document_by_document(corpus_text, monkeypatch):
    """corpus.packing reference_pairs in the sharding stage: each kept document's lines (also those that
    encode to nothing) paired by pack_reference_pairs, held-out documents in the validation split."""
    from pipeline import corpus
    from pipeline.data import text
    from pipeline.data.packing import pack_reference_pairs

    monkeypatch.setattr(text, "CHUNK_BYTES", 4096)  # many chunks, some documents held out in each
    params = {"tokenizer": MINILM, "max_seq_len": 24, "seed": 0, "validation_fraction": 0.3,
              "packing": "reference_pairs"}
    packer = corpus.ChunkPacker(params)
    chunks = list(corpus.read_chunks([corpus_text], {**corpus.DEFAULTS, **params}, corpus.Skipped()))
    held_out_sequences = 0
    for chunk in chunks:
        flags = text.validation_flags(chunk, 0.3, 0)
        expected = {"train": [], "validation": []}
        for number, (doc, held) in enumerate(zip(chunk.documents, flags)):
            lines = [e.ids for e in packer.encode(doc, add_special_tokens=False)]
            for ids, _ in pack_reference_pairs(doc, lines, 24, packer.cls, packer.sep):
                expected["validation" if held else "train"].append((chunk.first_doc + number, ids))
        for split, table in packer(chunk)["tables"].items():
            got = list(zip(table["doc_id"].to_pylist(), table["input_ids"].to_pylist()))
            assert got == expected[split], (chunk.index, split)
        held_out_sequences += len(expected["validation"])
    assert held_out_sequences > 0


def test_a_compiled_student_trains_across_the_phase_switch_as_the_eager_one(
        tmp_path, sharded_corpus, corpus_at_32, targets_by_length):
    """Issue #32: compile: true (the paper preset) never ran a forward pass, nor across the 128 -> 512 switch.
    Compiled (dynamic shapes), the student trains through a 32 -> 64 token schedule with the eager run's losses
    (to 1e-4: the compiler fuses and reorders float operations)."""
    shards, manifest = sharded_corpus
    schedule = {"objective": "mlsm+mlm", "seq_len_schedule": [{"fraction": 0.5, "max_seq_len": 32},
                                                               {"fraction": 0.5, "max_seq_len": 64}]}
    phase = {"phase_shards": corpus_at_32[0], "phase_manifests": [corpus_at_32[1]],
             "phase_target_shards": targets_by_length[32],
             "phase_target_manifests": [str(Path(targets_by_length[32][0]).parent / "manifest.json")]}
    eager = pretrain(tmp_path / "eager", shards, manifest, schedule, targets_by_length[64], **phase)
    compiled = pretrain(tmp_path / "compiled", shards, manifest, {**schedule, "compile": True},
                        targets_by_length[64], **phase)
    assert [h["step"] for h in compiled["history"]] == [h["step"] for h in eager["history"]]
    for ours, theirs in zip(compiled["history"], eager["history"], strict=True):
        assert ours["mlsm"] == pytest.approx(theirs["mlsm"], rel=1e-4)
        assert ours["mlm"] == pytest.approx(theirs["mlm"], rel=1e-4)


# ---- precision: the reference's fp16 with a loss scaler ---------------------------------------------------

@pytest.fixture
def amp_on_the_cpu(monkeypatch):
    """Autocast and the scaler where they otherwise apply on a GPU only: fp16 on the CPU."""
    from pipeline import training

    monkeypatch.setattr(training, "AMP_DEVICES", ("cuda", "cpu"))


def test_fp16_trains_with_a_loss_scaler_that_skips_overflowing_updates(tmp_path, sharded_corpus, amp_on_the_cpu,
                                                                      monkeypatch):
    """The reference trains with fp16 autocast and a GradScaler (pretrainer.py: --amp, its default; scaler.step
    skips an update whose gradients overflowed). precision: fp16 does the same: its losses follow fp32's, and
    an overflow (a scale far too high) skips updates and lowers the scale instead of stopping the run, which
    bf16 does at a non-finite gradient norm."""
    from safetensors.torch import load_file

    from pipeline import training

    shards, manifest = sharded_corpus
    fp32 = pretrain(tmp_path / "fp32", shards, manifest, {"objective": "mlm", "precision": "fp32"})
    fp16 = pretrain(tmp_path / "fp16", shards, manifest, {"objective": "mlm", "precision": "fp16"})
    for a, b in zip(fp32["history"], fp16["history"], strict=True):
        assert b["mlm"] == pytest.approx(a["mlm"], rel=2e-2)

    real = training.grad_scaler
    monkeypatch.setattr("pipeline.pretrain.trainer.grad_scaler",
                        lambda device, precision: torch.amp.GradScaler("cpu", init_scale=2.0 ** 100,
                                                                       enabled=precision == "fp16"))
    skipped = pretrain(tmp_path / "overflow", shards, manifest, {"objective": "mlm", "precision": "fp16",
                                                                 "max_steps": 2})
    assert [entry["grad_norm"] for entry in skipped["history"]] == [None, None]
    assert [entry["loss_scale"] for entry in skipped["history"]] == [2.0 ** 100, 2.0 ** 99]  # the scale each ran with
    pretrain(tmp_path / "initial", shards, manifest, {"objective": "mlm", "max_steps": 0})
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("overflow", "initial"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)  # no update applied
    assert real is training.grad_scaler and "loss_scale" not in fp32["history"][0]


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path, sharded_corpus, amp_on_the_cpu, monkeypatch):
    """The scaler's scale and growth count are part of the saved state: a killed fp16 run resumes to the same
    weights (a fresh scale would change which updates overflow)."""
    from safetensors.torch import load_file

    from pipeline.pretrain import trainer

    shards, manifest = sharded_corpus
    monkeypatch.setattr(trainer, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        "cpu", init_scale=2.0 ** 20, growth_interval=1, enabled=precision == "fp16"))  # the scale moves every update
    params = {"objective": "mlm", "precision": "fp16"}
    straight = pretrain(tmp_path / "straight", shards, manifest, params)
    kill_at_update(monkeypatch, 2)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "resumed", shards, manifest, params, resume_dir=state, checkpoint_seconds=0)
    resumed = pretrain(tmp_path / "resumed", shards, manifest, params, resume_dir=state, checkpoint_seconds=0)
    assert [e["loss_scale"] for e in resumed["history"]] == [e["loss_scale"] for e in straight["history"]]
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_tokens_are_maskable_as_in_the_reference(sharded_corpus, tokenizer):
    """The reference masks every token but [CLS], [SEP] and padding (pretrainer.py:162-165: the tokenizer's
    special_tokens_mask), so [UNK] is masked and predicted; the pipeline left every special token out. With
    mask_unknown, the reference's rule, written out here: every real token but [CLS] and [SEP] may be chosen."""
    shard = Shard(sharded_corpus[0][0])
    tokens = shard.tokens.copy()
    ordinary = np.flatnonzero(~np.isin(tokens, tokenizer.all_special_ids))
    tokens[ordinary[::7]] = tokenizer.unk_token_id  # every 7th ordinary token unknown
    shard.tokens = tokens
    rows = np.arange(8)
    for mask_unknown in (False, True):
        params = {"mask_fraction": 1.0, "mask_strategy": "all_mask", "mask_unknown": mask_unknown}
        batch = make_batch([(shard, rows)], tokenizer, params, (0, 0))
        originals = torch.full_like(batch["input_ids"], -1)
        for b in rows:
            sequence = tokens[shard.offsets[b]:shard.offsets[b + 1]]
            originals[b, : len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
        unknown = originals == tokenizer.unk_token_id
        assert unknown.any()
        reference = (originals >= 0) & (originals != tokenizer.cls_token_id) & (originals != tokenizer.sep_token_id)
        if mask_unknown:
            assert torch.equal(batch["masked"], reference)
        else:
            assert torch.equal(batch["masked"], reference & ~unknown)


def test_the_teachers_precision_in_extraction_and_targets_as_the_reference(tmp_path, encoder_teacher, amp_on_the_cpu):
    """The reference fits the dictionary on fp32 states (train_dict.py: no autocast) and codes targets under its fp16
    autocast (pretrainer.py:451); the pipeline's teacher ran bf16 autocast in both. activations.teacher_precision
    and targets.teacher_precision reach each stage's teacher; fp32 is the plain forward pass, computed here with
    transformers directly."""
    from transformers import AutoModel

    from pipeline import config as cfg
    from pipeline.models import load_encoder
    from pipeline.wiring import RULES
    from pipeline.wiring.workflow import Workflow

    from test_workflow import tiny_config

    config = tiny_config(tmp_path)
    config["activations"] = {**config.get("activations", {}), "teacher_precision": "fp32"}
    config["targets"] = {**config.get("targets", {}), "teacher_precision": "fp16"}
    workflow = Workflow(cfg.validate(config))
    teacher = next(iter(workflow.teachers))
    job = type("Job", (), {"teacher": teacher, "dictionary": teacher, "part": "shard-000"})()
    assert RULES["extract_activations"].params(workflow, job)["teacher_precision"] == "fp32"
    assert RULES["precompute_targets"].params(workflow, job)["teacher_precision"] == "fp16"

    ids = np.array([[101, 2023, 2003, 1037, 3231, 102], [101, 2178, 102, 0, 0, 0]])
    types, lengths = np.zeros_like(ids), np.array([6, 3])
    plain = AutoModel.from_pretrained(encoder_teacher, add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = plain(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy((ids > 0).astype(np.int64)),
                         token_type_ids=torch.from_numpy(types)).last_hidden_state
    cpu = torch.device("cpu")
    fp32 = load_encoder(str(encoder_teacher), -1, cpu, precision="fp32").hidden(ids, types, lengths)
    bf16 = load_encoder(str(encoder_teacher), -1, cpu, precision="bf16").hidden(ids, types, lengths)
    real = torch.from_numpy(ids > 0)
    assert torch.allclose(fp32[real], expected[real], atol=1e-6)
    assert not torch.allclose(bf16[real].float(), expected[real], atol=1e-4)


def test_kd_with_mlm_as_the_reference_adds_them(tmp_path, sharded_corpus, mlm_teacher, tokenizer):
    """The reference's distillation with --mlm_weight > 0 adds mlm_weight x the MLM cross-entropy to the KL term
    (pretrainer.py: kl_loss_val, ce_loss_val += args.mlm_weight * ce_loss(...)). Objective kd+mlm: its loss is
    that sum, written out here from the KL and the cross-entropy of the same logits, and it trains."""
    from pipeline.pretrain.losses import total_loss

    params = {**BASE, "objective": "kd+mlm", "mlm_weight": 0.3, "kd_temperature": 1.0, "kd_teacher_input": "masked"}
    torch.manual_seed(0)
    student = Student(build_config(params, tokenizer, 64), "kd+mlm", None)
    teacher = KdTeacher(str(mlm_teacher), torch.device("cpu"), json.loads(Path(sharded_corpus[1]).read_text()))
    batch = batch_of(Shard(sharded_corpus[0][0]), tokenizer)
    out = student(batch)
    parts = loss_parts(out, batch, params, teacher)
    assert set(parts) == {"kd", "mlm"}
    with torch.no_grad():
        teacher_logits = teacher.logits(batch)
    kl = F.kl_div(F.log_softmax(out["mlm_logits"], -1), F.log_softmax(teacher_logits, -1), log_target=True,
                  reduction="sum") / batch["masked_count"]
    cross_entropy = F.cross_entropy(out["mlm_logits"], batch["labels"])
    assert float(total_loss(parts, params)) == pytest.approx(float(kl + 0.3 * cross_entropy), rel=1e-5)
    summary = pretrain(tmp_path / "kd_mlm", *sharded_corpus, {**params, "teacher_source": str(mlm_teacher)})
    assert {"kd", "mlm"} <= set(summary["final"]) and summary["steps"] == 4


def test_the_argmax_cross_entropy_as_the_reference_computes_it():
    """--not-kl_loss in the reference: CrossEntropyLoss (the mean) of the K logits against argmax of each masked
    token's code, an all-zero code's argmax being atom 0 (pretrainer.py: max_positions = torch.argmax(...)).
    Written out here from dense codes; mlsm_loss: argmax with zero_code_positions count is that mean, with
    exclude the mean over the positions that have a target."""
    from pipeline.pretrain.losses import argmax_loss

    g = torch.Generator().manual_seed(0)
    dense = torch.rand(12, 10, generator=g) * (torch.rand(12, 10, generator=g) < 0.3)
    dense[[2, 7]] = 0  # two all-zero codes
    dense = dense / dense.sum(1, keepdim=True).clamp_min(1e-30)
    logits = torch.randn(12, 10, generator=g)
    width = int((dense > 0).sum(1).max())
    atoms = torch.zeros(12, width, dtype=torch.long)  # the sparse layout of the target shards
    weights = torch.zeros(12, width)
    for row in range(12):
        nonzero = torch.nonzero(dense[row]).flatten()
        atoms[row, : len(nonzero)], weights[row, : len(nonzero)] = nonzero, dense[row, nonzero]
    reference = F.cross_entropy(logits, dense.argmax(1))
    assert float(argmax_loss(logits, atoms, weights, torch.tensor(12), True)) == pytest.approx(float(reference))
    has = dense.sum(1) > 0
    excluded = F.cross_entropy(logits[has], dense[has].argmax(1))
    assert float(argmax_loss(logits, atoms, weights, has.sum(), False)) == pytest.approx(float(excluded))


def test_unmasked_chosen_tokens_as_the_reference_without_masking(sharded_corpus, tokenizer):
    """--not_use_masking in the reference: the tokens are chosen as before but stay in the input."""
    shard = Shard(sharded_corpus[0][0])
    rows = np.arange(8)
    masked = make_batch([(shard, rows)], tokenizer, {"mask_fraction": 0.15, "mask_strategy": "all_mask"}, (0, 0))
    unmasked = make_batch([(shard, rows)], tokenizer, {"mask_fraction": 0.15, "mask_strategy": "unmasked"}, (0, 0))
    assert torch.equal(unmasked["masked"], masked["masked"]) and torch.equal(unmasked["labels"], masked["labels"])
    originals = masked["input_ids"].clone()
    originals[masked["masked"]] = masked["labels"]
    assert torch.equal(unmasked["input_ids"], originals)


def test_an_argmax_student_trains(tmp_path, sharded_corpus, targets_by_length):
    summary = pretrain(tmp_path / "argmax", *sharded_corpus, {"objective": "mlsm", "mlsm_loss": "argmax",
                                                               "mask_strategy": "unmasked"}, targets_by_length[64])
    assert summary["steps"] == 4 and np.isfinite(summary["final"]["mlsm"])
