"""Bad-input matrix: each bad input fails its stage with exit status 1 and one message naming the culprit
(file, key, line or byte offset), and leaves every previously valid output as it was.

Stages run in-process through pipeline.cli.run, the entry point of `python -m pipeline.<stage>`, on copies of
valid outputs that the failing run would overwrite; config cases run through real Snakemake against the
tiny DAG's finished results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import run
from pipeline.data import contract
from pipeline.data.formats import read_shard, write_store
from pipeline.data.integrity import file_entries, write_record
from pipeline.stages import call

from conftest import MINILM, save_tiny_teacher

FINETUNE = {"seed": 1, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.01,
            "warmup_fraction": 0.1, "max_seq_len": 32, "max_train_examples": 0, "device": "cpu"}


def snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_stage(stage: str, args: list) -> None:
    """A stage as its command line runs it."""
    import importlib

    from pipeline.wiring import STAGES

    run(stage, getattr(importlib.import_module(f"pipeline.{stage}"), STAGES[stage].entry), args)


def fails(stage: str, args: list, caplog) -> str:
    """Run a stage as its command line does; assert exit status 1; return the error it logged."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pipeline"), pytest.raises(SystemExit) as exit_info:
        run_stage(stage, args)
    assert exit_info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    return errors[0]


def write_glue_wnli(directory: Path, train_labels=("0", "1") * 8, with_dev=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}\tThe cat sat {i}.\tIt sat {i}.\t{label}\n" for i, label in enumerate(train_labels))
    header = "index\tsentence1\tsentence2\tlabel\n"
    (directory / "train.tsv").write_text(header + rows)
    if with_dev:
        (directory / "dev.tsv").write_text(header + rows)
    return directory


@pytest.fixture(scope="module")
def valid(tmp_path_factory, sharded_corpus, encoder_teacher) -> Path:
    """Valid outputs of every stage a case feeds or overwrites."""
    root = tmp_path_factory.mktemp("valid")
    shards, manifest = sharded_corpus
    shutil.copytree(Path(manifest).parent, root / "corpus")
    call("teacher", teacher_params(encoder_teacher), corpus_shards=[root / "corpus" / Path(s).name for s in shards],
         corpus_manifest=root / "corpus" / "manifest.json", store=root / "teacher" / "activations.zarr",
         manifest=root / "teacher" / "manifest.json")
    call("dictionary", DICTIONARY, activations=root / "teacher" / "activations.zarr",
         activations_manifest=root / "teacher" / "manifest.json", dictionary=root / "dictionary" / "D.npy",
         metrics=root / "dictionary" / "metrics.json", atoms=root / "dictionary" / "atoms.json")
    save_tiny_teacher(root / "model", with_mlm_head=False)
    write_glue_wnli(root / "glue" / "WNLI")
    return root


def teacher_params(source, **over):
    return {"teacher": "t", "source": str(source), "layer": -1, "batch_size": 8, "sample_tokens": 300,
            "sample_seed": 0, "tokenizer": MINILM, "device": "cpu", "trust_remote_code": False, "subsample": "none",
            "subsample_threshold": 1e-4, "positions_per_sequence": 0, **over}


DICTIONARY = {"atoms": 16, "lambda": 0.05, "batch_size": 64, "epochs": 1, "heldout_tokens": 50, "code_iterations": 20,
              "code_tolerance": 5e-2, "forgetting": 4, "atom_block": 8, "atom_sweeps": 2, "checks_per_epoch": 2,
              "convergence_tolerance": 0,
              "backend": "torch", "seed": 0, "browse_atoms": 3, "device": "cpu"}


@pytest.fixture
def work(tmp_path, valid) -> Path:
    shutil.copytree(valid, tmp_path / "w")
    return tmp_path / "w"


def corpus_args(work: Path, inputs) -> list:
    return ["--text", *inputs, "--shards", work / "corpus/shard-000.parquet", work / "corpus/shard-001.parquet",
            "--validation", work / "corpus/validation.parquet", "--token-counts", work / "corpus/token_counts.npy",
            "--manifest", work / "corpus/manifest.json", "--params",
            json.dumps({"tokenizer": MINILM, "max_seq_len": 64, "seed": 0})]


# ---- stage 1: text that is not a corpus ---------------------------------------------------------

