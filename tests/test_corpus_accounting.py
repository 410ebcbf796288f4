"""No packing loses text silently: every token the corpus stage reads is written to a shard or the validation
split, or counted as dropped by reason in the manifest and named in the log (issue #28, item 0).

The expected counts are computed here from the input text with the tokenizer's own Python call, and from the
written parquet files, never from the stage's own counters."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import shard
from pipeline.data.hfdata import DatasetInput
from pipeline.data.integrity import read_record

from conftest import MINILM

PACKINGS = ("sentence_pairs", "contiguous", "reference_pairs")
FORMATS = ("text", "jsonl", "parquet", "hf")


@pytest.fixture(scope="module")
def documents(corpus_text) -> list[list[str]]:
    """Real BBC documents as lines: most one sentence a line, some whole articles on one line (as a
    document-per-row corpus holds paragraphs), some with an odd last line or lines under 5 characters."""
    docs = [doc.split("\n") for doc in corpus_text.read_text().split("\n\n") if doc.strip()]
    shaped = []
    for number, doc in enumerate(docs[:24]):
        if number % 3 == 0:
            doc = [" ".join(doc)]  # one long line, several hundred tokens
        elif number % 3 == 1:
            doc = [*doc, "Ok."]  # a short line, and an odd count of lines where the document had an even one
        shaped.append(doc)
    return shaped


def write_input(directory, documents, fmt):
    if fmt == "text":
        path = directory / "c.txt"
        path.write_text("".join("\n".join(doc) + "\n\n" for doc in documents))
    elif fmt == "jsonl":
        path = directory / "c.jsonl"
        path.write_text("".join(json.dumps({"text": "\n".join(doc)}) + "\n" for doc in documents))
    elif fmt == "parquet":
        path = directory / "c.parquet"
        pq.write_table(pa.table({"text": ["\n".join(doc) for doc in documents]}), path)
    else:
        datasets = pytest.importorskip("datasets")
        path = directory / "saved"
        datasets.Dataset.from_dict({"text": ["\n".join(doc) for doc in documents]}).save_to_disk(str(path))
    return path


def tokens_in_text(tokenizer, documents) -> int:
    return sum(len(tokenizer(line.strip(), add_special_tokens=False)["input_ids"])
               for doc in documents for line in doc if line.strip())


def text_tokens_written(tokenizer, paths) -> int:
    """Every id of the written sequences but [CLS] and [SEP] (the test text holds no such token)."""
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    return sum(1 for path in paths for ids in pq.read_table(path)["input_ids"].to_pylist()
               for token in ids if token not in special)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_tokens_written_plus_tokens_dropped_equal_tokens_read(tmp_path, documents, tokenizer, fmt, packing, caplog):
    source = write_input(tmp_path, documents, fmt)
    out = tmp_path / "out"
    shards = [str(out / f"shard-{i:03d}.parquet") for i in range(2)]
    params = {"tokenizer": MINILM, "max_seq_len": 32, "seed": 0, "validation_fraction": 0.25, "packing": packing}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        shard([source if fmt != "hf" else DatasetInput(str(source))],
              shards, str(out / "manifest.json"), params)
    manifest = read_record(out / "manifest.json")
    counts = manifest["text_tokens"]
    read = tokens_in_text(tokenizer, documents)
    written = text_tokens_written(tokenizer, [*shards, out / "validation.parquet"])
    dropped = sum(counts["dropped"].values())
    assert counts["read"] == read
    assert counts["train"] + counts["validation"] == written
    assert written + dropped == read
    assert counts["validation"] > 0
    if packing == "reference_pairs":  # the reference drops short lines, odd last lines and cuts long pairs
        assert {"short_lines", "odd_last_lines", "cut_to_max_seq_len"} <= set(counts["dropped"]) <= {
            "short_lines", "odd_last_lines", "cut_to_max_seq_len", "filtered_pairs"}
        assert f"dropped {dropped} of the {read} text tokens read" in caplog.text
    else:
        assert counts["dropped"] == {} and written == read
        assert "dropped" not in caplog.text
    if packing == "sentence_pairs":  # the long lines were split into windows of max_seq_len - 2
        assert manifest["split_sentences"] >= len(documents) // 3
        assert "were split into consecutive sequences" in caplog.text


@pytest.mark.parametrize("fmt", FORMATS)
def test_sentence_split_punctuation_cuts_paragraph_lines_into_sentences(tmp_path, fmt):
    from pipeline.data.text import read_documents

    paragraph = ('The vote was close. "We won," she said. Results came at 9 p.m. on Friday! Was it fair? '
                 '1,200 people voted.')
    path = write_input(tmp_path, [[paragraph, "A second line."]], fmt)
    source = path if fmt != "hf" else DatasetInput(str(path))
    assert list(read_documents(source)) == [[paragraph, "A second line."]]
    assert list(read_documents(source, {"sentence_split": "punctuation"})) == [[
        "The vote was close.", '"We won," she said.', "Results came at 9 p.m. on Friday!", "Was it fair?",
        "1,200 people voted.", "A second line."]]


def test_a_packing_that_drops_every_token_says_so(tmp_path, corpus_text):
    """The probe's case D3: reference_pairs pairs a document's lines; documents of one line each (a document per
    row) lose everything, which used to read "holds no text"."""
    from pipeline.common import StageError

    articles = [" ".join(doc.split("\n")) for doc in corpus_text.read_text().split("\n\n") if doc.strip()][:10]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"packing reference_pairs dropped every one of the \d+ text tokens read "
                                         r"\(odd_last_lines \d+\).*sentence_split: punctuation"):
        shard([source], [str(out / "s.parquet")], str(out / "m.json"),
              {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0, "packing": "reference_pairs"})
