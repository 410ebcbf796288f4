"""Hugging Face datasets as corpus input (pipeline/data/hfdata.py), on datasets the tests build locally: a
save_to_disk Dataset and DatasetDict, and a local dataset directory of parquet data files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import config as cfg
from pipeline.common import StageError
from pipeline.corpus import shard
from pipeline.data import hfdata
from pipeline.data.text import input_files, read_documents
from pipeline.wiring.workflow import Workflow

from conftest import MINILM, REPO, venv_env
from test_workflow import tiny_config

datasets = pytest.importorskip("datasets")

READING = {"text_field": "text", "split": "train", "dataset_config": None}


@pytest.fixture(scope="module")
def articles(corpus_text) -> list[str]:
    """The real BBC articles of the test corpus, one string per article."""
    return [doc.strip() for doc in corpus_text.read_text().split("\n\n") if doc.strip()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, articles):
    """The articles as a save_to_disk Dataset (with an id column) and as a DatasetDict with two splits."""
    out = tmp_path_factory.mktemp("hf")
    table = {"id": list(range(len(articles))), "text": articles}
    datasets.Dataset.from_dict(table).save_to_disk(str(out / "dataset"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                          "validation": datasets.Dataset.from_dict({"id": [0], "text": articles[:1]})}
                         ).save_to_disk(str(out / "splits"))
    return out


def shards_of(tmp_path, name, inputs, **params):
    out = tmp_path / name
    paths = [str(out / "shard-000.parquet"), str(out / "shard-001.parquet")]
    manifest = shard(input_files(inputs), paths, str(out / "manifest.json"),
                     {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0, **params})
    return [pq.read_table(p) for p in paths], manifest


def test_a_saved_dataset_shards_exactly_like_the_same_text_in_jsonl(tmp_path, saved, articles):
    jsonl = tmp_path / "articles.jsonl"
    jsonl.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    expected, _ = shards_of(tmp_path, "jsonl", [str(jsonl)])
    for spec in (f"hf:{saved / 'dataset'}", str(saved / "dataset")):  # hf: or the directory as it is
        tables, manifest = shards_of(tmp_path, spec.replace("/", "_"), [spec])
        assert all(a.equals(b) for a, b in zip(tables, expected))
        assert manifest["inputs"] == [f"hf:{saved / 'dataset'}"] and manifest["documents"] == len(articles)


def test_the_split_and_the_text_column_are_chosen_and_checked(saved, articles):
    source = hfdata.DatasetInput(str(saved / "splits"))
    assert list(read_documents(source, {**READING, "split": "validation"})) == [articles[0].split("\n")]
    with pytest.raises(StageError, match=r"no split 'test' \(corpus.split; it has train, validation\)"):
        list(read_documents(source, {**READING, "split": "test"}))
    with pytest.raises(StageError, match=r"no column 'body' \(corpus.text_field; columns: id, text\)"):
        list(read_documents(source, {**READING, "text_field": "body"}))


def test_a_local_dataset_directory_is_streamed_by_split(tmp_path, articles):
    data = tmp_path / "local" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"text": articles[:5]}), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": articles[5:7]}), data / "test-00000-of-00001.parquet")
    source = hfdata.parse_input(f"hf:{tmp_path / 'local'}")
    assert isinstance(hfdata.open_dataset(source, {**READING, "split": "test"}), datasets.IterableDataset)
    assert list(read_documents(source, {**READING, "split": "test"})) == [a.split("\n") for a in articles[5:7]]


def test_a_saved_dataset_is_memory_mapped_and_read_a_batch_at_a_time(saved, monkeypatch):
    source = hfdata.DatasetInput(str(saved / "dataset"))
    data = hfdata.open_dataset(source, READING)
    assert [f["filename"].startswith(str(saved / "dataset")) for f in data.cache_files] == [True]  # not in memory
    monkeypatch.setattr(hfdata, "BATCH_ROWS", 4)
    batches = []
    original = datasets.Dataset.iter

    def counted(self, batch_size, **kwargs):
        for batch in original(self, batch_size, **kwargs):
            batches.append(len(batch["text"]))
            yield batch

    monkeypatch.setattr(datasets.Dataset, "iter", counted)
    rows = hfdata.texts(source, READING)
    next(rows)
    assert batches == [4]  # one batch read for the first row, not the dataset


def test_memory_does_not_grow_with_a_streamed_dataset(tmp_path):
    """Arrow memory while reading a 130 MB local dataset stays a few batches (the reader's read-ahead), not
    the data file (iterating it in Python format held on to most of what was read)."""
    (tmp_path / "big" / "data").mkdir(parents=True)
    text = pa.array([f"{i} " + "word " * 200 for i in range(131_072)])  # distinct, so not dictionary-encoded
    pq.write_table(pa.table({"text": text}), tmp_path / "big" / "data" / "train-00000-of-00001.parquet",
                   row_group_size=1024)
    source = hfdata.parse_input(f"hf:{tmp_path / 'big'}")
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # its own peak, whatever the tests before allocated
    pa.set_memory_pool(pool)
    try:
        rows = sum(1 for _ in hfdata.texts(source, READING))
    finally:
        pa.set_memory_pool(default)
    assert rows == len(text)
    assert pool.max_memory() < text.nbytes / 4, (pool.max_memory(), text.nbytes)


def test_a_hub_dataset_is_not_downloaded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match=r"hf:no-such-owner/no-such-dataset.*set HF_HUB_OFFLINE=0 to download it"):
        list(read_documents(hfdata.parse_input("hf:no-such-owner/no-such-dataset"), READING))


def test_an_empty_dataset_name_is_a_config_error(tmp_path):
    config = tiny_config(tmp_path)
    config["corpus"]["inputs"] = ["hf:"]
    with pytest.raises(cfg.ConfigError, match="config key 'corpus.inputs': 'hf:' names no dataset"):
        cfg.validate(config)


def test_the_workflow_tracks_local_datasets_and_passes_hub_ids_to_the_stage(tmp_path, saved):
    config = tiny_config(tmp_path / "teacher")
    config["corpus"]["inputs"] = [f"hf:{saved / 'dataset'}", "hf:someone/corpus"]
    workflow = Workflow(cfg.validate(config))
    assert workflow.corpus_inputs() == [str(saved / "dataset")]  # what Snakemake tracks
    assert workflow.arguments("text") == [f"hf:{saved / 'dataset'}", "hf:someone/corpus"]
    assert workflow.model_card()["datasets"] == ["someone/corpus"]
    assert {"split", "dataset_config"} <= set(json.loads(workflow.params("shard_corpus", {})))  # they rerun it
    configfile = tmp_path / "hf.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                             "--directory", str(tmp_path), "--configfile", str(configfile), "--dry-run",
                             "--printshellcmds", "results/corpus/manifest.json"],
                            capture_output=True, text=True, env=venv_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    command = next(line for line in result.stdout.splitlines() if "-m pipeline.corpus" in line)
    assert re.search(rf"--text hf:{re.escape(str(saved / 'dataset'))} hf:someone/corpus\s+--shards", command)
