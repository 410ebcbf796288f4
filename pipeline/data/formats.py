"""Readers and writers of the data files in the contract (pipeline/data/contract.py), one place for each format.

Stages never read each other's outputs with code of their own: a corpus shard, a target shard, the
activation store and the dictionary are read and written here. Every writer is atomic (pipeline.data.integrity);
parquet files carry page checksums, so a reader detects a corrupt page as well as a truncated file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..common import StageError
from . import contract
from .integrity import atomic_output, file_entries, hash_threads, read_verified, write_record

ROW_GROUP_ROWS = 8192  # sequences per parquet row group: later stages stream shards group by group
STORE_CHUNK_ROWS = 16384  # rows per zarr chunk of the store: large sequential reads for the dictionary stage
TARGET_STATS_KEY = b"mlsm_target_stats"
# Plain byte-stream-split values with fast zstd: reads back ~3x faster than dictionary encoding on one
# core (the list decoding dominates) and is smaller too (bench/targets.py).
TARGET_ENCODING = {"use_dictionary": False, "compression_level": 1,
                   "column_encoding": {"atom_counts.list.element": "BYTE_STREAM_SPLIT",
                                       "atom_ids.list.element": "BYTE_STREAM_SPLIT",
                                       "weights.list.element": "BYTE_STREAM_SPLIT"}}


# ---- parquet -----------------------------------------------------------------------------------

def write_parquet(path: str | Path, table: pa.Table, **options) -> None:
    """Atomically, with page checksums. `options` go to pyarrow's write_table (encodings, compression level)."""
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, **{"compression": "zstd", "row_group_size": ROW_GROUP_ROWS, **options},
                       write_page_checksum=True)


def read_parquet(path: str | Path, schema: pa.Schema, what: str) -> pa.Table:
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{what} {path} is unreadable: {err}") from None
    if not table.schema.remove_metadata().equals(schema):
        raise StageError(f"{what} {path} does not have the {what} schema")
    return table


def flat_list(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1], values) of a list column, without copying it row by row. A sliced list array keeps
    its parent's values: the rows are values[offsets[0]:offsets[-1]]."""
    array = table[column].combine_chunks()
    return np.asarray(array.offsets, dtype=np.int64), np.asarray(array.values)


def pad_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray, fill: int,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a flattened list column (row i is values[offsets[i]:offsets[i+1]]), right-padded to
    `width` (default: the longest): (index into values [len(rows), width], -1 in padding; the values)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    width = int(lengths.max()) if width is None else width
    columns = np.arange(width)
    index = np.where(columns < lengths[:, None], starts[:, None] + columns, -1)
    return index, np.where(index >= 0, values[np.maximum(index, 0)], fill)


# ---- corpus shards (stage 1) -------------------------------------------------------------------

def read_shard(path: str | Path) -> pa.Table:
    return read_parquet(path, contract.CORPUS_SCHEMA, "corpus shard")


def iter_shard(path: str | Path, batch_rows: int = ROW_GROUP_ROWS) -> Iterator[pa.RecordBatch]:
    """A corpus shard in record batches (memory: one batch, whatever the shard's size)."""
    try:
        reader = pq.ParquetFile(path, page_checksum_verification=True)
        if not reader.schema_arrow.remove_metadata().equals(contract.CORPUS_SCHEMA):
            raise StageError(f"corpus shard {path} does not have the corpus shard schema")
        yield from reader.iter_batches(batch_size=batch_rows)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"corpus shard {path} is unreadable: {err}") from None


def shard_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Table]:
    """A corpus shard as flat arrays: (offsets from 0, token ids, token type ids, the table)."""
    table = read_shard(path)
    offsets, tokens = flat_list(table, "input_ids")
    _, types = flat_list(table, "token_type_ids")
    # A sliced list array keeps its parent's values: index from its first row.
    return offsets - offsets[0], tokens[offsets[0]:offsets[-1]], types[offsets[0]:offsets[-1]], table


def write_token_counts(path: str | Path, counts: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, counts, allow_pickle=False)