TEXT_CASES = {
    "empty corpus": (b"\n\n   \n", r"empty\.txt'\] holds no text"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
                    r"bad\.txt, line 1 \(byte 0\): not UTF-8 at byte 0 \(a binary file"),
    "binary file with NUL bytes": (b"\x00\x01\x02" * 100,
                                   r"bad\.txt, line 1 \(byte 0\): NUL byte at byte 0; this is a binary file"),
    "non-UTF-8 bytes in a line": (b"A fine sentence.\nA caf\xe9 sentence.\n",
                                  r"bad\.txt, line 2 \(byte 17\): not UTF-8 at byte 22"),
    "one 10 MB line": (b"Ok.\n" + b"word " * 2_000_000 + b"\n",
                       r"bad\.txt, line 2 \(byte 4\): longer than 1048576 bytes"),
    # Issue #28, 5: UTF-16 text was called a binary file.
    "UTF-16 text with a byte-order mark": ("A first sentence.\nA second one.\n".encode("utf-16"),
                                           r"bad\.txt, line 1 \(byte 0\): UTF-16 text .* iconv -f UTF-16 -t UTF-8"),
    "UTF-16 text without one": ("A first sentence.\nA second one.\n".encode("utf-16-be"),
                                r"bad\.txt, line 1 \(byte 0\): UTF-16 text"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_bad_corpus_text(case, work, caplog):
    content, expected = TEXT_CASES[case]
    path = work / ("empty.txt" if case == "empty corpus" else "bad.txt")
    path.write_bytes(content)
    before = snapshot(work / "corpus")
    message = fails("corpus", corpus_args(work, [path]), caplog)
    assert re.search(expected, message), message
    assert snapshot(work / "corpus") == before


def test_a_parquet_text_column_of_another_type_is_named_as_such(work, caplog):
    """Issue #28, 5: a `text` column of integers was reported as missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "title": ["a", "b", "c"]}), path)
    message = fails("corpus", corpus_args(work, [path]), caplog)
    assert "column 'text' holds int64, not text (corpus.text_field" in message and "title (string)" in message


# ---- stage 2: teachers ----------------------------------------------------------------------------

def extract_args(work: Path, params: dict) -> list:
    return ["--corpus-manifest", work / "corpus/manifest.json", "--corpus-shards", work / "corpus/shard-000.parquet",
            work / "corpus/shard-001.parquet", "--store", work / "teacher/activations.zarr",
            "--manifest", work / "teacher/manifest.json", "--params", json.dumps(params)]


def test_teacher_path_that_does_not_exist(work, caplog):
    before = snapshot(work / "teacher")
    message = fails("teacher", extract_args(work, teacher_params(work / "no_such_teacher")), caplog)
    assert "no_such_teacher" in message and "no such directory" in message
    assert snapshot(work / "teacher") == before


def test_nan_in_the_teacher_states(work, caplog, tmp_path):
    import torch
    from transformers import BertModel

    broken = save_tiny_teacher(tmp_path / "nan_teacher", with_mlm_head=False)
    model = BertModel.from_pretrained(broken)
    with torch.no_grad():
        model.encoder.layer[-1].output.dense.bias[3] = float("nan")
    model.save_pretrained(broken)
    before = snapshot(work / "teacher")
    message = fails("teacher", extract_args(work, teacher_params(broken)), caplog)
    assert "nan_teacher" in message and "non-finite hidden states (sequence 0 of" in message
    assert snapshot(work / "teacher") == before


def test_truncated_parquet_shard(work, caplog, encoder_teacher):
    shard = work / "corpus/shard-001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    before = snapshot(work / "teacher")
    message = fails("teacher", extract_args(work, teacher_params(encoder_teacher)), caplog)
    assert f"{shard} is truncated or altered" in message
    assert snapshot(work / "teacher") == before


# ---- stages 3 and 4: activations and dictionaries ---------------------------------------------------

def dictionary_args(work: Path) -> list:
    return ["--activations", work / "teacher/activations.zarr",
            "--activations-manifest", work / "teacher/manifest.json",
            "--dictionary", work / "dictionary/D.npy", "--metrics", work / "dictionary/metrics.json",
            "--atoms", work / "dictionary/atoms.json", "--params", json.dumps(DICTIONARY)]


def test_zarr_store_missing_a_chunk(work, caplog):
    chunk = next(p for p in sorted((work / "teacher/activations.zarr/states").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    before = snapshot(work / "dictionary")
    message = fails("dictionary", dictionary_args(work), caplog)
    assert f"{chunk} is missing" in message
    assert snapshot(work / "dictionary") == before


def test_nan_in_the_stored_states(work, caplog):
    states = np.ones((400, 8), np.float16)
    states[42, 3] = np.nan
    shutil.rmtree(work / "teacher/activations.zarr")
    write_store(str(work / "teacher/activations.zarr"), str(work / "teacher/manifest.json"),
                {"teacher": "t", "layer": -1, "tokenizer": MINILM}, states=states,
                token_ids=np.zeros(400, np.int32), seq_ids=np.zeros(400, np.int64), positions=np.zeros(400, np.int16))
    before = snapshot(work / "dictionary")
    message = fails("dictionary", dictionary_args(work), caplog)
    assert "activations.zarr: non-finite state in row 42" in message
    assert snapshot(work / "dictionary") == before


def test_teacher_hidden_size_differs_from_the_dictionary(work, caplog, tmp_path):
    other = save_tiny_teacher(tmp_path / "wide_teacher", with_mlm_head=False, hidden_size=48)
    out = work / "targets/shard-000.parquet"
    out.parent.mkdir()
    out.write_bytes(b"a valid shard from an earlier run")
    params = {**teacher_params(other), "lambda": 0.05, "top_k": 4, "solver": "fista", "max_iterations": 10,
              "tolerance": 0}
    message = fails("targets", ["--corpus-part", work / "corpus/shard-000.parquet", "--corpus-manifest",
                                work / "corpus/manifest.json", "--dictionary", work / "dictionary/D.npy",
                                "--dictionary-metrics", work / "dictionary/metrics.json", "--targets", out,
                                "--params", json.dumps(params)], caplog)
    assert "D.npy has atoms of size 32 but teacher" in message and "hidden size 48" in message
    assert out.read_bytes() == b"a valid shard from an earlier run"


# ---- stage 6: tasks ---------------------------------------------------------------------------------

def finetune_args(work: Path, task_dir: Path) -> list:
    params = {**FINETUNE, "task": {"format": "glue", "path": str(task_dir)}}
    return ["--train", task_dir / "train.tsv", "--dev", task_dir / "dev.tsv", "--model", work / "model",
            "--scores", work / "scores.json", "--params", json.dumps(params)]


def test_glue_directory_missing_dev_tsv(work, caplog):
    task = write_glue_wnli(work / "glue_nodev" / "WNLI", with_dev=False)
    write_record(work / "scores.json", {"score": 0.5})
    before = snapshot(work)
    message = fails("finetune", finetune_args(work, task), caplog)
    assert f"{task / 'dev.tsv'} does not exist" in message
    assert snapshot(work) == before


def test_a_label_the_cap_left_out_is_blamed_on_the_cap(work, caplog):
    """Issue #28, 5: a label that max_train_examples' draw left out was blamed on dev.tsv."""
    task = work / "capped"
    task.mkdir()
    (task / "train.tsv").write_text("text\tlabel\n" + "".join(f"Example {i}.\t{'pos' if i else 'neg'}\n"
                                                              for i in range(40)))
    (task / "dev.tsv").write_text("text\tlabel\nGood.\tpos\nBad.\tneg\n")
    params = {**FINETUNE, "max_train_examples": 4, "task": {"format": "tsv", "path": str(task),
                                                             "text_columns": ["text"], "label_column": "label"}}
    args = ["--train", task / "train.tsv", "--dev", task / "dev.tsv", "--model", work / "model", "--scores",
            work / "scores.json", "--params", json.dumps(params)]
    message = fails("finetune", args, caplog)
    assert (f"{task / 'train.tsv'}: the 4 training examples that finetune.max_train_examples (4) draws with seed 1 "
            f"hold no example of label(s) ['neg'], which the file's 40 examples and the dev set have" in message)


@pytest.mark.parametrize("damage", ["a corrupt safetensors header", "a model type transformers does not know"])
def test_a_model_that_cannot_be_loaded_is_one_line(work, caplog, damage):
    """Issue #28, 5: a bad safetensors header or a custom model type ended in a raw traceback."""
    model = work / "model"
    if damage == "a corrupt safetensors header":
        weights = model / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[8:20] = b"NOT A HEADER"
        weights.write_bytes(bytes(data))
        expected = "could not be loaded: a .safetensors weight file is corrupt or truncated"
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "my_custom_bert"}))
        expected = "has model type `my_custom_bert` but Transformers does not recognize this architecture"
    message = fails("finetune", finetune_args(work, work / "glue" / "WNLI"), caplog)
    assert f"model {model} " in message and expected in message, message
    message = fails("teacher", extract_args(work, teacher_params(model)), caplog)
    assert f"teacher '{model}' " in message and expected in message, message


