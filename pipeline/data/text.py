"""Corpus text as documents: which files an input names, how each format is read, what bad input is.

Inputs are files, directories (read recursively) or globs; compression comes from the suffix (.gz, .zst,
.bz2); or Hugging Face datasets (hf:<name>, or a directory saved with save_to_disk: pipeline/data/hfdata.py).
Formats:
- text (the default, the MLSM reference format): one sentence per line, a blank line between documents;
- jsonl: one JSON object per line, a document in its `text_field`;
- parquet: one document per row of the `text_field` column.
In jsonl and parquet (and datasets), a document's sentences are the lines of its text. With
`sentence_split: punctuation` every line is further split after sentence-final punctuation (SENTENCE_BREAK),
for inputs whose lines are paragraphs. Text that is not UTF-8, binary,
or a line longer than `max_line_bytes` is an error naming the file, line and byte, or with
`bad_input: skip` a counted skip.

Documents are grouped in input order into chunks of about CHUNK_BYTES of text, the unit of parallel work
of shard_corpus, and a document goes to the validation split with a probability drawn per chunk: the
tokenizer stage and the corpus stage read the same documents and split them the same way.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common import Progress, StageError, log
from ..config import section_defaults
from . import hfdata
from .hfdata import DatasetInput, parse_input

CHUNK_BYTES = 1 << 20  # text per unit of parallel work; a constant, so the output never depends on workers
BLOCK_BYTES = 1 << 22  # text read and checked at a time
MAX_RECORD_BYTES = 1 << 28  # a jsonl line (a whole document) longer than this is a broken file
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# What reading and packing take when a caller leaves it out: the schema's defaults (one place for them).
DEFAULTS = section_defaults("corpus", ("format", "text_field", "packing", "validation_fraction", "bad_input",
                                       "max_line_bytes", "max_documents", "split", "dataset_config",
                                       "sentence_split", "max_expansion"))
LARGE_BYTES = 64 << 20  # files at least this large (or compressed) are announced and followed in the log
# Where corpus.sentence_split: punctuation cuts a line: after . ! ? or … (and any closing quotes or brackets)
# before white space and a capital letter, a digit or an opening quote; after a CJK full stop. A simple rule:
# an abbreviation such as "Mr. Smith" is cut too.
SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][\"'\u201d\u2019\u00bb)\]]))\s+"
                            r"(?=[\"'\u201c\u2018\u00ab(\[\u300c\u300e]?[A-Z0-9\u00c0-\u00d6\u00d8-\u00de])"
                            r"|(?<=[\u3002\uff01\uff1f])(?![\u300d\u300f\uff09])|(?<=[\u3002\uff01\uff1f][\u300d\u300f\uff09])")


# ---- inputs ------------------------------------------------------------------------------------

def input_files(patterns: list[str], strict: bool = True, unknown_files: str = "error",
                produced: frozenset[str] = frozenset()) -> list[Path | DatasetInput]:
    """The files named by `patterns` (files, globs, directories searched recursively), in a stable order, and
    the Hugging Face datasets (hf:<name>, or a directory saved with save_to_disk) in their place.

    A directory's files with a suffix that is no corpus format (README.md, data.xz, no suffix) are an
    error naming them, or with unknown_files "skip" left out (unread_files counts them). A file named
    twice is an error: its documents would be read twice. Strict: a pattern matching nothing is an error,
    except a literal path in `produced` (a rule writes it); not strict, it is dropped (a glob) or kept."""
    files: list[Path | DatasetInput] = []
    named_by: dict[Path, str] = {}
    for pattern in patterns:
        dataset = parse_input(pattern)
        if dataset is not None:
            files.append(dataset)
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = []
        for match in map(Path, matches):
            if match.exists() and not match.is_dir() and not match.is_file():
                raise StageError(f"corpus input {pattern!r}: {match} is not a regular file (a named pipe, socket or "
                                 f"device); the corpus stage reads files, once each, from the start")
            if match.is_dir():
                listed = _directory_files(match, pattern, unknown_files)
                if strict and not listed:
                    raise StageError(f"corpus input {pattern!r}: directory {match} holds no corpus file "
                                     f"(suffixes read: {', '.join(FORMATS)}, optionally {', '.join(COMPRESSION)})")
                found += listed
            elif match.is_file() or not strict or os.path.normpath(pattern) in produced:
                found.append(match)
        if strict and not found:
            what = "no file matched" if glob.has_magic(pattern) else "no such file or directory"
            raise StageError(f"corpus input {pattern!r}: {what}")
        for file in found:
            if file.resolve() in named_by:
                raise StageError(f"corpus file {file} is named twice in corpus.inputs (by {named_by[file.resolve()]!r} "
                                 f"and {pattern!r}): its documents would be read twice; name it once")
            named_by[file.resolve()] = pattern
        files += found
    if strict and not files:
        raise StageError(f"corpus inputs {patterns}: no file matched")
    return files


def input_bytes(path: Path | DatasetInput) -> float:
    """An input's size on disk (a hub dataset's is unknown: infinite)."""
    if isinstance(path, DatasetInput):
        local = path.local
        return sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) if local else float("inf")
    return path.stat().st_size


def _directory_files(directory: Path, pattern: str, unknown_files: str) -> list[Path]:
    """The corpus files under a directory input; any other (not hidden) file is an error unless skipped."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not _hidden(p, directory))
    unknown = [p for p in files if not is_corpus_file(p)]
    if unknown and unknown_files != "skip":
        listed = ", ".join(str(p) for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise StageError(f"corpus input {pattern!r}: {len(unknown)} file(s) whose suffix is no corpus format: "
                         f"{listed}. Directories are read for {', '.join(FORMATS)} files (optionally "
                         f"{', '.join(COMPRESSION)}); move the others out, name the files to read with a glob or "
                         f"path (read as text unless corpus.format says otherwise), or set corpus.unknown_files: "
                         f"skip to leave them out (counted in the corpus manifest)")
    return [p for p in files if is_corpus_file(p)]


def _hidden(path: Path, directory: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(directory).parts)


def unread_files(patterns: list[str]) -> dict[str, int]:
    """Per suffix, the files that directory inputs hold but that are not read as corpus (unknown_files: skip)."""
    counts: Counter = Counter()
    for pattern in patterns:
        if parse_input(pattern) is not None:  # a dataset's directory holds its own files
            continue
        for match in map(Path, sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]):
            if match.is_dir():
                counts.update(p.suffix or "(no suffix)" for p in match.rglob("*")
                              if p.is_file() and not _hidden(p, match) and not is_corpus_file(p))
    return dict(sorted(counts.items()))


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