def read_token_counts(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# ---- target shards (stage 4) -------------------------------------------------------------------

def write_targets(path: str | Path, seq_ids: pa.Array, offsets: np.ndarray, counts: np.ndarray, atoms: np.ndarray,
                  weights: np.ndarray, stats: dict, record: str | Path | None = None) -> None:
    """A target shard: per sequence (seq_ids, position offsets from 0) the entry count of each position and
    the positions' (atom id, weight) entries one after another; the shard's statistics in its metadata."""
    if len(atoms) >= 2**31:  # the list columns' offsets are int32
        raise StageError(f"target shard {path} would hold {len(atoms):,} (atom, weight) entries, more than a "
                         "column can (2^31); use more corpus shards (corpus.shards) or a top_k cut")
    entry_offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[offsets]
    list_offsets, entry_offsets = pa.array(offsets, pa.int32()), pa.array(entry_offsets, pa.int32())
    table = pa.table({
        "seq_id": seq_ids,
        "atom_counts": pa.ListArray.from_arrays(list_offsets, pa.array(counts, pa.uint16())),
        "atom_ids": pa.ListArray.from_arrays(entry_offsets, pa.array(atoms, pa.uint16())),
        "weights": pa.ListArray.from_arrays(entry_offsets, pa.array(weights, pa.float16())),
    }, schema=contract.TARGET_SCHEMA.with_metadata({TARGET_STATS_KEY: json.dumps(stats).encode()}))
    write_parquet(path, table, **TARGET_ENCODING)
    # The shard's own record, written by the job that wrote it: any reader can verify the shard's bytes.
    record = Path(record or target_record_path(path))
    write_record(record, {"format_version": contract.FORMAT_VERSION["targets"], "dictionary": stats.get("dictionary"),
                          "tokens": stats["tokens"], "files": file_entries(record.parent, [path])})


def target_record_path(shard: str | Path) -> Path:
    """The record beside a target shard (contract.TARGET_PART_RECORD): its size and sha256."""
    return Path(shard).with_suffix(".json")


def verified_target_shards(shards: list[str], base: str | Path, records: list[str] | None = None) -> dict[str, dict]:
    """Check each target shard against the record its job wrote (`records`, in the order of the shards, or
    the one beside each), integrity.hash_threads() shards at a time; their entries ({bytes, sha256}) by path
    relative to `base`, for a record that lists them."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = list(zip(map(Path, shards), records or map(target_record_path, shards), strict=True))
    with ThreadPoolExecutor(hash_threads()) as pool:
        records_read = list(pool.map(lambda pair: read_verified(pair[1], [pair[0]]), pairs))
    return {shard.relative_to(base).as_posix(): record["files"][shard.name]
            for (shard, _), record in zip(pairs, records_read)}


def target_entries(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A target shard's entries as flat arrays: (entry offsets per token [tokens + 1] from 0, atom ids,
    weights); token t's entries are atoms[offsets[t]:offsets[t+1]]."""
    count_offsets, counts = flat_list(table, "atom_counts")
    entry_offsets, atoms = flat_list(table, "atom_ids")
    _, weights = flat_list(table, "weights")
    counts = counts[count_offsets[0]:count_offsets[-1]]
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] != entry_offsets[-1] - entry_offsets[0]:
        raise StageError("target shard: its atom counts do not add up to its entries")
    return offsets, atoms[entry_offsets[0]:entry_offsets[-1]], weights[entry_offsets[0]:entry_offsets[-1]]


