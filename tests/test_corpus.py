"""Stage 1: packing, determinism, formats and bad input."""

import gzip

import pyarrow.parquet as pq
import pytest

from pipeline.common import StageError
from pipeline.corpus import shard
from pipeline.data import contract
from pipeline.data.integrity import read_record, sha256_file
from pipeline.data.packing import pack_document
from pipeline.data.text import Skipped, input_files, read_documents, unread_files

from conftest import MINILM

PARAMS = {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0}


def test_pairs_of_consecutive_sentences_fit_max_len():
    sentences = [[1] * 10, [2] * 10, [3] * 50, [4] * 5, [5] * 200]
    packed = list(pack_document(sentences, 32, cls=101, sep=102))
    ids = [p[0] for p in packed]
    assert ids[0] == [101, *[1] * 10, 102, *[2] * 10, 102]          # a pair
    assert ids[1] == [101, *[3] * 30, 102]                           # too long: split into windows of 30
    assert ids[2] == [101, *[3] * 20, 102, *[4] * 5, 102]            # its last window pairs with the next
    assert ids[3:] == [[101, *[5] * 30, 102]] * 6 + [[101, *[5] * 20, 102]]
    assert packed[0][1] == [0] * 12 + [1] * 11                        # segment ids A / B
    assert sum(len(x) for x in sentences) == sum(len(i) - (2 if 102 not in i[1:-1] else 3) for i in ids)


def test_shards_follow_the_contract(sharded_corpus, tokenizer):
    shards, manifest_path = sharded_corpus
    manifest = read_record(manifest_path)
    tables = [pq.read_table(s) for s in shards]
    assert all(t.schema.equals(contract.CORPUS_SCHEMA) for t in tables)
    seq_ids = [i for t in tables for i in t["seq_id"].to_pylist()]
    assert seq_ids == list(range(manifest["sequences"]))             # dense, global, in shard order
    assert manifest["documents"] == 40 and manifest["tokens"] == sum(
        len(x) for t in tables for x in t["input_ids"].to_pylist())
    for ids, types in zip(tables[0]["input_ids"].to_pylist(), tables[0]["token_type_ids"].to_pylist()):
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.pad_token_id not in ids  # a tokenizer.json's own padding is switched off
        assert len(ids) == len(types) <= 64
    assert [manifest["files"][s["path"]]["sha256"] for s in manifest["shards"]] == [sha256_file(s) for s in shards]


def test_same_input_and_config_give_identical_bytes(tmp_path, corpus_text):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        shards = [str(out / f"s{i}.parquet") for i in range(3)]
        shard([corpus_text], shards, str(out / "m.json"), PARAMS)
        digests.append([sha256_file(s) for s in shards])
    assert digests[0] == digests[1]
    other = [str(tmp_path / "c" / f"s{i}.parquet") for i in range(3)]
    shard([corpus_text], other, str(tmp_path / "c" / "m.json"), {**PARAMS, "seed": 1})
    assert [sha256_file(s) for s in other] != digests[0]


def test_gzip_and_plain_text_read_the_same(tmp_path, corpus_text):
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(corpus_text.read_bytes()))
    assert list(read_documents(gz)) == list(read_documents(corpus_text))


def test_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a one.\na two.\n\n\n\nb one.\n  \nc one.\nc two.\n")
    assert list(read_documents(path)) == [["a one.", "a two."], ["b one."], ["c one.", "c two."]]


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line.\n\nbad \xff byte.\n")
    with pytest.raises(StageError, match=r"bad.txt, line 3 \(byte 12\): not UTF-8 at byte 16"):
        list(read_documents(path))


def test_empty_corpus_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(StageError, match="holds no text"):
        shard([path], [str(tmp_path / "s.parquet")], str(tmp_path / "m.json"), PARAMS)
    assert not (tmp_path / "s.parquet").exists()


def test_missing_input_is_named(tmp_path):
    with pytest.raises(StageError, match="nope.txt"):
        input_files([str(tmp_path / "nope.txt")])


# ---- formats -------------------------------------------------------------------------------------

def write_formats(directory, documents: list[list[str]]) -> dict:
    """The same documents in every input format the corpus stage reads."""
    import bz2
    import json

    import pyarrow as pa

    text = "".join("\n".join(doc) + "\n\n" for doc in documents).encode()
    records = "".join(json.dumps({"id": i, "text": "\n".join(doc)}) + "\n" for i, doc in enumerate(documents)).encode()
    paths = {"text": directory / "c.txt", "gzip": directory / "c.txt.gz", "zstd": directory / "c.txt.zst",
             "bz2": directory / "c.txt.bz2", "jsonl": directory / "c.jsonl", "jsonl.zst": directory / "c.jsonl.zst",
             "parquet": directory / "c.parquet"}
    paths["text"].write_bytes(text)
    paths["gzip"].write_bytes(gzip.compress(text))
    paths["zstd"].write_bytes(_zstd(text))
    paths["bz2"].write_bytes(bz2.compress(text))
    paths["jsonl"].write_bytes(records)
    paths["jsonl.zst"].write_bytes(_zstd(records))
    pq.write_table(pa.table({"text": ["\n".join(doc) for doc in documents]}), paths["parquet"])
    return paths