def test_label_outside_the_task_label_set(work, caplog):
    task = write_glue_wnli(work / "glue_bad" / "WNLI", train_labels=("0", "1", "1", "2", "0"))
    before = snapshot(work)
    message = fails("finetune", finetune_args(work, task), caplog)
    assert f"{task / 'train.tsv'}, line 5: label '2' is not one of the task's labels ['0', '1']" in message
    assert snapshot(work) == before


# A user's own task files (tsv, csv, jsonl): a row that does not fit the header, a missing label.
DEV = {"tsv": "text\tlabel\nGood.\tpos\nBad.\tneg\n", "csv": "text,label\nGood.,pos\nBad.,neg\n",
       "jsonl": '{"text": "Good.", "label": "pos"}\n{"text": "Bad.", "label": "neg"}\n'}
TASK_CASES = {
    # Issue #21, 1: the tab made "film." the label, "neg" an extra column.
    "tab inside a TSV text field": ("tsv", "text\tlabel\nGood film.\tpos\nBad\tfilm.\tneg\n",
                                    r"train\.tsv, line 3: 3 TSV fields, the header has 2 \(a tab inside a text field"),
    "comma inside an unquoted CSV field": ("csv", "text,label\nGood.,pos\nBad, really.,neg\n",
                                           r"train\.csv, line 3: 3 CSV fields, the header has 2 \(a comma inside"),
    # Issue #21, 2: blank labels became a class ''.
    "blank label in a TSV task": ("tsv", "text\tlabel\nGood.\tpos\nBad.\t \n",
                                  r"train\.tsv, line 3: the label is empty"),
    "blank label in a CSV task": ("csv", 'text,label\nGood.,pos\n"Bad, really.",\n',
                                  r"train\.csv, line 3: the label is empty"),
    # Beyond the issue: a quote left open swallowed the rest of the file into one field.
    "unclosed quote in a CSV task": ("csv", 'text,label\nGood.,pos\n"Bad.,neg\nFine.,pos\n',
                                     r"train\.csv, line 3: .*an unclosed quote\? close it"),
    # Beyond the issue: a null label became the class 'None'.
    "null label in a JSONL task": ("jsonl", '{"text": "Good.", "label": "pos"}\n{"text": "Bad.", "label": null}\n',
                                   r"train\.jsonl, line 2: field 'label' is null"),
    # Beyond the issue: a null text became the text 'None'.
    "null text in a JSONL task": ("jsonl", '{"text": "Good.", "label": "pos"}\n{"text": null, "label": "neg"}\n',
                                  r"train\.jsonl, line 2: field 'text' is null; a text is a string"),
    # Beyond the issue: of two columns with the label column's name, the first was read without a word.
    "label column named twice in the header": ("csv", "text,label,label\nGood.,pos,x\nBad.,neg,y\n",
                                               r"train\.csv: header names column\(s\) \['label'\] more than once"),
    # Beyond the issue: one class made a one-output model, which transformers trains as a regression.
    "a single label in the training file": ("tsv", "text\tlabel\nGood.\tpos\nFine.\tpos\n",
                                            r"train\.tsv: every training example has the label 'pos'"),
}


