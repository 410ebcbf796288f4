"""Stages 6 and 7: task readers on the real GLUE files, metrics, fine-tuning and the report."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import StageError
from pipeline.data.integrity import read_record, write_record
from pipeline.data.tasks import GLUE, read_split, task_spec
from pipeline.finetune import compute_metrics
from pipeline.reporting import health
from pipeline.reporting.health import bootstrap_ci
from pipeline.stages import call

from conftest import SHARED, save_tiny_teacher

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
    assert set(GLUE) == {"CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "MNLI-mm", "QNLI", "RTE", "WNLI"}
    assert GLUE["MNLI-mm"].dev_file == "dev_mismatched.tsv" and GLUE["MNLI"].dev_file == "dev_matched.tsv"


def test_csv_and_jsonl_tasks_read_the_same_examples(tmp_path):
    import json

    rows = [("a, \"quoted\" text", "x"), ("second\ttabbed", "y")]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "text"])
        writer.writerows([(label, text) for text, label in rows])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": text, "label": label, "extra": 1}) + "\n"
                                                  for text, label in rows))
    for fmt in ("csv", "jsonl"):
        spec = task_spec({"format": fmt, "path": str(tmp_path), "text_columns": ["text"], "label_column": "label"})
        assert spec.train_file == f"train.{fmt}" and spec.dev_file == f"dev.{fmt}"
        texts, labels = read_split(tmp_path / spec.train_file, spec)
        assert texts == [(t,) for t, _ in rows] and labels == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(StageError, match=r"bad.jsonl, line 2: lacks field\(s\) \['label'\]"):
        read_split(tmp_path / "bad.jsonl", task_spec({"format": "jsonl", "path": str(tmp_path),
                                                      "text_columns": ["text"], "label_column": "label"}))


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


def finetune(model, summary, task, out, params):
    """The fine-tuning stage on a tsv task (train.tsv and dev.tsv in task's path)."""
    return call("finetune", {**params, "task": task}, train=f"{task['path']}/train.tsv", dev=f"{task['path']}/dev.tsv",
                model=model, model_summary=summary, scores=out)


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


def test_bootstrap_interval_of_the_mean():
    low, high = bootstrap_ci([0.5, 0.6, 0.7, 0.8])
    assert 0.5 <= low < 0.65 < high <= 0.8
    assert all(np.isnan(bootstrap_ci([0.5])))
    assert bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))


