"""Packing of a chunk's tokenized sentences into sequences, on numpy arrays.

The same sequences as pipeline.corpus.pack_document (sentence pairs) and pack_contiguous, built from
the chunk's ids as one flat array instead of a Python list per sequence: building those lists took as
long as everything else shard_corpus adds to tokenization (bench/sharding.py). Only the pairing
decision runs in Python, on the sentence lengths; the ids are gathered in one numpy index operation.

Every sequence is a list of pieces: [CLS], a range of the flat ids, [SEP], another range, [SEP]
(empty pieces have length 0). A piece is (first index into the source, length, token type), where the
source is the flat ids followed by [CLS] and [SEP].
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def packed_table(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, docs: np.ndarray, packing: str,
                 max_len: int, cls: int, sep: int) -> pa.Table:
    """The sequences (doc_id, input_ids, token_type_ids) of one split: its non-empty sentences in order,
    sentence i being flat[starts[i] : starts[i] + lengths[i]] of document docs[i]."""
    source = np.concatenate([flat.astype(np.int32, copy=False), np.array([cls, sep], np.int32)])
    pieces = (_contiguous_pieces if packing == "contiguous" else _pair_pieces)(source, starts, lengths, docs, max_len)
    return _assemble(*pieces)


def _pair_pieces(source, starts, lengths, docs, max_len):
    """Pieces of the sentence-pair packing: consecutive sentences of a document as [CLS] A [SEP] B [SEP]
    while the pair fits max_len, else [CLS] A [SEP] with A cut to fit."""
    cls_at, sep_at = len(source) - 2, len(source) - 1
    a, b = _pairs(lengths.tolist(), docs.tolist(), max_len)
    has_b = b >= 0
    b_safe = np.where(has_b, b, a)
    a_len = np.where(has_b, lengths[a], np.minimum(lengths[a], max_len - 2))
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