def user_task_args(work: Path, case: str) -> list:
    fmt, train, _ = TASK_CASES[case]
    task = work / "user_task"
    task.mkdir()
    (task / f"train.{fmt}").write_text(train)
    (task / f"dev.{fmt}").write_text(DEV[fmt])
    params = {**FINETUNE, "task": {"format": fmt, "path": str(task), "text_columns": ["text"],
                                   "label_column": "label"}}
    return ["--train", task / f"train.{fmt}", "--dev", task / f"dev.{fmt}", "--model", work / "model",
            "--scores", work / "scores.json", "--params", json.dumps(params)]


@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_bad_user_task_file(case, work, caplog):
    args = user_task_args(work, case)
    before = snapshot(work)
    message = fails("finetune", args, caplog)
    assert re.search(TASK_CASES[case][2], message), message
    assert snapshot(work) == before


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Spreadsheets export CSV with a UTF-8 byte-order mark; its header still names the text column."""
    from pipeline.data.tasks import read_split, task_spec

    (tmp_path / "train.csv").write_bytes("text,label\nGood.,pos\nBad.,neg\n".encode("utf-8-sig"))
    spec = task_spec({"format": "csv", "path": str(tmp_path), "text_columns": ["text"], "label_column": "label"})
    assert read_split(tmp_path / "train.csv", spec) == ([("Good.",), ("Bad.",)], ["pos", "neg"])


# ---- corpus inputs: checked with the config, before any job -------------------------------------------

def corpus_config(inputs: list[str], **corpus) -> dict:
    return {"corpus": {"inputs": inputs, "tokenizer": MINILM, **corpus}, "teachers": {"t": {"source": MINILM}},
            "students": {"s": {"objective": "mlm"}}, "tasks": {"x": {"format": "glue", "path": "glue/RTE"}}}


def corpus_input_problem(config: dict) -> str:
    from pipeline import config as cfg
    from pipeline.wiring.preflight import check_inputs
    from pipeline.wiring.workflow import Workflow

    with pytest.raises(cfg.ConfigError) as error:
        check_inputs(Workflow(cfg.validate(config)))
    return str(error.value)


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch, corpus_text) -> Path:
    """A working directory with a corpus directory in it: a text file, a note and an xz file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "part").mkdir(parents=True)
    shutil.copy(corpus_text, tmp_path / "data" / "a.txt")
    (tmp_path / "data" / "README.md").write_text("not corpus text")
    (tmp_path / "data" / "part" / "b.txt.xz").write_bytes(b"\xfd7zXZ\x00")
    (tmp_path / "data" / ".hidden").write_text("never read")
    (tmp_path / "glue" / "RTE").mkdir(parents=True)  # the task of corpus_config: its files are checked too
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "glue" / "RTE" / name).write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    return tmp_path / "data"


