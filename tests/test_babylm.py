"""The BabyLM branch end to end through real Snakemake: a tokenizer trained on the corpus, an auxiliary
teacher pre-trained from scratch with MLM on the shards, then MLSM and KD students from that teacher."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from pipeline.data import contract
from pipeline.data.formats import read_store
from pipeline.data.integrity import read_record
from pipeline.models import tokenizer_fingerprint

from test_workflow import planned_jobs, snakemake

CONFIG = {
    "results": "results", "device": "cpu",
    "demo_data": {"bbc_news": {"enabled": True, "dev_fraction": 0.1, "pretrain_articles": 30, "seed": 13}},
    "corpus": {"inputs": ["resources/bbc_news/pretrain.txt.gz"], "tokenizer": "train", "max_seq_len": 64,
               "shards": 2, "validation_fraction": 0.1, "packing": "contiguous", "threads": 2},
    "tokenizer_training": {"model": "wordpiece", "vocab_size": 1500, "lowercase": True},
    "teachers": {"aux": {"source": "auxiliary", "layer": -1, "batch_size": 8,
                         "auxiliary": {"size": "tiny", "max_steps": 6, "batch_size": 8}}},
    "activations": {"sample_tokens": 800, "subsample": "w2v", "subsample_threshold": 1e-3},
    "dictionary": {"atoms": 16, "batch_size": 128, "epochs": 1, "heldout_tokens": 100, "code_iterations": 20,
                   "browse_atoms": 3},
    "targets": {"top_k": 4, "max_iterations": 30, "batch_size": 16},
    "pretrain": {"size": "tiny", "max_steps": 3, "batch_size": 8},
    "students": {"mlsm": {"objective": "mlsm", "teacher": "aux"}, "kd": {"objective": "kd", "teacher": "aux"}},
    "finetune": {"seeds": [1], "epochs": 1, "batch_size": 16, "max_seq_len": 64, "max_train_examples": 32},
    "tasks": {"bbc_topic": {"format": "tsv", "path": "resources/bbc_news/topic", "text_columns": ["text"],
                            "label_column": "label", "metric": "accuracy"}},
}


@pytest.mark.e2e
def test_trained_tokenizer_and_auxiliary_teacher_end_to_end(tmp_path):
    configfile = tmp_path / "babylm.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG))
    run = snakemake(tmp_path, configfile)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = tmp_path / "results"

    tokenizer = AutoTokenizer.from_pretrained(results / contract.TOKENIZER)
    assert len(tokenizer) <= 1500 and tokenizer.cls_token_id == 2
    corpus = read_record(results / contract.CORPUS_MANIFEST)
    assert corpus["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert corpus["validation"]["documents"] > 0

    summary = read_record(results / contract.AUXILIARY_SUMMARY.format(teacher="aux"))
    assert summary["objective"] == "mlm" and summary["steps"] == 6
    attrs, arrays = read_store(results / contract.ACTIVATIONS.format(teacher="aux"))
    assert attrs["source"].endswith(contract.AUXILIARY_TEACHER.format(teacher="aux"))
    assert arrays["states"].shape[0] == 800 and int(arrays["token_ids"].max()) < len(tokenizer)
    for student in CONFIG["students"]:
        assert read_record(results / contract.STUDENT_SUMMARY.format(student=student))["steps"] == 3
    assert "| mlsm |" in (results / contract.REPORT_MD).read_text()

    # Another vocabulary size retrains the tokenizer and everything after it; more teacher updates
    # rerun the teacher's branch but not the corpus.
    for change, first in (({"tokenizer_training": {**CONFIG["tokenizer_training"], "vocab_size": 1200}},
                           "train_tokenizer"),
                          ({"teachers": {"aux": {**CONFIG["teachers"]["aux"],
                                                 "auxiliary": {"size": "tiny", "max_steps": 7, "batch_size": 8}}}},
                           "pretrain_teacher")):
        other = tmp_path / "changed.yaml"
        other.write_text(yaml.safe_dump({**json.loads(json.dumps(CONFIG)), **change}))
        jobs = planned_jobs(snakemake(tmp_path, other, "--dry-run"))
        assert first in jobs and jobs.get("shard_corpus", 0) == (first == "train_tokenizer"), jobs
