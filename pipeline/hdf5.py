"""HDF5 interchange (h5py): the activation store, a dictionary and target shards written to HDF5 files
that MATLAB, Julia, R or SPAMS-era scripts read, and teacher states computed elsewhere read back as an
activation store.

The layout (pipeline/data/contract.py, "HDF5 interchange"; arrays as numpy shapes them, C order: MATLAB's
h5read and Julia's HDF5.jl show them transposed):
- activation store: /states float16 [N, d] (raw hidden states, rows chunked like the zarr store),
  /token_ids int32 [N], /seq_ids int64 [N], /positions int16 [N]; the store's attributes as root
  attributes (nested ones as JSON text). States computed elsewhere need /states and /token_ids (ids in
  the corpus tokenizer's vocabulary); /seq_ids and /positions default to -1 (unknown), and a root
  `tokenizer_fingerprint`, where given, must match the corpus'.
- dictionary: /dictionary float32 [d, K] (unit-norm columns, the atoms); the metrics record's scalars as
  root attributes and the whole record as JSON text in `metrics`.
- target shards: one group per shard (/shard-000, /validation, ...) holding /seq_id int64 [S],
  /offsets int64 [S+1] (sequence s's tokens are offsets[s]:offsets[s+1]), /atom_counts uint16 [T] (each
  token's non-zero atoms: a top-k cut or the whole code), /atom_ids uint16 [Z] and /weights float16 [Z]
  (token t's entries follow the counts of the tokens before it, Z their sum); the shard's statistics as
  JSON text in the group's `stats`.

`open_store` gives an HDF5 activation store the interface of the zarr one (pipeline/data/formats.py:
open_store dispatches here by suffix), so the dictionary stage reads either the same way.

    python -m pipeline.hdf5 store teachers/minilm/activations.zarr states.h5
    python -m pipeline.hdf5 dictionary dictionaries/minilm/metrics.json dictionary.h5
    python -m pipeline.hdf5 targets targets/minilm/manifest.json targets.h5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .common import StageError
from .data.integrity import atomic_output, read_record, read_verified, verify_files

SUFFIXES = (".h5", ".hdf5")
STORE_DEFAULTS = {"seq_ids": -1, "positions": -1}  # arrays states computed elsewhere may leave out


def _h5py():
    try:
        import h5py
    except ImportError:
        raise StageError("HDF5 files need h5py: pip install h5py") from None
    return h5py


def is_hdf5(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def _attribute(value):
    """An attribute value h5py stores natively, or its JSON text."""
    if value is None or isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def _value(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and (value[:1] in "{[" or value == "null"):  # written by _attribute
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ---- the activation store ------------------------------------------------------------------------

class Array:
    """An HDF5 dataset with the zarr array interface the stages use: shape, chunks, [...], and oindex[rows]."""

    def __init__(self, dataset, default=None, rows: int | None = None):
        self.dataset, self.default = dataset, default
        self.shape = dataset.shape if dataset is not None else (rows,)
        self.chunks = (dataset.chunks if dataset is not None and dataset.chunks else self.shape)
        self.dtype = dataset.dtype if dataset is not None else np.dtype(np.int64)

    def __getitem__(self, selection):
        if self.dataset is None:
            return np.full(self.shape, self.default)[selection]
        return self.dataset[selection]

    @property
    def oindex(self) -> _Rows:
        return _Rows(self)


class _Rows:
    def __init__(self, array: Array):
        self.array = array

    def __getitem__(self, selection):
        rows = selection[0] if isinstance(selection, tuple) else selection
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if self.array.dataset is None:
            return np.full((len(rows),), self.array.default)
        # h5py reads increasing row lists; read them so and put them back in the order asked for.
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.array.dataset[unique][inverse]


def open_store(path: str | Path) -> tuple[dict, dict]:
    """The attributes and (lazy) arrays of an HDF5 activation store, as formats.open_store gives a zarr one."""
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise StageError(f"activation store {path} is not a readable HDF5 file: {err}") from None
    for required in ("states", "token_ids"):
        if required not in handle:
            raise StageError(f"activation store {path} has no /{required} dataset (the layout: pipeline/hdf5.py)")
    states = handle["states"]
    if states.ndim != 2 or states.dtype.kind != "f":
        raise StageError(f"{path}: /states must be a 2-D float array [tokens, hidden size], not {states.dtype} "
                         f"{states.shape}")
    arrays = {"states": Array(states)}
    for name in ("token_ids", "seq_ids", "positions"):
        dataset = handle[name] if name in handle else None
        if dataset is not None and dataset.shape != (states.shape[0],):
            raise StageError(f"{path}: /{name} has shape {dataset.shape}; one value per row of /states "
                             f"({states.shape[0]}) expected")
        arrays[name] = Array(dataset, STORE_DEFAULTS.get(name), states.shape[0])
    attrs = {key: _value(value) for key, value in handle.attrs.items()}
    return attrs, arrays


def unwritten_chunks(path: str | Path, name: str = "states") -> tuple[int, int]:
    """(chunks written, chunks the dataset's shape needs) of an HDF5 dataset: a dataset that declares more rows
    than its file holds reads the rest as its fill value (a 2 KB file can declare 200 M states)."""
    h5py = _h5py()
    with h5py.File(path, "r") as handle:
        dataset = handle[name]
        if dataset.chunks is None:  # contiguous: written or not as a whole
            whole = dataset.id.get_storage_size() >= dataset.size * dataset.dtype.itemsize or dataset.size == 0
            return int(whole), 1
        needed = 1
        for size, chunk in zip(dataset.shape, dataset.chunks):
            needed *= -(-size // chunk)
        return dataset.id.get_num_chunks(), needed


def export_store(store: str | Path, out: str | Path, block_rows: int = 1 << 16) -> None:
    """A zarr activation store (pipeline/data/formats.py) as one HDF5 file, copied a block of rows at a time."""
    from .data.formats import open_store as open_any

    h5py = _h5py()
    attrs, arrays = open_any(store)
    rows = arrays["states"].shape[0]
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as handle:
        for name, array in arrays.items():
            chunks = (min(max(1, rows), array.chunks[0]),) + tuple(array.shape[1:])
            dataset = handle.create_dataset(name, shape=array.shape, dtype=array.dtype, chunks=chunks)
            for start in range(0, rows, block_rows):
                dataset[start : start + block_rows] = array[start : start + block_rows]
        for key, value in attrs.items():
            handle.attrs[key] = _attribute(value)


# ---- the dictionary ------------------------------------------------------------------------------

def export_dictionary(metrics: str | Path, out: str | Path) -> None:
    """A fitted dictionary (its metrics record, which lists dictionary.npy) as an HDF5 file."""
    from .data.formats import load_dictionary

    h5py = _h5py()
    path = Path(metrics).parent / "dictionary.npy"
    record = read_verified(metrics, [path])
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("dictionary", data=load_dictionary(path))
        for key, value in record.items():
            if isinstance(value, (int, float, str)) and key != "checksum":
                handle.attrs[key] = value
        handle.attrs["metrics"] = json.dumps(record)


def read_dictionary(path: str | Path) -> tuple[np.ndarray, dict]:
    with _h5py().File(path, "r") as handle:
        return handle["dictionary"][...], json.loads(handle.attrs["metrics"])


# ---- target shards -------------------------------------------------------------------------------

def export_targets(manifest: str | Path, out: str | Path) -> None:
    """Every target shard a targets record lists (the validation split's too) as groups of one HDF5 file."""
    from .data.formats import flat_list, read_targets, target_stats

    h5py = _h5py()
    record = read_record(manifest)
    names = [s["path"] for s in record["shards"]] + ([record["validation"]["path"]] if "validation" in record else [])
    shards = [Path(manifest).parent / name for name in names]
    verify_files(manifest, record, shards)
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as handle:
        for shard in shards:
            table = read_targets(shard)
            tokens, counts = flat_list(table, "atom_counts")
            entries, atoms = flat_list(table, "atom_ids")
            _, weights = flat_list(table, "weights")
            group = handle.create_group(shard.stem)
            group.create_dataset("seq_id", data=table["seq_id"].to_numpy())
            group.create_dataset("offsets", data=tokens - tokens[0])
            group.create_dataset("atom_counts", data=counts[tokens[0] : tokens[-1]])
            group.create_dataset("atom_ids", data=atoms[entries[0] : entries[-1]])
            group.create_dataset("weights", data=weights[entries[0] : entries[-1]])
            group.attrs["stats"] = json.dumps(target_stats(shard))


def read_targets(path: str | Path, shard: str) -> dict[str, np.ndarray]:
    """One shard's group of an exported targets file: seq_id, offsets, atom_counts, atom_ids, weights, and its
    stats."""
    with _h5py().File(path, "r") as handle:
        group = handle[shard]
        arrays = {name: group[name][...] for name in ("seq_id", "offsets", "atom_counts", "atom_ids", "weights")}
        return {**arrays, "stats": json.loads(group.attrs["stats"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.hdf5", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("store", "dictionary", "targets"),
                   help="store: an activations.zarr; dictionary: its metrics.json; targets: their manifest.json")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path, help="the HDF5 file to write")
    args = p.parse_args(argv)
    exporter = {"store": export_store, "dictionary": export_dictionary, "targets": export_targets}[args.what]
    try:
        exporter(args.source, args.out)
    except StageError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