def test_a_corpus_glob_matching_nothing_stops_the_config(corpus_dir):
    """Issue #21, 3: the glob was dropped at parse; the stage then failed with an argparse message."""
    message = corpus_input_problem(corpus_config(["data/*.text"]))
    assert "config key 'corpus.inputs': corpus input 'data/*.text': no file matched" in message


def test_a_missing_corpus_path_stops_the_config_unless_a_rule_writes_it(corpus_dir):
    message = corpus_input_problem(corpus_config(["data/b.txt"]))
    assert "corpus input 'data/b.txt': no such file or directory" in message
    from pipeline import config as cfg
    from pipeline.wiring.preflight import check_inputs
    from pipeline.wiring.workflow import Workflow

    demo = {**corpus_config(["resources/bbc_news/pretrain.txt.gz"]), "demo_data": {"bbc_news": {"enabled": True}}}
    check_inputs(Workflow(cfg.validate(demo)))  # the bbc_news_data job writes it


def test_unknown_files_in_a_corpus_directory_stop_the_config_or_are_counted(corpus_dir, work):
    """Issue #21, 7: README.md and b.txt.xz were skipped without a word. Now an error naming them, or with
    corpus.unknown_files: skip left out and counted by suffix in the manifest (hidden files never count)."""
    message = corpus_input_problem(corpus_config(["data/"]))
    assert "corpus input 'data/': 2 file(s) whose suffix is no corpus format" in message
    assert "data/README.md" in message and "b.txt.xz" in message and ".hidden" not in message
    assert "corpus.unknown_files: skip" in message
    from pipeline import config as cfg
    from pipeline.wiring.preflight import check_inputs
    from pipeline.wiring.workflow import Workflow

    skipping = Workflow(cfg.validate(corpus_config(["data/"], unknown_files="skip")))
    check_inputs(skipping)
    assert skipping.corpus_inputs() == ["data/a.txt"]

    args = corpus_args(work, [corpus_dir])
    args[-1] = json.dumps({**json.loads(args[-1]), "unknown_files": "skip"})
    run_stage("corpus", args)
    manifest = json.loads((work / "corpus/manifest.json").read_text())
    assert manifest["skipped"]["unread_files"] == {".md": 1, ".xz": 1}
    assert manifest["inputs"] == [str(corpus_dir / "a.txt")]


