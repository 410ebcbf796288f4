"""Stages 6 and 7: task readers on the real GLUE files, metrics, fine-tuning and the report."""

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, save_tiny_teacher
from pipeline.common import StageError
from pipeline.finetune import GLUE, compute_metrics, finetune, read_split, task_spec
from pipeline.integrity import read_record, write_record
from pipeline.report import report

GLUE_DIR = SHARED / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="../shared/data/glue is not beside this checkout")
ROWS = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3668, 408), "RTE": (2490, 277),
        "STS-B": (5749, 1500), "WNLI": (635, 71)}


@needs_glue
@pytest.mark.parametrize("name", sorted(ROWS))
def test_glue_readers_parse_every_row_of_the_real_files(name):
    spec = task_spec({"format": "glue", "path": str(GLUE_DIR / name)})
    for split, expected in zip(("train.tsv", "dev.tsv"), ROWS[name]):
        texts, labels = read_split(GLUE_DIR / name / split, spec)
        assert len(texts) == len(labels) == expected
        assert all(len(t) == len(spec.text_columns) and all(t) for t in texts)
    if not spec.regression:
        assert len(set(labels)) == 2


def test_official_metrics():
    gold, pred = np.array([1, 0, 1, 1, 0]), np.array([1, 0, 0, 1, 1])
    m = compute_metrics(("f1", "accuracy", "mcc"), pred, gold, ["0", "1"])
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx(1 / 6)
    r = compute_metrics(("pearson", "spearman"), np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 9]), None)
    assert r["spearman"] == pytest.approx(1.0) and 0.98 < r["pearson"] < 1


def test_all_nine_glue_tasks_are_known():
    assert set(GLUE) == {"CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI"}


def write_task(directory: Path, train_rows, dev_rows):
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        with open(directory / name, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(rows)


TSV_TASK = {"format": "tsv", "text_columns": ["text"], "label_column": "label", "metric": "accuracy"}
PARAMS = {"seed": 1, "epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.01,
          "warmup_fraction": 0.1, "max_seq_len": 32, "max_train_examples": 0, "device": "cpu"}


def test_finetune_learns_a_separable_task(tmp_path):
    model = save_tiny_teacher(tmp_path / "student", with_mlm_head=True)
    train_rows = [("good fine great", "pos"), ("bad awful poor", "neg")] * 40
    write_task(tmp_path / "task", train_rows, train_rows[:20])
    result = finetune(str(model), None, {**TSV_TASK, "path": str(tmp_path / "task")}, str(tmp_path / "s.json"),
                      {**PARAMS, "epochs": 4})
    assert result["score"] == pytest.approx(1.0) and len(result["epochs"]) == 4
    assert result["labels"] == ["neg", "pos"]


def test_label_outside_the_training_labels_names_the_example(tmp_path):
    write_task(tmp_path / "task", [("a", "x"), ("b", "y")], [("c", "x"), ("d", "z")])
    with pytest.raises(StageError, match=r"dev.tsv, example 2: label 'z'"):
        finetune(str(tmp_path), None, {**TSV_TASK, "path": str(tmp_path / "task")}, str(tmp_path / "s.json"), PARAMS)


def test_missing_dev_file_is_named(tmp_path):
    write_task(tmp_path / "task", [("a", "x")], [("c", "x")])
    (tmp_path / "task" / "dev.tsv").unlink()
    with pytest.raises(StageError, match="dev.tsv does not exist"):
        finetune(str(tmp_path), None, {**TSV_TASK, "path": str(tmp_path / "task")}, str(tmp_path / "s.json"), PARAMS)


def test_report_lists_every_student_and_task(tmp_path):
    scores, students = [], []
    for student, objective in (("a", "mlsm"), ("b", "mlm")):
        for task in ("t1", "t2"):
            for seed in (1, 2):
                path = tmp_path / f"{student}-{task}-{seed}.json"
                write_record(path, {"params": {"student": student, "objective": objective, "task_name": task,
                                               "seed": seed}, "score": 0.5 + seed / 10,
                                    "metrics": ["accuracy"], "final": {"accuracy": 0.5 + seed / 10}})
                scores.append(str(path))
        path = tmp_path / f"{student}.json"
        write_record(path, {"params": {"student": student, "objective": objective, "size": "tiny"},
                            "steps": 3, "final": {"step": 3, objective: 1.0}, "parameters": 10,
                            "tokens_per_second": 5.0})
        students.append(str(path))
    out = tmp_path / "report"
    report(scores, students, [], [], [], None, str(out / "r.md"), str(out / "r.csv"), str(out / "r.png"),
           str(out / "manifest.json"))
    assert set(read_record(out / "manifest.json")["files"]) == {"r.md", "r.csv", "r.png"}
    text = (out / "r.md").read_text()
    assert "| a | mlsm | 0.650 ± 0.071 | 0.650 ± 0.071 | 0.650 |" in text
    assert "| b | mlm |" in text
    assert len(list(csv.DictReader(open(out / "r.csv")))) == 8
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
