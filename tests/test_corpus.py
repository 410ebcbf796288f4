"""Stage 1: packing, determinism, formats and bad input."""

import gzip

import pyarrow.parquet as pq
import pytest

from conftest import MINILM
from pipeline import contract
from pipeline.common import StageError
from pipeline.integrity import read_record, sha256_file
from pipeline.corpus import expand_inputs, pack_document, read_documents, shard

PARAMS = {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0}


def test_pairs_of_consecutive_sentences_fit_max_len():
    sentences = [[1] * 10, [2] * 10, [3] * 50, [4] * 5, [5] * 200]
    packed = list(pack_document(sentences, 32, cls=101, sep=102))
    ids = [p[0] for p in packed]
    assert ids[0] == [101, *[1] * 10, 102, *[2] * 10, 102]          # a pair
    assert ids[1] == [101, *[3] * 30, 102]                           # too long to pair: cut alone
    assert ids[2] == [101, *[4] * 5, 102]                            # 5 + 200 does not fit
    assert len(ids[3]) == 32 and all(len(i) <= 32 for i in ids)
    assert packed[0][1] == [0] * 12 + [1] * 11                        # segment ids A / B


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
        expand_inputs([str(tmp_path / "nope.txt")])