def gather_entries(offsets: np.ndarray, atoms: np.ndarray, weights: np.ndarray,
                   tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of some tokens as [len(tokens), widest] arrays (atom 0 and weight 0 in padding)."""
    starts, counts = offsets[tokens], offsets[tokens + 1] - offsets[tokens]
    width = max(1, int(counts.max())) if len(tokens) else 1
    columns = np.arange(width)
    index = starts[:, None] + columns
    valid = columns < counts[:, None]
    index = np.where(valid, index, 0)
    return (np.where(valid, atoms[index] if len(atoms) else 0, 0).astype(np.uint16),
            np.where(valid, weights[index] if len(weights) else 0, 0).astype(np.float16))


def read_targets(path: str | Path) -> pa.Table:
    return read_parquet(path, contract.TARGET_SCHEMA, "target shard")


def target_stats(path: str | Path) -> dict:
    """The statistics a target shard carries in its metadata, read from the file's footer alone (reading the
    table decoded every entry: 45 MB/s, four hours for the paper preset's 648 GB of targets)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"target shard {path} is unreadable: {err}") from None
    if not schema.remove_metadata().equals(contract.TARGET_SCHEMA):
        raise StageError(f"target shard {path} does not have the target shard schema")
    metadata = schema.metadata or {}
    if TARGET_STATS_KEY not in metadata:
        raise StageError(f"target shard {path} has no statistics; it was not written by this stage")
    return json.loads(metadata[TARGET_STATS_KEY])


# ---- activation store (stage 2) ----------------------------------------------------------------

class ActivationStore:
    """The zarr store being written, appended unit by unit in a work directory (it survives a kill).

    Appends run in a background thread (compressing and writing chunks overlaps the teacher's next
    batches); at most one is pending, and flush() waits for it."""

    ARRAYS = {"states": np.float16, "token_ids": np.int32, "seq_ids": np.int64, "positions": np.int16}

    def __init__(self, path: Path, hidden_size: int, chunk_rows: int, rows: int):
        import zarr

        self.path = path
        if rows == 0:
            group = zarr.open_group(str(path), mode="w")
            for name, dtype in self.ARRAYS.items():
                shape = (0, hidden_size) if name == "states" else (0,)
                group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk_rows,) + shape[1:])
        self.group = zarr.open_group(str(path), mode="r+")
        for name in self.ARRAYS:  # drop rows a killed attempt appended after its last checkpoint
            array = self.group[name]
            if array.shape[0] < rows:
                raise StageError(f"{path} holds {array.shape[0]} rows, fewer than its checkpoint's {rows}")
            array.resize((rows,) + array.shape[1:])
        self.rows = rows
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="zarr-append")
        self._pending = None

    def append(self, **arrays: np.ndarray) -> None:
        self.flush()
        arrays = {name: data.astype(self.ARRAYS[name], copy=False) for name, data in arrays.items()}
        self._pending = self._writer.submit(self._write, arrays)
        self.rows += len(arrays["states"])

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        for name, data in arrays.items():
            self.group[name].append(data)

    def flush(self) -> None:
        """Wait for the pending append (and raise its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()

    def publish(self, out: str, manifest: str, attrs: dict) -> None:
        """Give the finished store its attributes, move it into place atomically, then write its record."""
        self.close()
        self.group.attrs.update(attrs)
        with atomic_output(out) as tmp:
            shutil.move(str(self.path), str(tmp))
        write_record(manifest, {**attrs, "files": file_entries(Path(manifest).parent, [out])})


def write_store(out: str, manifest: str, attrs: dict, **arrays: np.ndarray) -> None:
    """A whole store at once (states, token_ids, seq_ids, positions), then its record."""
    with tempfile.TemporaryDirectory(prefix=".work.", dir=Path(out).parent) as work:
        store = ActivationStore(Path(work) / "activations.zarr", arrays["states"].shape[1],
                                min(STORE_CHUNK_ROWS, max(1, len(arrays["states"]))), 0)
        store.append(**arrays)
        store.publish(out, manifest, attrs)


def open_store(path: str | Path) -> tuple[dict, dict]:
    """The attributes and the (lazy) arrays of an activation store: zarr, or HDF5 (.h5, pipeline/hdf5.py)."""
    import zarr

    from .. import hdf5

    if hdf5.is_hdf5(path):
        return hdf5.open_store(path)

    try:
        group = zarr.open_group(str(path), mode="r")
        return dict(group.attrs), {name: group[name] for name in contract.ACTIVATION_ARRAYS}
    except Exception as err:  # zarr raises several types for missing or corrupt stores
        raise StageError(f"activation store {path} is unreadable: {err}") from None


def read_store(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The attributes and arrays of an activation store (verify it against its manifest first)."""
    attrs, arrays = open_store(path)
    try:
        return attrs, {name: array[...] for name, array in arrays.items()}
    except Exception as err:  # zarr raises several types for missing or corrupt stores
        raise StageError(f"activation store {path} is unreadable: {err}") from None


# ---- dictionary (stage 3) ----------------------------------------------------------------------

def write_dictionary(path: str | Path, dictionary: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, dictionary.astype(np.float32))


def load_dictionary(path: str | Path) -> np.ndarray:
    """The dictionary [d, K] (verify it against the stage's metrics record first)."""
    try:
        dictionary = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StageError(f"dictionary {path} is unreadable: {err}") from None
    if dictionary.ndim != 2 or not np.allclose(np.linalg.norm(dictionary, axis=0), 1, atol=1e-3):
        raise StageError(f"dictionary {path} is not a [d, K] matrix with unit-norm columns")
    return dictionary
