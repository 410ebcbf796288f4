"""Two outputs of the same config compared as numbers (python -m pipeline.compare --rtol): arrays within a relative
tolerance, integers and text equal. Read by file kind: .npy, .safetensors, parquet, a zarr store's arrays, JSON
records (their timings and checksums left out, as pipeline/compare.py leaves them out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def close(a: Path, b: Path, rtol: float, root_a: Path, root_b: Path) -> bool:
    """Whether two files (a zarr store's chunk: its whole store) hold the same numbers to `rtol`."""
    if ".zarr" in a.as_posix():
        store_a, store_b = (Path(str(p).split(".zarr", 1)[0] + ".zarr") for p in (a, b))
        return _close_arrays(_zarr(store_a), _zarr(store_b), rtol)
    if a.suffix == ".npy":
        return _close_arrays({"": np.load(a, allow_pickle=False)}, {"": np.load(b, allow_pickle=False)}, rtol)
    if a.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return _close_arrays(load_file(str(a)), load_file(str(b)), rtol)
    if a.suffix == ".parquet":
        return _close_arrays(_parquet(a), _parquet(b), rtol)
    if a.suffix == ".json":
        from ..compare import _without

        return _close_json(_without(json.loads(a.read_text())), _without(json.loads(b.read_text())), rtol)
    return False


def _close_arrays(a: dict, b: dict, rtol: float) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind == "f":
            scale = float(np.abs(x).max()) if x.size else 0.0
            if not np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol, atol=rtol * scale):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def _close_json(x, y, rtol: float) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close_json(x[k], y[k], rtol) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(_close_json(i, j, rtol) for i, j in zip(x, y))
    if isinstance(x, float) and isinstance(y, (int, float)) and not isinstance(y, bool):
        return bool(np.isclose(x, y, rtol=rtol, atol=rtol))
    return x == y


def _parquet(path: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    arrays = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        while hasattr(column, "values") and hasattr(column, "offsets"):  # lists: their offsets and flat values
            arrays[f"{name}.offsets"] = column.offsets.to_numpy()
            column = column.values
        arrays[name] = column.to_numpy(zero_copy_only=False)
    return arrays


def _zarr(store: Path) -> dict:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}
