"""Issue #34: every GLUE task in its official layout, MNLI fine-tuned once and scored on both dev sets, and a
config whose task files are missing stopped with one message for all of them."""

from __future__ import annotations

import pytest

from pipeline import config as cfg
from pipeline.data.integrity import read_record
from pipeline.data.tasks import read_split, task_files, task_spec
from pipeline.report import collect_scores
from pipeline.reporting.comparison import majority_scores
from pipeline.stages import call

import glue_fixtures
from conftest import save_tiny_teacher

COLUMNS = {"MNLI": (("sentence1", "sentence2"), "gold_label"), "QQP": (("question1", "question2"), "is_duplicate"),
           "QNLI": (("question", "sentence"), "label")}


@pytest.fixture
def glue(tmp_path):
    return tmp_path / "glue", glue_fixtures.make(tmp_path / "glue")


def test_the_large_tasks_official_layouts_are_read_row_for_row(glue):
    root, rows = glue
    for task, splits in rows.items():
        spec = task_spec({"format": "glue", "path": str(root / task)})
        train, devs = task_files({"format": "glue", "path": str(root / task)})
        assert sorted([train, *devs]) == sorted(str(root / task / name) for name in splits)
        texts_columns, label_column = COLUMNS[task]
        for name, expected in splits.items():
            texts, labels = read_split(root / task / name, spec)
            assert texts == [tuple(r[c] for c in texts_columns) for r in expected]
            assert labels == [r[label_column] for r in expected]


def test_mnli_is_fine_tuned_once_and_scored_on_both_dev_sets(tmp_path, glue):
    root, rows = glue
    task = {"format": "glue", "path": str(root / "MNLI")}
    train, devs = task_files(task)
    model = save_tiny_teacher(tmp_path / "student", with_mlm_head=True)
    params = {"seed": 1, "epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.01,
              "warmup_fraction": 0.1, "max_seq_len": 48, "max_train_examples": 0, "device": "cpu", "task": task,
              "task_name": "MNLI", "student": "s", "objective": "mlm"}
    result = call("finetune", params, train=train, dev=devs, model=str(model), model_summary=None,
                  scores=str(tmp_path / "scores.json"))
    assert [e["name"] for e in result["evaluations"]] == ["MNLI-m", "MNLI-mm"]
    assert [e["dev_examples"] for e in result["evaluations"]] == [len(rows["MNLI"]["dev_matched.tsv"]),
                                                                  len(rows["MNLI"]["dev_mismatched.tsv"])]
    assert result["score"] == result["evaluations"][0]["score"]
    assert all(set(epoch["dev_sets"]) == {"MNLI-m", "MNLI-mm"} for epoch in result["epochs"])

    scores, evaluations = collect_scores([str(tmp_path / "scores.json")])
    assert [(r["task"], r["score"]) for r in scores] == [(e["name"], e["score"]) for e in result["evaluations"]]
    majority = majority_scores(evaluations, [train, *devs])
    for name, file in (("MNLI-m", "dev_matched.tsv"), ("MNLI-mm", "dev_mismatched.tsv")):
        gold = [r["gold_label"] for r in rows["MNLI"][file]]
        assert majority[name] == pytest.approx(max(gold.count(label) for label in set(gold)) / len(gold))
    assert read_record(tmp_path / "scores.json")["evaluations"] == result["evaluations"]