def test_a_corpus_file_named_twice_stops_the_config(corpus_dir):
    """Beyond the issue: a directory and a glob over it read the same documents twice."""
    message = corpus_input_problem(corpus_config(["data/*.txt", "data/"], unknown_files="skip"))
    assert "corpus file data/a.txt is named twice in corpus.inputs (by 'data/*.txt' and 'data/')" in message


def test_a_corpus_directory_holding_the_results_stops_the_config(corpus_dir):
    """Beyond the issue: with results inside a corpus directory, the second run read the first run's
    outputs (parquet shards are a corpus format) or stopped on their other files."""
    config = {**corpus_config(["data/"], unknown_files="skip"), "results": "data/part/results"}
    message = corpus_input_problem(config)
    assert "corpus input 'data/': directory data/ holds the results directory data/part/results" in message


@pytest.mark.parametrize("inputs", [["results/corpus/shard-000.parquet"], ["results/corpus/*.parquet"],
                                    ["data/a.txt", "results/**/*.txt"], ["./results/../results/x.jsonl"]])
def test_a_corpus_input_inside_the_results_stops_the_config(corpus_dir, inputs):
    """Issue #28, 6: a file or glob inside results (not only a directory holding it) was accepted; the run read
    its own outputs as corpus and every later run rebuilt everything, or Snakemake reported a cycle."""
    (corpus_dir.parent / "results" / "corpus").mkdir(parents=True)
    (corpus_dir.parent / "results" / "corpus" / "shard-000.parquet").write_bytes(b"PAR1")
    message = corpus_input_problem({**corpus_config(inputs), "results": "results"})
    assert f"corpus input {inputs[-1]!r} lies in the results directory results" in message


def test_a_corpus_glob_beside_the_results_is_accepted(corpus_dir):
    """A glob whose directory also holds the results reads only what it matches there."""
    from pipeline import config as cfg
    from pipeline.wiring.preflight import check_inputs
    from pipeline.wiring.workflow import Workflow

    check_inputs(Workflow(cfg.validate({**corpus_config(["data/*.txt"]), "results": "data/results"})))


# ---- results: never the root, a system directory, or outside the working directory --------------------

RESULTS_CASES = {
    "/": "/ is not a directory of its own",
    "/etc": "/etc lies in the system directory /etc",
    "/usr/local/results": "/usr/local/results lies in the system directory /usr",
    "../escape": "it leads out of the working directory (..)",
    "runs/{date}": "braces are Snakemake wildcards",
    "notes.txt": "it is an existing file",
}


@pytest.mark.parametrize("results", sorted(RESULTS_CASES))
def test_results_outside_a_directory_of_its_own_is_refused(results, tmp_path, monkeypatch):
    """Issue #21, 6: `/`, `/etc` and `../escape` were accepted (a dry run planned outputs under /etc)."""
    from pipeline import config as cfg

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a file")
    expected = f"config key 'results': '{results}' is refused: {RESULTS_CASES[results]}"
    with pytest.raises(cfg.ConfigError, match=re.escape(expected)):
        cfg.validate({**corpus_config(["a.txt"]), "results": results})
    cfg.validate({**corpus_config(["a.txt"]), "results": str(tmp_path / "results")})


@pytest.mark.parametrize("key,value,expected", [
    ("results", "/etc", "config key 'results': '/etc' is refused"),
    ("inputs", ["resources/*.text"], "corpus input 'resources/*.text': no file matched"),
], ids=["results /etc", "corpus glob matching nothing"])
def test_snakemake_stops_before_planning_any_job(key, value, expected, tmp_path, mlm_teacher):
    """The two cases a dry run used to plan: through real Snakemake, nothing is planned or written."""
    from test_workflow import snakemake, tiny_config

    config = tiny_config(mlm_teacher)
    (config["corpus"] if key == "inputs" else config)[key] = value
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, configfile, "--dry-run")
    assert result.returncode == 1 and expected in result.stdout + result.stderr, result.stderr[-2000:]
    assert "Job stats" not in result.stdout and not (tmp_path / "results").exists()


