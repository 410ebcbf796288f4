"""Packing of a chunk's tokenized sentences into sequences, on numpy arrays.

The same sequences as pack_document below (sentence pairs; a sentence longer than max_len - 2
tokens is first split into windows, sentence_windows) and pack_contiguous, built from
the chunk's ids as one flat array instead of a Python list per sequence: building those lists took as
long as everything else shard_corpus adds to tokenization (bench/sharding.py). Only the pairing
decision runs in Python, on the sentence lengths; the ids are gathered in one numpy index operation.

The list versions below are what the array packer is tested against, and pack_reference_pairs packs the
reference's line pairs (its filters read each line's text, so they run per document in Python).

Every sequence is a list of pieces: [CLS], a range of the flat ids, [SEP], another range, [SEP]
(empty pieces have length 0). A piece is (first index into the source, length, token type), where the
source is the flat ids followed by [CLS] and [SEP].
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter

import numpy as np
import pyarrow as pa


def packed_table(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, docs: np.ndarray, packing: str,
                 max_len: int, cls: int, sep: int) -> pa.Table:
    """The sequences (doc_id, input_ids, token_type_ids) of one split: its non-empty sentences in order,
    sentence i being flat[starts[i] : starts[i] + lengths[i]] of document docs[i]."""
    source = np.concatenate([flat.astype(np.int32, copy=False), np.array([cls, sep], np.int32)])
    pieces = (_contiguous_pieces if packing == "contiguous" else _pair_pieces)(source, starts, lengths, docs, max_len)
    return _assemble(*pieces)


def sentence_windows(starts: np.ndarray, lengths: np.ndarray, body: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sentences longer than `body` tokens split into consecutive windows of `body` tokens (the last one
    shorter), so that no token is cut off: (starts, lengths, the sentence each window comes from)."""
    lengths = lengths.astype(np.int64, copy=False)
    count = np.maximum(1, -(-lengths // body))
    owner = np.repeat(np.arange(len(lengths)), count)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
    return starts[owner] + index * body, np.minimum(body, lengths[owner] - index * body), owner


def _pair_pieces(source, starts, lengths, docs, max_len):
    """Pieces of the sentence-pair packing: consecutive sentences of a document as [CLS] A [SEP] B [SEP]
    while the pair fits max_len, else [CLS] A [SEP] (the caller splits longer sentences into windows)."""
    cls_at, sep_at = len(source) - 2, len(source) - 1
    if len(lengths) and lengths.max() > max_len - 2:
        raise ValueError("sentences longer than max_len - 2 must be split into windows first (sentence_windows)")
    a, b = _pairs(lengths.tolist(), docs.tolist(), max_len)
    has_b = b >= 0
    b_safe = np.where(has_b, b, a)
    a_len = lengths[a]
    b_len = np.where(has_b, lengths[b_safe], 0)
    count, one = len(a), np.ones(len(a), np.int64)
    first = np.stack([cls_at * one, starts[a], sep_at * one, starts[b_safe], sep_at * one], 1)
    length = np.stack([one, a_len, one, b_len, has_b.astype(np.int64)], 1)
    types = np.broadcast_to(np.array([0, 0, 0, 1, 1], np.int8), (count, 5))
    return source, first, length, types, docs[a]


def _pairs(lengths: list[int], docs: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(first sentence, second sentence or -1) of each sequence, greedily from the left as
    pack_document pairs them."""
    a, b, i, n = [], [], 0, len(lengths)
    while i < n:
        if i + 1 < n and docs[i] == docs[i + 1] and lengths[i] + lengths[i + 1] + 3 <= max_len:
            a.append(i)
            b.append(i + 1)
            i += 2
        else:
            a.append(i)
            b.append(-1)
            i += 1
    return np.array(a, np.int64), np.array(b, np.int64)


def _contiguous_pieces(source, starts, lengths, docs, max_len):
    """Pieces of the contiguous packing: the documents as one stream, [SEP] between documents, cut into
    [CLS] window [SEP] sequences of max_len. A window belongs to the document its first token is from
    (a [SEP] between documents, to the one before it)."""
    sep_at = len(source) - 1
    # A document's non-empty sentences are consecutive in the flat ids: its tokens are one range.
    new_doc = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]]) if len(docs) else np.zeros(0, np.int64)
    doc_len = np.add.reduceat(lengths, new_doc) if len(docs) else np.zeros(0, np.int64)
    separator = (np.arange(len(new_doc)) > 0).astype(np.int64)  # before every document but the first
    stream = source[_gather_index(np.stack([np.full(len(new_doc), sep_at), starts[new_doc]], 1).ravel(),
                                  np.stack([separator, doc_len], 1).ravel())]
    doc_first = np.cumsum(separator + doc_len) - doc_len  # where each document's tokens start in the stream
    body = max_len - 2
    window = np.arange(0, len(stream), body)
    count, one = len(window), np.ones(len(window), np.int64)
    stream_source = np.concatenate([stream, source[-2:]])
    first = np.stack([len(stream) * one, window, (len(stream) + 1) * one], 1)
    length = np.stack([one, np.minimum(body, len(stream) - window), one], 1)
    seq_docs = docs[new_doc][np.searchsorted(doc_first, window, "right") - 1] if count else docs[:0]
    return stream_source, first, length, np.zeros((count, 3), np.int8), seq_docs


def _gather_index(first: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Indices into the source that lay the pieces (first[i], length[i]) end to end."""
    length = length.astype(np.int64, copy=False)
    out_start = np.cumsum(length) - length
    return np.arange(int(length.sum()), dtype=np.int64) + np.repeat(first.astype(np.int64) - out_start, length)


def _assemble(source, first, length, types, seq_docs) -> pa.Table:
    ids = source[_gather_index(first.ravel(), length.ravel())]
    token_types = np.repeat(types.ravel(), length.ravel())
    offsets = pa.array(np.concatenate([[0], np.cumsum(length.sum(1))]).astype(np.int32))
    return pa.table({
        "doc_id": pa.array(np.asarray(seq_docs, np.int64)),
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32, copy=False))),
        "token_type_ids": pa.ListArray.from_arrays(offsets, pa.array(token_types.astype(np.int8, copy=False))),
    })