def _zstd(data: bytes) -> bytes:
    """A real .zst file (zstd frame format), as the zstd command writes it."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def documents(corpus_text):
    return list(read_documents(corpus_text))


@pytest.mark.parametrize("fmt", ["text", "gzip", "zstd", "bz2", "jsonl", "jsonl.zst", "parquet"])
def test_every_input_format_reads_the_same_documents(tmp_path, documents, fmt):
    paths = write_formats(tmp_path, documents)
    assert list(read_documents(paths[fmt])) == documents


def test_a_directory_or_glob_reads_its_corpus_files_in_order(tmp_path, documents):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b.\n")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text('{"text": "a."}\n')
    (tmp_path / "d" / "notes.md").write_text("not a corpus file")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden.\n")
    files = input_files([str(tmp_path / "d")], unknown_files="skip")
    assert [f.name for f in files] == ["b.txt", "a.jsonl"]
    assert unread_files([str(tmp_path / "d")]) == {".md": 1}  # the hidden file is not counted
    assert [f.name for f in input_files([str(tmp_path / "d" / "*.txt")])] == ["b.txt"]
    assert [d for f in files for d in read_documents(f)] == [["b."], ["a."]]


def test_format_can_be_forced_and_text_field_chosen(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"body": "one.\\ntwo."}\n')
    assert list(read_documents(path, {"format": "jsonl", "text_field": "body"})) == [["one.", "two."]]
    with pytest.raises(StageError, match=r"data.txt, line 1 \(byte 0\): no string field 'text'"):
        list(read_documents(path, {"format": "jsonl"}))


def test_parquet_without_the_text_column_names_its_columns(tmp_path):
    import pyarrow as pa

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a."]}), path)
    with pytest.raises(StageError, match=r"no column 'text' .*columns: content"):
        list(read_documents(path))


# ---- packing, splits, parallel determinism ----------------------------------------------------------

def test_shards_are_byte_identical_for_any_number_of_workers(tmp_path, corpus_text, monkeypatch):
    from pipeline.data import text

    monkeypatch.setattr(text, "CHUNK_BYTES", 8192)  # many chunks, so two workers really share the work
    params = {**PARAMS, "validation_fraction": 0.2}
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        paths = [str(out / f"s{i}.parquet") for i in range(3)] + [str(out / "v.parquet"), str(out / "c.npy")]
        manifest = shard([corpus_text], paths[:3], str(out / "m.json"), params, paths[3], paths[4], workers=workers)
        digests.append([sha256_file(p) for p in paths])
    assert digests[0] == digests[1]
    assert manifest["documents"] + manifest["validation"]["documents"] == 40


def test_validation_split_holds_whole_documents_apart(tmp_path, corpus_text):
    import numpy as np

    out = tmp_path / "o"
    shards = [str(out / "s0.parquet"), str(out / "s1.parquet")]
    manifest = shard([corpus_text], shards, str(out / "m.json"), {**PARAMS, "validation_fraction": 0.25})
    train = [pq.read_table(s) for s in shards]
    validation = pq.read_table(out / "validation.parquet")
    train_docs = {d for t in train for d in t["doc_id"].to_pylist()}
    held_docs = set(validation["doc_id"].to_pylist())
    assert held_docs and train_docs and not train_docs & held_docs
    assert len(held_docs) == manifest["validation"]["documents"] and len(train_docs) == manifest["documents"]
    first = manifest["sequences"]
    assert validation["seq_id"].to_pylist() == list(range(first, first + len(validation)))
    counts = np.load(out / "token_counts.npy")
    ids = np.concatenate([np.concatenate(t["input_ids"].to_numpy(zero_copy_only=False)) for t in train])
    assert (counts == np.bincount(ids, minlength=len(counts))).all()  # training tokens only


def test_max_documents_takes_the_first_documents_of_the_input(tmp_path, corpus_text):
    """A slice of a large corpus: the first N documents in input order, split into training and validation
    as the whole corpus would be."""
    whole = shard([corpus_text], [str(tmp_path / "a" / "s.parquet")], str(tmp_path / "a" / "m.json"),
                  {**PARAMS, "validation_fraction": 0.25})
    part = shard([corpus_text], [str(tmp_path / "b" / "s.parquet")], str(tmp_path / "b" / "m.json"),
                 {**PARAMS, "validation_fraction": 0.25, "max_documents": 15})
    assert part["documents"] + part["validation"]["documents"] == 15 < whole["documents"]
    docs = {d for f in ("s.parquet", "validation.parquet")
            for d in pq.read_table(tmp_path / "b" / f)["doc_id"].to_pylist()}
    assert docs == set(range(15)) and part["params"]["max_documents"] == 15


def test_contiguous_packing_fills_sequences_with_the_token_stream(tmp_path, corpus_text, tokenizer):
    out = tmp_path / "o"
    shards = [str(out / "s0.parquet")]
    manifest = shard([corpus_text], shards, str(out / "m.json"), {**PARAMS, "packing": "contiguous"})
    table = pq.read_table(shards[0]).sort_by("doc_id")
    lengths = [len(ids) for ids in table["input_ids"].to_pylist()]
    assert max(lengths) == 64 and sum(n == 64 for n in lengths) >= len(lengths) - 1  # one stream: one short tail
    assert set(table["token_type_ids"].to_pylist()[0]) == {0}
    bodies = [ids[1:-1] for ids in table["input_ids"].to_pylist()]
    sentences = [s for doc in read_documents(corpus_text) for s in doc]
    every_token = sum(len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"])
    separators = sum(b.count(tokenizer.sep_token_id) for b in bodies)
    assert separators == 39 and sum(map(len, bodies)) == every_token + separators  # no token lost, none cut
    assert manifest["sequences"] == len(lengths) and manifest["tokens"] == sum(lengths)


# ---- bad input: errors or counted skips --------------------------------------------------------------

BAD_TEXT = b"Good one.\nGood two.\n\nBad \xff byte.\nStill good.\n\n" + b"x" * 3000 + b"\n\n\x01\x02\n\nLast.\n"


def test_bad_lines_are_skipped_and_counted_when_the_config_says_so(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(BAD_TEXT)
    options = {"bad_input": "skip", "max_line_bytes": 2048}
    with pytest.raises(StageError, match=r"c.txt, line 4 \(byte 21\): not UTF-8 at byte 25.*bad_input: skip"):
        list(read_documents(path, {**options, "bad_input": "error"}))
    out = tmp_path / "o"
    manifest = shard([path], [str(out / "s0.parquet")], str(out / "m.json"), {**PARAMS, **options})
    assert manifest["skipped"] == {"empty_documents": 1, "line_too_long": 1, "not_utf8_line": 1}
    assert manifest["documents"] == 3  # "Good one/two", "Still good", "Last"


def test_bad_jsonl_records_are_named_or_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine."}\n{"text": 3}\nnot json\n["a list"]\n{"text": "also fine."}\n')
    with pytest.raises(StageError, match=r"c.jsonl, line 2 \(byte 18\): no string field 'text'"):
        list(read_documents(path))
    skipped = Skipped("skip")
    assert list(read_documents(path, {"bad_input": "skip"}, skipped)) == [["fine."], ["also fine."]]
    assert skipped.counts == {"record_without_text": 2, "bad_json_record": 1}


def test_a_truncated_compressed_file_is_named(tmp_path, corpus_text):
    path = tmp_path / "c.txt.zst"
    path.write_bytes(_zstd(corpus_text.read_bytes())[:5000])
    with pytest.raises(StageError, match=r"c.txt.zst: unreadable after byte \d+ of text"):
        list(read_documents(path))


def test_lines_keep_their_numbers_and_offsets_across_blocks(tmp_path, monkeypatch):
    from pipeline.data import text

    monkeypatch.setattr(text, "BLOCK_BYTES", 1000)  # the long lines span several blocks
    path = tmp_path / "c.txt"
    path.write_bytes(b"a.\nb.\n" + b"x" * 5000 + b"\nc.\n\nd \xff.\ne.\n" + b"y" * 3000)
    skipped = Skipped("skip")
    assert list(text.iter_lines(path, 2048, skipped)) == [(1, 0, "a."), (2, 3, "b."), (4, 5007, "c."),
                                                            (5, 5010, ""), (7, 5016, "e.")]
    assert skipped.counts == {"line_too_long": 2, "not_utf8_line": 1}
    with pytest.raises(StageError, match=r"c.txt, line 3 \(byte 6\): longer than 2048 bytes"):
        list(text.iter_lines(path, 2048, Skipped()))


def test_a_compression_bomb_stops_with_the_size_it_unpacked_to(tmp_path, monkeypatch, caplog):
    """Issue #28, 4: a 2 MB gzip of 2 GiB of newlines ran for 9 minutes without a word, then said it held no
    text. The bound is stated before reading, progress is logged, and the read stops past the bound."""
    import logging

    from pipeline import common

    bomb = tmp_path / "bomb.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as out:
        for _ in range(16):
            out.write(b"\n" * (1 << 20))  # 16 MB of blank lines, about 16 KB compressed
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(
            StageError, match=r"bomb.txt.gz: [\d,]+ bytes of gzip unpack to more than [\d,]+ bytes of text, over 100 "
                              r"times their size \(corpus.max_expansion\)"):
        list(read_documents(bomb))
    size = bomb.stat().st_size
    assert f"reading {bomb} ({size} bytes on disk, gzip: at most {100 * size:,} bytes of text" in caplog.text
    assert "bytes of text after" in caplog.text  # progress
    assert list(read_documents(bomb, {"max_expansion": 5000})) == []  # allowed: then it holds no text
