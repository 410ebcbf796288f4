"""Token classification tasks in CoNLL layout (`format: conll`): named-entity recognition as the MLSM reference
evaluates it (CoNLL-2003), and any task of the same layout.

A file holds one token a line, its columns separated by whitespace, the tag in the last column (CoNLL-2003:
word POS chunk NER; CoNLL-2002: word POS NER), a blank line between sentences; `-DOCSTART-` lines separate
documents and are skipped. Tags are IOB1 (CoNLL-2003's own: B- only between two adjacent entities of one type)
or IOB2 (every entity starts with B-): `O`, `B-<type>`, `I-<type>`.

The score is entity-level micro F1 as conlleval computes it (and seqeval in its default mode): an entity is a
maximal chunk of one type by conlleval's start and end rules, which read IOB1 and IOB2 alike; a predicted
entity counts when its type and its first and last tokens equal a gold entity's.
"""

from __future__ import annotations

from pathlib import Path

from ..common import StageError


def read_conll(path: Path) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(words, tags) of each sentence; StageError naming the file and line of a malformed one."""
    sentences, tags, words, labels = [], [], [], []

    def close_sentence():
        if words:
            sentences.append(tuple(words))
            tags.append(tuple(labels))
            words.clear()
            labels.clear()

    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                close_sentence()
                continue
            if len(fields) < 2:
                raise StageError(f"{path}, line {number}: one column ({line.strip()!r}); a CoNLL line is a token "
                                 f"and its tag (the last column), separated by whitespace")
            check_tag(fields[-1], f"{path}, line {number}")
            words.append(fields[0])
            labels.append(fields[-1])
    close_sentence()
    return sentences, tags


def check_tag(tag: str, where: str) -> None:
    if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise StageError(f"{where}: tag {tag!r} is not O, B-<type> or I-<type> (IOB1 or IOB2, the tag in the "
                         f"last column)")


def entities(tags: list[str] | tuple[str, ...]) -> set[tuple[str, int, int]]:
    """The (type, first, last) chunks of one sentence's tags, by conlleval's rules."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):  # a final O closes a chunk that runs to the end
        prefix, tag_kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        if start is not None and (prefix in ("B", "O") or tag_kind != kind):
            found.add((kind, start, i - 1))
            start = None
        if prefix != "O" and start is None:  # B-X, or I-X after O or after another type
            start, kind = i, tag_kind
    return found


def entity_scores(gold: list, predicted: list) -> dict[str, float]:
    """Micro precision, recall and F1 over the entities of every sentence (0 where undefined, as conlleval)."""
    correct = guessed = expected = 0
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        truth, guess = entities(gold_tags), entities(predicted_tags)
        correct, guessed, expected = correct + len(truth & guess), guessed + len(guess), expected + len(truth)
    precision = correct / guessed if guessed else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def encode_words(tokenizer, sentences: list, tag_ids: list | None, max_length: int):
    """Tokenised sentences; with `tag_ids`, "labels": each word's tag id on its first sub-token, -100 on the rest
    (and on the special tokens), so that the loss counts every word once. "first_tokens" holds each sentence's
    first sub-token position of every word the truncation kept (the prediction of the word)."""
    encoding = tokenizer([list(words) for words in sentences], is_split_into_words=True, truncation=True,
                         max_length=max_length)
    firsts, labels = [], []
    for row in range(len(sentences)):
        word_ids, previous, first = encoding.word_ids(row), None, []
        for position, word in enumerate(word_ids):
            if word is not None and word != previous:
                first.append(position)
            previous = word
        firsts.append(first)
        if tag_ids is not None:
            row_labels = [-100] * len(word_ids)
            for word, position in enumerate(first):
                row_labels[position] = int(tag_ids[row][word])
            labels.append(row_labels)
    encoding["first_tokens"] = firsts
    if tag_ids is not None:
        encoding["labels"] = labels
    return encoding