def iter_lines(path: Path, limit: int, skipped: Skipped, max_expansion: float = DEFAULTS["max_expansion"]
               ) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, line) for each line of a file, decoded; what is not text is an error
    or a counted skip. Clean blocks are split and decoded whole; a block with anything wrong is
    checked line by line, so the error names the line and byte. A compressed file stops once it has unpacked
    to more than max_expansion times its size (text compresses 3-10 times; a bomb a thousand times)."""
    import pyarrow as pa

    number, offset, carry, skipping = 1, 0, b"", False
    compression, size = COMPRESSION.get(path.suffix), path.stat().st_size if path.exists() else 0
    bound = max_expansion * max(size, 1) if compression else None
    if compression or size >= LARGE_BYTES:
        log.info("corpus: reading %s (%d bytes on disk%s)", path, size,
                 f", {compression}: at most {bound:,.0f} bytes of text, corpus.max_expansion" if bound else "")
    progress = Progress(f"corpus: reading {path}", unit="bytes of text")
    try:
        with pa.input_stream(str(path), compression=compression) as stream:
            while True:
                block = stream.read(BLOCK_BYTES)
                progress.update(len(block), f"line {number}")
                if bound is not None and progress.done > bound:
                    raise StageError(f"{path}: {size:,} bytes of {compression} unpack to more than "
                                     f"{progress.done:,.0f} bytes of text, over {max_expansion:g} times their size "
                                     f"(corpus.max_expansion): not a corpus file (a compression bomb?); raise "
                                     f"corpus.max_expansion if it is one")
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


def _utf16(raw: bytes, offset: int) -> bool:
    """Whether a line looks like UTF-16: the file's byte-order mark, or NULs in every other byte (ASCII text
    in UTF-16 is its bytes with a NUL before or after each)."""
    sample = raw[:4096]
    return (offset == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")) or len(sample) >= 8 and sample.count(0) <= 0.6 * len(
        sample) and any(sample[start::2].count(0) >= 0.8 * len(sample[start::2]) for start in (0, 1))


def _where(path: Path, number: int, offset: int) -> str:
    return f"{path}, line {number} (byte {offset})"


def _decode(raw: bytes, where: str, offset: int, skipped: Skipped) -> str | None:
    if _utf16(raw, offset):
        skipped.bad("not_utf8_line", f"{where}: UTF-16 text (a byte-order mark, or a NUL byte beside every "
                                     f"character); convert the file to UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
        return None
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


def read_documents(path: Path | DatasetInput, options: dict | None = None,
                   skipped: Skipped | None = None) -> Iterator[list[str]]:
    """Documents (lists of sentences) of one input file (or dataset), in file order."""
    options = {**DEFAULTS, **(options or {})}
    skipped = skipped if skipped is not None else Skipped(options["bad_input"])
    if isinstance(path, DatasetInput):
        yield from hfdata.documents(path, options, skipped, split_sentences)
        return
    fmt = file_format(path, options["format"])
    if fmt == "text":
        yield from _text_documents(path, options, skipped)
    elif fmt == "jsonl":
        yield from _jsonl_documents(path, options, skipped)
    else:
        yield from _parquet_documents(path, options, skipped)


def _text_documents(path: Path, options: dict, skipped: Skipped) -> Iterator[list[str]]:
    sentences: list[str] = []
    punctuation = options["sentence_split"] == "punctuation"
    for _, _, line in iter_lines(path, options["max_line_bytes"], skipped, options["max_expansion"]):
        line = line.strip()
        if line:
            sentences += split_line(line) if punctuation else [line]
        elif sentences:
            yield sentences
            sentences = []
    if sentences:
        yield sentences


def _jsonl_documents(path: Path, options: dict, skipped: Skipped) -> Iterator[list[str]]:
    key = options["text_field"]
    for number, offset, line in iter_lines(path, MAX_RECORD_BYTES, skipped, options["max_expansion"]):
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
        yield split_sentences(text, where, options, skipped)


def _parquet_documents(path: Path, options: dict, skipped: Skipped) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = options["text_field"]
    try:
        reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{path} is not a readable parquet file: {err}") from None
    field_type = reader.schema_arrow.field(key).type if key in reader.schema_arrow.names else None
    if field_type is None:
        raise StageError(f"{path}: no column {key!r} (corpus.text_field; columns: "
                         f"{', '.join(reader.schema_arrow.names)})")
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        columns = ", ".join(f"{f.name} ({f.type})" for f in reader.schema_arrow)
        raise StageError(f"{path}: column {key!r} holds {field_type}, not text (corpus.text_field names the column "
                         f"of the documents; columns: {columns})")
    row = 0
    for batch in reader.iter_batches(columns=[key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}, row {row}"
            row += 1
            if text is None:
                skipped.bad("record_without_text", f"{where}: {key!r} is null")
                continue
            yield split_sentences(text, where, options, skipped)


def split_sentences(text: str, where: str, options: dict, skipped: Skipped) -> list[str]:
    """A document's sentences: the lines of its text (each split at sentence ends with sentence_split:
    punctuation)."""
    limit, punctuation = options["max_line_bytes"], options["sentence_split"] == "punctuation"
    sentences = []
    for line in text.split("\n"):
        line = line.strip()
        if len(line) > limit // 4 and len(line.encode("utf-8")) > limit:
            skipped.bad("line_too_long", f"{where}: a line longer than {limit} bytes (corpus.max_line_bytes)")
        elif line:
            sentences += split_line(line) if punctuation else [line]
    return sentences


def split_line(line: str) -> list[str]:
    """A line's sentences (SENTENCE_BREAK)."""
    return [s for s in (part.strip() for part in SENTENCE_BREAK.split(line)) if s]


# ---- chunks: the unit of parallel work ---------------------------------------------------------

@dataclass
class Chunk:
    index: int
    first_doc: int  # global index of its first document, in input order
    documents: list[list[str]]


def read_chunks(files: list[Path], options: dict, skipped: Skipped) -> Iterator[Chunk]:
    """All documents of all files in order (the first `max_documents` of them, if set), grouped into chunks
    of about CHUNK_BYTES of text."""
    limit = options.get("max_documents") or 0
    documents = itertools.chain.from_iterable(read_documents(path, options, skipped) for path in files)
    index, first_doc, docs, size = 0, 0, [], 0
    for doc in itertools.islice(documents, limit or None):
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