def test_report_has_every_table_and_its_plots_render(tmp_path):
    import matplotlib.image

    scores, students = [], []
    # a (mlsm) beats b (mlm) by 0.1 on every seed; t1 also has checkpoints at updates 2 and 4 (final: 8).
    for student, objective, bonus in (("a", "mlsm", 0.1), ("b", "mlm", 0.0)):
        for task in ("t1", "t2"):
            for snapshot, steps in (("step2", 2), ("step4", 4), ("final", 8)):
                if task == "t2" and snapshot != "final":
                    continue
                for seed in (1, 2, 3):
                    path = tmp_path / f"{student}-{snapshot}-{task}-{seed}.json"
                    score = 0.4 + bonus + seed / 20 + steps / 100
                    write_record(path, {"params": {"student": student, "objective": objective, "task_name": task,
                                                   "seed": seed, "snapshot": snapshot},
                                        "pretrain_steps": steps, "score": score,
                                        "metrics": ["accuracy"], "final": {"accuracy": score}})
                    scores.append(str(path))
        path = tmp_path / f"{student}.json"
        write_record(path, {"params": {"student": student, "objective": objective, "size": "tiny"},
                            "steps": 8, "final": {"step": 8, objective: 1.0, "grad_norm": 0.5, "mfu": None},
                            "parameters": 10, "tokens_per_second": 5.0})
        students.append(str(path))
    bench = tmp_path / "benchmarks"
    for rule, job, seconds in (("pretrain_student", "a", 10.0), ("pretrain_student", "b", 30.0),
                               ("report", "report", 1.0)):
        (bench / rule).mkdir(parents=True, exist_ok=True)
        (bench / rule / f"{job}.tsv").write_text(f"s\tmax_rss\n{seconds}\t100\n")
    out = tmp_path / "report"
    call("report", {"device": "cuda", "student_gpus": {"a": 1, "b": 2}}, scores=scores, students=students,
         benchmarks=sorted(bench.rglob("*.tsv")), md=out / "r.md", csv=out / "r.csv", scores_plot=out / "r.png",
         curve_plot=out / "curve.png", manifest=out / "manifest.json", html=out / "r.html")
    assert set(read_record(out / "manifest.json")["files"]) == {"r.md", "r.csv", "r.png", "curve.png", "r.html"}
    page = (out / "r.html").read_text()
    assert page.count("<table>") == (out / "r.md").read_text().count("\n|---") == 5
    assert page.count('src="data:image/png;base64,') == 2 and "<td>+0.100</td>" in page
    text = (out / "r.md").read_text()
    # Final scores: a on t1 = 0.58 + seed/20 over seeds 1-3 -> mean 0.68, std 0.05, and the average.
    assert "| a | mlsm | 0.680 ± 0.050 [0.630, 0.730] | 0.680 ± 0.050 [0.630, 0.730] | 0.680 |" in text
    assert "| b | mlm |" in text
    assert "| a | b | t1 | +0.100 | [+0.100, +0.100] | 3/3 |" in text  # paired by seed
    assert "| student | task | updates 2 | updates 4 | updates 8 |" in text
    assert "| a | t1 | 0.620 ± 0.050 [0.570, 0.670] | 0.640 ± 0.050" in text
    assert "| pretrain_student | 2 | 40.0 | 70.0 | 100 |" in text  # GPU time: 10 x 1 GPU + 30 x 2 GPUs
    assert len(list(csv.DictReader(open(out / "r.csv")))) == 2 * (3 * 3 + 3)
    for png in ("r.png", "curve.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image[..., :3].std() > 0.05


def diagnostics(step, mlm=None, mlsm=None, cosines=(0.3, 0.3, 0.05)):
    """A diagnostics entry as pre-training records it: (gain, standard error) of each loss over its baseline."""
    entry = {"step": step, "masked_cosine": cosines[0], "real_cosine": cosines[1], "embedding_cosine": cosines[2]}
    if mlm is not None:
        entry.update(validation_mlm=6.0 - mlm[0], unigram_loss=6.0, mlm_gain=mlm[0], mlm_gain_se=mlm[1])
    if mlsm is not None:
        entry.update(validation_mlsm=2.0 - mlsm[0], mean_target_loss=2.0, uniform_loss=3.0, mlsm_gain=mlsm[0],
                     mlsm_gain_se=mlsm[1])
    return entry


INIT = (0.53, 0.45, 0.0)
# name: objective, score offset over the control, diagnostics at the checkpoint (update 4) and the end (8).
HEALTH_FIXTURE = {
    "good": ("mlsm", 0.18, {"mlsm": (0.0, 0.01)}, {"mlsm": (1.0, 0.05)}),  # its checkpoint had not learned yet
    "good_mlm": ("mlm", 0.08, {"mlm": (0.5, 0.05)}, {"mlm": (1.5, 0.05)}),
    "flat_mlm": ("mlm", 0.0, {"mlm": (0.0, 0.02)}, {"mlm": (0.004, 0.02)}),  # not beyond token frequencies
    "flat_mlsm": ("mlsm", 0.05, {"mlsm": (0.0, 0.01)}, {"mlsm": (0.01, 0.01)}),  # not beyond the mean target
    "collapsed": ("mlm", 0.06, {"mlm": (1.0, 0.05)}, {"mlm": (1.0, 0.05), "cosines": (0.999, 0.95, 0.7)}),
    "none": ("none", 0.0, None, None),
}


def health_fixture(tmp_path):
    """Score and student records of six students (one failing each diagnostic, and a control) on two tsv tasks
    whose files give majority-class scores 0.7 (t1) and 0.5 (t2)."""
    write_task(tmp_path / "t1", [("x", "a")] * 6 + [("y", "b")] * 4, [("x", "a")] * 7 + [("y", "b")] * 3)
    write_task(tmp_path / "t2", [("x", "a")] * 5 + [("y", "b")] * 5, [("x", "a")] * 5 + [("y", "b")] * 5)
    scores, students = [], []
    for student, (objective, bonus, checkpoint, final) in HEALTH_FIXTURE.items():
        snapshots = [("final", 0 if objective == "none" else 8)] + ([("step4", 4)] if checkpoint else [])
        for task, floor in (("t1", 0.72), ("t2", 0.6)):
            for snapshot, steps in snapshots:
                for seed in (1, 2, 3):
                    score = floor + seed / 100 + (bonus if snapshot == "final" else bonus / 2)
                    path = tmp_path / f"{student}-{snapshot}-{task}-{seed}.json"
                    write_record(path, {"params": {"student": student, "objective": objective, "task_name": task,
                                                   "seed": seed, "snapshot": snapshot,
                                                   "task": {**TSV_TASK, "path": str(tmp_path / task)}},
                                        "pretrain_steps": steps, "score": score, "metrics": ["accuracy"],
                                        "final": {"accuracy": score}})
                    scores.append(str(path))
        measured = [diagnostics(0, cosines=INIT, **{k: (0.0, 0.01) for k in (checkpoint or {})})]
        if final is not None:
            measured += [diagnostics(4, **checkpoint), diagnostics(8, **final)]
        path = tmp_path / f"{student}.json"
        write_record(path, {"params": {"student": student, "objective": objective, "size": "tiny", "dropout": 0.1,
                                       "seed": 0},
                            "steps": 8 if final else 0, "final": {"step": 8}, "parameters": 10,
                            "tokens_per_second": 5.0, "diagnostics": measured})
        students.append(str(path))
    return scores, students


def make_report(tmp_path, scores, students, **more):
    out = tmp_path / "report"
    call("report", {"device": "cpu"}, scores=scores, students=students, md=out / "r.md", csv=out / "r.csv",
         scores_plot=out / "r.png", curve_plot=out / "curve.png", manifest=out / "manifest.json",
         html=out / "r.html", **more)
    return (out / "r.md").read_text(), list(csv.DictReader(open(out / "r.csv"))), (out / "r.html").read_text()


def test_the_report_shows_the_control_the_majority_class_and_each_failed_diagnostic(tmp_path):
    scores, students = health_fixture(tmp_path)
    files = [str(tmp_path / t / f) for t in ("t1", "t2") for f in ("train.tsv", "dev.tsv")]
    text, rows, page = make_report(tmp_path, scores, students, task_files=files)
    # The control and the majority class as the floor of the main table, each student's health beside it.
    assert "| none | none | 0.740 ± 0.010 [0.730, 0.750] | 0.620 ± 0.010 [0.610, 0.630] | 0.680 | " \
           "control (no pre-training) |" in text
    assert "| majority class | – | 0.700 | 0.500 | 0.600 | – |" in text
    assert "| good | mlsm | 0.920 ± 0.010 [0.910, 0.930] | 0.800 ± 0.010 [0.790, 0.810] | 0.860 | passes |" in text
    assert text.index("| good |") < text.index("| none |")  # the control comes last
    for student, failure in (("flat_mlm", "fails: MLM loss"), ("flat_mlsm", "fails: MLSM loss"),
                             ("collapsed", "fails: masked states, real-token states, word embeddings")):
        assert re.search(rf"\| {student} \| .* \| {failure} \|", text), student
    # The students that did not train enough, named; a plain-language warning per failed diagnostic.
    assert "Did not train enough for their scores to say what their objective is worth: `collapsed`, " \
           "`flat_mlm`, `flat_mlsm`. Comparisons involving them are marked below" in text
    assert "Warning: student `flat_mlm` has not learned beyond token frequencies: its validation MLM loss 5.996" in text
    assert "Warning: student `flat_mlsm` has not learned to predict the latent semantic targets" in text
    for what in ("masked states", "real-token states", "word embeddings"):
        assert f"Warning: student `collapsed` has collapsed {what}" in text
    assert "collapsed masked states: mean pairwise cosine 0.999, against 0.530 at initialisation (limit 0.765;" in text
    assert "| flat_mlm | 5.996 vs 6.000 (token frequencies) FAILS | – | 0.300 (init 0.530) ok |" in text
    # Against the control, paired by seed; against the majority class.
    assert "| good | none | t1 | +0.180 | [+0.180, +0.180] | 3/3 | above | above |" in text
    assert "| flat_mlm | none | t1 | +0.000 | [+0.000, +0.000] | 0/3 | within noise | above |" in text
    assert "| flat_mlm | none | t2 | +0.000 | [+0.000, +0.000] | 0/3 | within noise | above |" in text
    # MLSM against MLM: a finding only between healthy students above the floor; the others marked.
    assert "| good | good_mlm | t1 | +0.100 | [+0.100, +0.100] | 3/3 | MLSM higher |" in text
    assert "| good | flat_mlm | t1 | +0.180 | [+0.180, +0.180] | 3/3 | not a finding: flat_mlm fails MLM loss; " \
           "flat_mlm is not above the control |" in text
    assert "| flat_mlsm | good_mlm | t2 | -0.030 | [-0.030, -0.030] | 0/3 | not a finding: flat_mlsm fails " \
           "MLSM loss |" in text
    assert "| good | collapsed | t1 | +0.120 | [+0.120, +0.120] | 3/3 | not a finding: collapsed fails masked " \
           "states, real-token states, word embeddings |" in text
    # The curve starts at the control (0 updates); a checkpoint that fails a diagnostic is marked.
    assert "| student | task | updates 0 | updates 4 | updates 8 |" in text
    assert "| good | t1 | – | 0.830 ± 0.010 [0.820, 0.840] † | 0.920 ± 0.010 [0.910, 0.930] |" in text
    assert "| good_mlm | t1 | – | 0.780 ± 0.010 [0.770, 0.790] | 0.820 ± 0.010 [0.810, 0.830] |" in text
    assert "| none | t1 | 0.740 ± 0.010 [0.730, 0.750] | – | – |" in text
    # results.csv: the control's score on the same task and seed, the majority class, the diagnostics.
    row = next(r for r in rows if (r["student"], r["task"], r["seed"], r["snapshot"]) == ("good", "t1", "2", "final"))
    assert (row["control"], float(row["control_score"]), float(row["minus_control"])) == ("none", 0.74,
                                                                                           pytest.approx(0.18))
    assert float(row["majority_score"]) == 0.7 and row["health"] == "passes" and float(row["mlsm_gain"]) == 1.0
    assert float(row["masked_cosine_init"]) == 0.53
    checkpoint = next(r for r in rows if (r["student"], r["snapshot"]) == ("good", "step4"))
    assert checkpoint["health"] == "fails: MLSM loss" and float(checkpoint["mlsm_gain"]) == 0.0
    assert {r["snapshot"]: r["health"] for r in rows if r["student"] == "collapsed"} == {
        "final": "fails: masked states, real-token states, word embeddings", "step4": "passes"}
    assert {r["health"] for r in rows if r["student"] == "none"} == {"control"}
    assert page.count("<table>") == text.count("\n|---") and "not a finding: flat_mlm fails MLM loss" in page


def test_without_a_control_the_report_says_so(tmp_path):
    scores, students = health_fixture(tmp_path)
    text, rows, _ = make_report(tmp_path, [s for s in scores if "/none-" not in s], students[:-1])
    assert "No pre-trained student has a control of its architecture in this run" in text
    assert "| majority class |" not in text and {r["control"] for r in rows} == {""}
    assert "| good | good_mlm | t1 | +0.100 | [+0.100, +0.100] | 3/3 | MLSM higher |" in text


def test_majority_class_scores_follow_each_metric():
    # accuracy: the training set's most frequent label predicted for every dev example
    assert health.majority_score(("accuracy",), ["a", "a", "b"], ["a", "b", "b", "b"]) == 0.25
    # MRPC-style F1 and accuracy: predicting the positive class everywhere gives F1 = 2p / (1 + p)
    assert health.majority_score(("f1", "accuracy"), ["1", "1", "0"], ["1", "0", "0", "0"]) == \
        pytest.approx((2 * 0.25 / 1.25 + 0.25) / 2)
    # predicting the negative class everywhere has no positive predictions: F1 = 0
    assert health.majority_score(("f1", "accuracy"), ["0", "0", "1"], ["1", "0", "0", "0"]) == 0.375
    assert health.majority_score(("mcc",), ["1", "1", "0"], ["1", "0"]) == 0.0
    assert health.majority_score(("pearson", "spearman"), ["1.0"], ["2.0"]) is None


def test_thresholds_of_the_health_checks():
    # a score is above a baseline only when its whole 95 % CI over seeds is
    assert health.not_above([0.69, 0.70, 0.74], 0.70) and not health.not_above([0.72, 0.73, 0.74], 0.70)
    assert health.not_above([0.9], 0.5)  # one seed: no CI, not established
    assert health.reading(-0.01, 0.02) == "within noise" and health.reading(0.01, 0.02) == "above"
    # collapse: more than halfway from the initial cosine towards 1
    student = {"params": {"objective": "mlm"}, "diagnostics": [
        diagnostics(0, mlm=(0.0, 0.01), cosines=(0.5, 0.2, 0.0)),
        diagnostics(8, mlm=(0.05, 0.02), cosines=(0.74, 0.61, 0.49))]}
    assert [(c.name, c.passed) for c in health.checks(student)] == [
        ("MLM loss", True), ("masked states", True), ("real-token states", False), ("word embeddings", True)]
    # a loss gain within 1.96 standard errors of 0 is noise
    student["diagnostics"][1] = diagnostics(8, mlm=(0.03, 0.02), cosines=(0.5, 0.2, 0.0))
    assert health.failed(student)[0].name == "MLM loss"
    assert health.health_cell({"params": {"objective": "none"}}) == "control (no pre-training)"


def test_a_fine_tuning_checkpoint_holds_every_random_generators_state(tmp_path, monkeypatch):
    """Issue #32: only the CPU generator's state was saved; on a GPU dropout draws from the CUDA generator, so a
    resumed run differed. The checkpoint holds what training.rng_states gives (the CUDA state where there is a
    GPU) and a resume restores all of it (tests/test_gpu.py resumes on a GPU)."""
    import torch

    from pipeline import finetune
    from pipeline.resume import Resume

    fake_cuda = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(finetune, "rng_states", lambda: {"torch": torch.get_rng_state(), "cuda": fake_cuda})
    restored = {}
    monkeypatch.setattr(finetune, "set_rng_states", restored.update)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    params = {"seed": 1, "shuffle_seed": None}
    epochs = finetune.Epochs(model, None, optimizer, scheduler, Resume(str(tmp_path), {"p": 1}), "cpu", params)
    epochs._save_state(3, epochs.rng.bit_generator.state)
    again = finetune.Epochs(model, None, optimizer, scheduler, Resume(str(tmp_path), {"p": 1}), "cpu", params)
    again._load_state()
    assert set(restored) == {"torch", "cuda"} and torch.equal(restored["cuda"], fake_cuda)
