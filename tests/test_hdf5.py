"""HDF5 interchange (pipeline/hdf5.py): the activation store, a dictionary and target shards exported to
HDF5 and read back unchanged; teacher states computed elsewhere imported as an activation store, which the
dictionary stage reads like its own."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_teacher import extract, params

from pipeline import hdf5
from pipeline.common import StageError
from pipeline.data.formats import flat_list, load_dictionary, open_store, read_store, write_store
from pipeline.data.integrity import file_entries, read_record, read_verified, write_record
from pipeline.target_summary import summarize

from conftest import MINILM
from test_dictionary_and_targets import STAGE_PARAMS, code_targets, fit, random_dictionary, save_dictionary

h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def store(tmp_path_factory, sharded_corpus, encoder_teacher):
    """300 states of the tiny encoder teacher's last layer, extracted by the stage."""
    out = tmp_path_factory.mktemp("store")
    shards, manifest = sharded_corpus
    extract(shards, manifest, str(out / "a.zarr"), str(out / "a.json"), params(encoder_teacher, sample_tokens=300))
    return out / "a.zarr", out / "a.json"


def test_the_activation_store_round_trips_through_hdf5(tmp_path, store):
    attrs, arrays = read_store(store[0])
    hdf5.main(["store", str(store[0]), str(tmp_path / "a.h5")])
    with h5py.File(tmp_path / "a.h5", "r") as handle:  # the documented layout, as any HDF5 reader sees it
        assert {name: (handle[name].shape, handle[name].dtype.str) for name in handle} == {
            "states": ((300, 32), "<f2"), "token_ids": ((300,), "<i4"), "seq_ids": ((300,), "<i8"),
            "positions": ((300,), "<i2")}
        assert handle.attrs["layer"] == -1 and handle.attrs["hidden_size"] == 32
        assert json.loads(handle.attrs["sampling"])["sample_tokens"] == 300
    back_attrs, back = read_store(tmp_path / "a.h5")
    assert back_attrs == attrs
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array)


def test_the_dictionary_stage_fits_the_same_dictionary_from_an_hdf5_store(tmp_path):
    from test_dictionary_and_targets import synthetic_states

    x, _ = synthetic_states(n=1500, d=24)
    write_store(str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), {"teacher": "t", "layer": -1, "tokenizer": MINILM},
                states=x.numpy().astype(np.float16), token_ids=np.arange(1500, dtype=np.int32) + 1000,
                seq_ids=np.zeros(1500, np.int64), positions=np.zeros(1500, np.int16))
    hdf5.export_store(tmp_path / "a.zarr", tmp_path / "a.h5")
    write_record(tmp_path / "h5.json", {"files": file_entries(tmp_path, [tmp_path / "a.h5"])})
    run = {**STAGE_PARAMS, "atoms": 20, "heldout_tokens": 200}
    for name, source, record in (("zarr", "a.zarr", "a.json"), ("h5", "a.h5", "h5.json")):
        (tmp_path / name).mkdir()
        fit(tmp_path / source, tmp_path / record, tmp_path / name / "D.npy", tmp_path / name / "m.json",
            tmp_path / name / "atoms.json", run)
    np.testing.assert_array_equal(np.load(tmp_path / "zarr" / "D.npy"), np.load(tmp_path / "h5" / "D.npy"))
    assert (tmp_path / "zarr" / "atoms.json").read_text() == (tmp_path / "h5" / "atoms.json").read_text()