# ---- stage 4: a corrupt target shard -------------------------------------------------------------------

def test_a_corrupt_target_shard_is_refused_by_its_own_record(work, caplog, encoder_teacher):
    """Issue #21, 5: a byte changed in a target shard's footer (no page checksum covers it) passed
    summarize_targets and was recorded as good. Each shard now has the record its job wrote; the summary
    verifies against it and names the command that writes the shard again."""
    params = {**teacher_params(encoder_teacher), "lambda": 0.05, "top_k": 4, "solver": "fista",
              "max_iterations": 10, "tolerance": 0}
    targets = work / "targets"
    for part in ("shard-000", "validation"):
        call("targets", params, corpus_part=work / f"corpus/{part}.parquet",
             corpus_manifest=work / "corpus/manifest.json", dictionary=work / "dictionary/D.npy",
             dictionary_metrics=work / "dictionary/metrics.json", targets=targets / f"{part}.parquet")
    shard = targets / "shard-000.parquet"
    data = shard.read_bytes()
    where = data.rindex(b'"mean_nnz": ') + len(b'"mean_nnz": ')  # the statistics in the footer's metadata
    shard.write_bytes(data[:where] + (b"9" if data[where:where + 1] != b"9" else b"8") + data[where + 1:])
    args = ["--shards", shard, "--validation", targets / "validation.parquet", "--manifest", targets / "manifest.json",
            "--params", json.dumps(params)]
    message = fails("target_summary", args, caplog)
    assert f"{shard} is corrupt: its sha256 differs from {targets / 'shard-000.json'}" in message
    assert f"snakemake --forcerun {shard}" in message
    assert not (targets / "manifest.json").exists()


# ---- a full disk ----------------------------------------------------------------------------------

def mount_tmpfs(directory: Path, size_kb: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(directory)],
                          capture_output=True).returncode == 0