def test_every_missing_task_directory_is_named_in_one_message(tmp_path, monkeypatch, glue):
    """A preset names nine GLUE tasks; Snakemake stopped at the first fine-tuning job whose file was missing."""
    from pipeline.wiring.preflight import check_inputs
    from pipeline.wiring.workflow import Workflow

    from test_workflow import tiny_config

    root, _ = glue
    monkeypatch.chdir(tmp_path)
    (root / "MNLI" / "dev_mismatched.tsv").unlink()
    config = {**tiny_config(tmp_path), "tasks": {
        "MNLI": {"format": "glue", "path": str(root / "MNLI")}, "QQP": {"format": "glue", "path": str(root / "QQP")},
        "CoLA": {"format": "glue", "path": "data/glue/CoLA"},
        "mine": {"format": "jsonl", "path": "data/mine", "text_columns": ["text"], "label_column": "y"}}}
    config["finetune"] = {**config["finetune"], "checkpoint_tasks": []}
    with pytest.raises(cfg.ConfigError) as error:
        check_inputs(Workflow(cfg.validate(config)))
    message = str(error.value)
    assert "the files of 3 task(s) are missing" in message and "QQP" not in message
    assert f"tasks.MNLI: {root / 'MNLI'} lacks dev_mismatched.tsv; it should hold GLUE MNLI" in message
    assert "train.tsv and dev_matched.tsv and dev_mismatched.tsv" in message
    assert "tasks.CoLA: data/glue/CoLA does not exist" in message and "no header row" in message
    assert "tasks.mine: data/mine does not exist; it should hold train.jsonl and dev.jsonl: JSON lines with the " \
           "fields text, y" in message


def test_the_glue_score_is_the_benchmarks():
    """BERT-large on the GLUE leaderboard (Devlin et al., 2019, Table 1): its task scores give its published GLUE
    score, 80.5, only with MNLI counted once as the mean of MNLI-m and MNLI-mm and WNLI counted (AX is not)."""
    from pipeline.reporting.comparison import Comparison

    published = {"CoLA": [60.5], "SST-2": [94.9], "MRPC": [89.3, 85.4], "STS-B": [87.6, 86.5], "QQP": [72.1, 89.3],
                 "MNLI-m": [86.7], "MNLI-mm": [85.9], "QNLI": [92.7], "RTE": [70.1], "WNLI": [65.1]}
    scores = [{"student": "bert", "objective": "mlm", "snapshot": "final", "task": task, "seed": 0,
               "score": sum(metrics) / len(metrics) / 100} for task, metrics in published.items()]
    glue = {task: task.split("-m")[0] for task in published}
    comparison = Comparison(scores, {}, {}, glue)
    score, counted = comparison.glue_score(lambda task: comparison.values("bert", task)[0])
    assert counted == 9 and round(score * 100, 1) == 80.5
    partial = Comparison(scores, {}, {}, {"CoLA": "CoLA", "MNLI-m": "MNLI"})
    assert partial.glue_score(lambda task: partial.values("bert", task)[0]) == pytest.approx(((60.5 + 86.7) / 2 / 100,
                                                                                             2))


def test_tokenised_examples_are_held_compactly_and_read_back_unchanged(glue, tokenizer):
    """MNLI's 393 k pairs tokenised into Python lists took about 1 GB; compact int32 columns, filled a chunk at a
    time, hold the same ids in a fraction of that."""
    import sys

    from pipeline.data.conll import encode_words
    from pipeline.data.encoded import encode_in_chunks

    root, rows = glue
    texts, _ = read_split(root / "MNLI" / "train.tsv", task_spec({"format": "glue", "path": str(root / "MNLI")}))
    plain = tokenizer(*list(zip(*texts)), truncation=True, max_length=24)
    compact = encode_in_chunks(lambda part: tokenizer(*list(zip(*part)), truncation=True, max_length=24), texts,
                               chunk=7)
    assert set(compact.keys()) == set(plain.keys())
    for field in plain.keys():
        assert [compact[field][i] for i in range(len(texts))] == plain[field]
    python_bytes = sum(sys.getsizeof(row) + sum(sys.getsizeof(v) for v in row) for row in plain["input_ids"])
    ids = compact["input_ids"]
    assert (ids.values.nbytes + ids.offsets.nbytes) * 4 < python_bytes
    sentences, tags = [("EU", "rejects", "German"), ("Peter",)], [[1, 0, 2], [3]]
    words = encode_words(tokenizer, sentences, tags, 16)
    chunked = encode_in_chunks(lambda part: encode_words(tokenizer, [s for s, _ in part], [t for _, t in part], 16),
                               list(zip(sentences, tags)), chunk=1)
    assert [chunked["labels"][i] for i in range(2)] == words["labels"]
    assert [chunked["first_tokens"][i] for i in range(2)] == words["first_tokens"]