# ---- the same packings on Python lists (the reference the array packer is tested against), and the
# reference's line pairs --------------------------------------------------------------------------------

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
    """Sentence pairs of consecutive sentences, each fitting max_len with its 3 special tokens; a sentence
    longer than max_len - 2 tokens is first split into windows of max_len - 2 (no token is cut off)."""
    body = max_len - 2
    sentences = [s[i : i + body] for s in sentences for i in range(0, max(len(s), 1), body)]
    i = 0
    while i < len(sentences):
        a = sentences[i]
        b = sentences[i + 1] if i + 1 < len(sentences) else None
        if b is not None and len(a) + len(b) + 3 <= max_len:
            yield [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)
            i += 2
        else:
            yield [cls, *a, sep], [0] * (len(a) + 2)
            i += 1


MIN_REFERENCE_CHARS, MIN_REFERENCE_WORDS = 5, 5  # the reference's filters of lines and pairs


def pack_reference_pairs(texts: list[str], encoded: list[list[int]], max_len: int, cls: int, sep: int,
                         dropped: Counter | None = None):
    """Sentence pairs as the reference's pretrainer.py reads them: lines two by two ([CLS] A [SEP] B [SEP]),
    a line under 5 characters skipped where it would be A, a pair dropped when B is under 5 characters or
    the two have under 5 words together, a document's odd last line dropped (it pairs with the blank line),
    and a pair longer than max_len cut longest-first, as its fast tokenizer does. The tokens each of these
    leaves out are added to `dropped` by reason."""
    dropped = Counter() if dropped is None else dropped
    i = 0
    while i + 1 < len(texts):
        if len(texts[i]) < MIN_REFERENCE_CHARS:
            dropped["short_lines"] += len(encoded[i])
            i += 1
            continue
        a, b, words = encoded[i], encoded[i + 1], len(texts[i].split()) + len(texts[i + 1].split())
        keep = len(texts[i + 1]) >= MIN_REFERENCE_CHARS and words >= MIN_REFERENCE_WORDS
        i += 2
        if not keep:
            dropped["filtered_pairs"] += len(a) + len(b)
            continue
        cut_a, cut_b = truncate_longest_first(a, b, max_len - 3)
        dropped["cut_to_max_seq_len"] += len(a) + len(b) - len(cut_a) - len(cut_b)
        yield [cls, *cut_a, sep, *cut_b, sep], [0] * (len(cut_a) + 2) + [1] * (len(cut_b) + 1)
    if i < len(texts):  # the odd last line, or a last line skipped as too short to be A
        dropped["odd_last_lines" if len(texts[i]) >= MIN_REFERENCE_CHARS else "short_lines"] += len(encoded[i])


def truncate_longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """A pair cut to `budget` tokens as the Hugging Face tokenizers' longest_first strategy cuts it: only the
    longer one while that suffices, else each to half the budget (the longer one gets the odd token)."""
    if len(a) + len(b) <= budget:
        return a, b
    short, long = sorted((len(a), len(b)))
    keep_long = short if short > budget else max(short, budget - short)
    keep_short = short
    if keep_short + keep_long > budget:
        keep_short, keep_long = budget // 2, budget // 2 + budget % 2
    if len(a) > len(b):
        return a[:keep_long], b[:keep_short]
    return a[:keep_short], b[:keep_long]


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