def test_full_disk_fails_cleanly_and_a_rerun_after_freeing_space_completes(work, caplog, monkeypatch, corpus_text):
    disk = work / "small_disk"
    needed_kb = sum(p.stat().st_size for p in (work / "corpus").glob("*.parquet")) // 1024
    mounted = mount_tmpfs(disk, max(8, needed_kb // 2))
    try:
        args = corpus_args(work, [corpus_text])
        args[args.index("--shards") + 1 : args.index("--manifest") + 2] = [
            disk / "shard-000.parquet", disk / "shard-001.parquet", "--validation", disk / "validation.parquet",
            "--token-counts", disk / "token_counts.npy", "--manifest", disk / "manifest.json"]
        if not mounted:  # no tmpfs without privileges: the same error, injected where arrow writes
            import pyarrow.parquet as pq

            real = pq.write_table

            def full(*a, **k):
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(pq, "write_table", full)
        message = fails("corpus", args, caplog)
        assert "no space left on the device while writing" in message and str(disk) in message
        # No temporary and no manifest: a shard written before the disk filled is whole but unlisted,
        # so nothing trusts it (under Snakemake, the failed job's outputs are removed too).
        assert not [p for p in disk.iterdir() if p.name.startswith(".")] and not (disk / "manifest.json").exists()
        for shard in disk.glob("*.parquet"):
            read_shard(shard)
        if mounted:  # free space: grow the file system
            # Room for the shards and their spill (lz4-compressed arrow, read once before the shards are written).
            subprocess.run(["mount", "-o", f"remount,size={needed_kb * 8 + 256}k", str(disk)], check=True)
        else:
            monkeypatch.setattr(pq, "write_table", real)
        run_stage("corpus", args)
        assert snapshot(disk) and (disk / "manifest.json").exists()
    finally:
        if mounted:
            # Lazy: arrow may still hold a file of it open; the mount goes once that is closed.
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


# ---- the config: validated before any job, nothing touched -----------------------------------------

CONFIG_CASES = {
    "wrong type": (("corpus", "max_seq_len"), "long", "corpus.max_seq_len"),
    "negative size": (("corpus", "shards"), -2, "corpus.shards"),
    "unknown key": (("dictionary", "atomz"), 8, "dictionary.atomz': unknown key"),
    "unknown objective": (("students", "mlm", "objective"), "mlx", "students.mlm.objective"),
    "K = 0": (("dictionary", "atoms"), 0, "dictionary.atoms"),
    "lambda < 0": (("dictionary", "lambda"), -0.1, "dictionary.lambda"),
    "top-k > K": (("targets", "top_k"), 100, "targets.top_k': 100 is larger than dictionary.atoms"),
    # Issue #28: NaN passes every schema bound, and crashed inside the job after Snakemake deleted the outputs.
    "NaN learning rate": (("finetune", "learning_rate"), float("nan"), "finetune.learning_rate': nan is not a finite"),
    "NaN lambda": (("dictionary", "lambda"), float("nan"), "dictionary.lambda': nan is not a finite number"),
    "NaN mask fraction": (("pretrain", "mask_fraction"), float("nan"), "pretrain.mask_fraction': nan is not a finite"),
    "infinite weight decay": (("finetune", "weight_decay"), float("inf"), "finetune.weight_decay': inf is not a"),
    "seed beyond 64 bits": (("finetune", "seeds"), [2**64], "finetune.seeds.0': 18446744073709551616 does not fit"),
    "seed beyond 32 bits": (("corpus", "seed"), 2**40, "corpus.seed': 1099511627776 is greater than the maximum"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_fails_before_any_job(case, workflow_run, tmp_path):
    from test_workflow import snakemake

    workdir, _, config = workflow_run
    keys, value, expected = CONFIG_CASES[case]
    bad = json.loads(json.dumps(config))
    node = bad
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(bad))
    before = snapshot(workdir / "results")
    result = snakemake(workdir, configfile)
    assert result.returncode == 1
    assert expected in result.stdout + result.stderr, result.stderr[-2000:]
    assert snapshot(workdir / "results") == before


@pytest.mark.e2e
def test_a_key_given_twice_in_the_config_file_stops_the_run(workflow_run, tmp_path):
    """Issue #28: YAML keeps the second of two equal keys silently; a student written twice would have been
    trained as the second one, over the first's outputs."""
    from test_workflow import snakemake

    workdir, _, config = workflow_run
    students = config["students"]
    text = yaml.safe_dump({k: v for k, v in config.items() if k != "students"}) + "students:\n"
    text += "".join(f"  {name}: {json.dumps(options)}\n" for name, options in students.items())
    name = next(iter(students))
    text += f"  {name}: {json.dumps({**students[name], 'max_steps': 1})}\n"
    configfile = tmp_path / "twice.yaml"
    configfile.write_text(text)
    before = snapshot(workdir / "results")
    result = snakemake(workdir, configfile, "--dry-run")
    assert result.returncode == 1
    assert f"key '{name}' is given twice in one mapping" in result.stdout + result.stderr, result.stderr[-2000:]
    assert str(configfile) in result.stdout + result.stderr
    assert snapshot(workdir / "results") == before


def test_records_and_manifests_name_what_is_wrong(tmp_path):
    """The helpers under every case above: a truncated or edited record, an altered listed file."""
    from pipeline.common import StageError
    from pipeline.data.integrity import read_record, read_verified

    (tmp_path / "data.bin").write_bytes(b"x" * 100)
    write_record(tmp_path / "manifest.json", {"files": file_entries(tmp_path, [tmp_path / "data.bin"])})
    read_verified(tmp_path / "manifest.json", [tmp_path / "data.bin"])
    (tmp_path / "data.bin").write_bytes(b"y" * 100)
    with pytest.raises(StageError, match=f"data.bin is corrupt: its sha256 differs.*snakemake --forcerun {tmp_path}"):
        read_verified(tmp_path / "manifest.json", [tmp_path / "data.bin"])
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text.replace('"bytes": 100', '"bytes": 101'))
    with pytest.raises(StageError, match="manifest.json was modified after it was written"):
        read_record(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(StageError, match="manifest.json is truncated or not JSON"):
        read_record(tmp_path / "manifest.json")
    assert contract.CORPUS_MANIFEST.endswith("manifest.json")