def external_states(path, rows=400, hidden=32, **attrs):
    """An HDF5 file as another toolkit would write it: states and token ids, nothing else required."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle["states"] = rng.standard_normal((rows, hidden)).astype(np.float32)
        handle["token_ids"] = rng.integers(1000, 20000, rows).astype(np.int64)
        handle.attrs.update(attrs)
    return path


def test_states_computed_elsewhere_are_imported_as_the_activation_store(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    source = external_states(tmp_path / "elsewhere.h5", layer=-1)
    out, record = tmp_path / "a.zarr", tmp_path / "a.json"
    extract(shards, manifest, str(out), str(record), params(encoder_teacher), states=str(source))
    read_verified(record, [out])
    attrs, arrays = read_store(out)
    with h5py.File(source, "r") as handle:
        np.testing.assert_array_equal(arrays["states"], handle["states"][...].astype(np.float16))
        np.testing.assert_array_equal(arrays["token_ids"], handle["token_ids"][...])
    assert (arrays["seq_ids"] == -1).all() and (arrays["positions"] == -1).all()  # unknown: not from our corpus
    assert attrs["sampling"]["imported_from"] == str(source) and attrs["tokens"] == 400
    assert attrs["tokenizer_fingerprint"] == read_record(manifest)["tokenizer_fingerprint"]


@pytest.mark.parametrize("attrs,rows,hidden,message", [
    ({}, 400, 16, "its states have 16 dimensions, teacher .* has hidden size 32"),
    ({"layer": -2}, 400, 32, "its layer -2 is not the teacher's configured layer -1"),
    ({"tokenizer_fingerprint": "0123"}, 400, 32, "tokenizer_fingerprint differs from the corpus"),
])
def test_states_that_do_not_fit_the_teacher_are_refused(tmp_path, sharded_corpus, encoder_teacher, attrs, rows,
                                                        hidden, message):
    shards, manifest = sharded_corpus
    source = external_states(tmp_path / "bad.h5", rows, hidden, **attrs)
    with pytest.raises(StageError, match=message + r".*teachers\.t\.activations"):
        extract(shards, manifest, str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), params(encoder_teacher),
                states=str(source))
    assert not (tmp_path / "a.zarr").exists()


def test_bad_states_name_their_row(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    source = external_states(tmp_path / "nan.h5")
    with h5py.File(source, "r+") as handle:
        handle["states"][123, 4] = np.nan
    with pytest.raises(StageError, match="non-finite state in row 123"):
        extract(shards, manifest, str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), params(encoder_teacher),
                states=str(source))
    with h5py.File(tmp_path / "no_ids.h5", "w") as handle:
        handle["states"] = np.zeros((10, 32), np.float32)
    with pytest.raises(StageError, match="no /token_ids dataset"):
        open_store(tmp_path / "no_ids.h5")


def test_dictionary_and_target_shards_round_trip_through_hdf5(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    dictionary = random_dictionary(32, 24)
    save_dictionary(tmp_path, dictionary)
    targets = tmp_path / "targets"
    run = {"source": str(encoder_teacher), "layer": -1, "lambda": 0.05, "top_k": 8, "batch_size": 8,
           "solver": "fast", "max_iterations": 200, "tolerance": 1e-3, "precision": "fp32", "device": "cpu",
           "trust_remote_code": False}
    parts = [str(targets / f"shard-{i:03d}.parquet") for i in range(2)]
    for shard, out in zip(shards, parts):
        code_targets(shard, manifest, tmp_path, out, run)
    summarize(parts, str(targets / "manifest.json"), {"top_k": 8, "solver": "fast"})
    hdf5.main(["targets", str(targets / "manifest.json"), str(tmp_path / "t.h5")])
    for part in parts:
        table = pq.read_table(part)
        back = hdf5.read_targets(tmp_path / "t.h5", part.rsplit("/", 1)[1].removesuffix(".parquet"))
        np.testing.assert_array_equal(back["seq_id"], table["seq_id"].to_numpy())
        _, counts = flat_list(table, "atom_counts")
        _, atoms = flat_list(table, "atom_ids")
        np.testing.assert_array_equal(back["atom_counts"], counts)
        assert back["offsets"][-1] == len(counts) and back["atom_counts"].sum() == len(atoms) and counts.max() <= 8
        np.testing.assert_array_equal(back["atom_ids"], atoms)
        np.testing.assert_array_equal(back["weights"], flat_list(table, "weights")[1])
        np.testing.assert_array_equal(np.diff(back["offsets"]), [len(x) for x in table["atom_counts"].to_pylist()])

    (tmp_path / "dictionary").mkdir()
    np.save(tmp_path / "dictionary" / "dictionary.npy", dictionary.numpy())
    write_record(tmp_path / "dictionary" / "metrics.json",
                 {"atoms": 24, "lambda": 0.05, "teacher": "t",
                  "files": file_entries(tmp_path / "dictionary", [tmp_path / "dictionary" / "dictionary.npy"])})
    hdf5.main(["dictionary", str(tmp_path / "dictionary" / "metrics.json"), str(tmp_path / "d.h5")])
    back, metrics = hdf5.read_dictionary(tmp_path / "d.h5")
    np.testing.assert_array_equal(back, load_dictionary(tmp_path / "dictionary" / "dictionary.npy"))
    assert metrics["atoms"] == 24 and metrics["teacher"] == "t"
    with h5py.File(tmp_path / "d.h5", "r") as handle:
        assert handle["dictionary"].shape == (32, 24) and handle.attrs["lambda"] == 0.05


def test_imported_states_are_bounded_by_sample_tokens(tmp_path, sharded_corpus, encoder_teacher, caplog):
    """Issue #28, 4: every row was imported, whatever activations.sample_tokens said."""
    import logging

    shards, manifest = sharded_corpus
    source = external_states(tmp_path / "many.h5", rows=1000)
    out, record = tmp_path / "a.zarr", tmp_path / "a.json"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        extract(shards, manifest, str(out), str(record), params(encoder_teacher, sample_tokens=300),
                states=str(source))
    assert "declares 1000 x 32 states" in caplog.text and "importing 300 of them" in caplog.text
    _, arrays = read_store(out)
    with h5py.File(source, "r") as handle:
        states = handle["states"][...].astype(np.float16)
    rows = [int(np.flatnonzero((states == row).all(1))[0]) for row in arrays["states"]]
    assert len(rows) == 300 and rows == sorted(set(rows))  # distinct rows of the file, in file order
    assert max(rows) > 900 and min(rows) < 100  # drawn from the whole file, not its head


def test_a_file_declaring_more_states_than_it_holds_stops_before_reading(tmp_path, sharded_corpus, encoder_teacher):
    """Issue #28, 4: a 2 KB file declaring 200 M x 384 states (chunked, gzip, a fill value) was read row by row
    into memory (5 GB after a minute)."""
    shards, manifest = sharded_corpus
    source = tmp_path / "bomb.h5"
    with h5py.File(source, "w") as handle:
        states = handle.create_dataset("states", (200_000_000, 32), np.float16, chunks=(4096, 32),
                                       compression="gzip", fillvalue=0.5)
        states[:10] = 1.0
        handle.create_dataset("token_ids", (200_000_000,), np.int32, chunks=(4096,), compression="gzip",
                              fillvalue=1000)
    assert source.stat().st_size < 100_000
    with pytest.raises(StageError, match=r"declares 200,000,000 x 32 states .* but only 1 of its 48829 chunks are "
                                         r"written"):
        extract(shards, manifest, str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), params(encoder_teacher),
                states=str(source))
