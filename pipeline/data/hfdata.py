"""Hugging Face datasets as corpus input: `hf:<name>` in corpus.inputs, or a directory saved with
`save_to_disk` given as it is.

<name> is a directory saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
load_from_disk: the arrow files are memory-mapped), a local dataset directory that `load_dataset` reads
(data files such as data/train-*.parquet, and its README's configs), or a hub id (read from the local cache
under HF_HUB_OFFLINE=1, as `make` and the tests set it; downloaded where it is 0 or unset, as transformers
does). The split (corpus.split), the configuration (corpus.dataset_config) and the text column
(corpus.text_field) are configurable; the rows are read in Arrow batches, memory-mapped or streamed, so
memory does not grow with the dataset. A row's text is a document, its lines its
sentences, as for jsonl and parquet inputs.

The `datasets` package is optional (pip install 'mlsm-pipeline[hf]') and imported only when such an
input is read: recognising one (at every parse of the workflow) needs no import.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..common import StageError

PREFIX = "hf:"
BATCH_ROWS = 1024
SAVED_DATASET = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes besides its arrow files
SAVED_DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class DatasetInput:
    """A corpus input read through the `datasets` package."""

    name: str  # a save_to_disk directory, a local dataset directory, or a hub id

    def __str__(self) -> str:
        return PREFIX + self.name

    @property
    def local(self) -> Path | None:
        """Its directory on this machine (what Snakemake tracks), or None for a hub id."""
        path = Path(self.name)
        return path if path.exists() else None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / SAVED_DATASET_DICT).is_file() or all((path / f).is_file() for f in SAVED_DATASET))


def parse_input(pattern: str) -> DatasetInput | None:
    """The dataset an input names: hf:<name>, or a directory saved with save_to_disk; else None."""
    if pattern.startswith(PREFIX):
        name = pattern[len(PREFIX):]
        if not name:
            raise StageError(f"corpus input {pattern!r}: name a dataset after {PREFIX}")
        return DatasetInput(name)
    return DatasetInput(pattern) if is_saved_dataset(Path(pattern)) else None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise StageError("Hugging Face dataset inputs (hf:...) need the datasets package: "
                         "pip install 'mlsm-pipeline[hf]'") from None
    datasets.disable_progress_bars()
    return datasets


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def open_dataset(source: DatasetInput, options: dict):
    """The split of the dataset, as a memory-mapped Dataset or a streaming IterableDataset."""
    datasets = _datasets()
    split, config = options["split"], options["dataset_config"]
    local = source.local
    try:
        if local is not None and is_saved_dataset(local):
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise StageError(f"corpus input {source}: no split {split!r} (corpus.split; it has "
                                     f"{', '.join(data)})")
                data = data[split]
            return data
        # Streaming reads a local dataset or the hub row by row; offline, a hub dataset comes from the cache.
        return datasets.load_dataset(source.name, config, split=split, streaming=local is not None or not offline())
    except StageError:
        raise
    except Exception as err:  # datasets raises many types for missing, offline or malformed datasets
        hint = " (offline: set HF_HUB_OFFLINE=0 to download it)" if local is None and offline() else ""
        raise StageError(f"corpus input {source}: cannot be read as a Hugging Face dataset: {err}{hint}") from None


def texts(source: DatasetInput, options: dict) -> Iterator[tuple[int, object]]:
    """(row number, the text column's value) of every row, a batch at a time."""
    data = open_dataset(source, options)
    key = options["text_field"]
    columns = data.column_names
    if columns is not None and key not in columns:
        raise StageError(f"corpus input {source}: no column {key!r} (corpus.text_field; columns: "
                         f"{', '.join(columns)})")
    row = 0
    # Batches as Arrow tables: iterating a streamed dataset in Python format holds on to what its reader has
    # decoded ahead (memory grew with the data file), in Arrow format it stays a few batches.
    for batch in data.select_columns([key]).with_format("arrow").iter(batch_size=BATCH_ROWS):
        for value in batch.column(key).to_pylist():
            yield row, value
            row += 1


def documents(source: DatasetInput, options: dict, skipped, split_sentences: Callable) -> Iterator[list[str]]:
    """The documents (lists of sentences) of a dataset input, in row order."""
    for row, text in texts(source, options):
        where = f"{source}, row {row}"
        if not isinstance(text, str):
            skipped.bad("record_without_text", f"{where}: {options['text_field']!r} is not a string "
                                               "(corpus.text_field)")
            continue
        yield split_sentences(text, where, options, skipped)
