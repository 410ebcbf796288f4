"""Optional stage train_tokenizer: a WordPiece or Unigram vocabulary trained on the corpus (Hugging Face tokenizers).

A BERT-style tokenizer: BertNormalizer (uncased lowercases and strips accents, cased does neither; or with
normalizer `reference`, as the reference's train_tokenizer.py: `` and '' become ", lowercased if uncased), then
BertPreTokenizer and WordPiece ("##" continues a word), or Metaspace and Unigram (SentencePiece style);
[PAD] [UNK] [CLS] [SEP] [MASK] are ids 0..4 and pairs become [CLS] A [SEP] B [SEP], B with token type 1.
It is saved with save_pretrained for AutoTokenizer, and trained on the sentences of the documents that
shard_corpus puts in training (the same reader, validation split and bad-input policy). The files
depend only on the sentences and the params: the Hugging Face trainers walk their word counts in a random
hash order, new for each training, so WordPiece's "##x" tokens get their ids before training and Unigram's
scores are rounded and sorted.

    python -m pipeline.tokenizer --text corpus/ --model tokenizer/model --manifest tokenizer/manifest.json \
        --params '{"model": "wordpiece", "vocab_size": 16000, "lowercase": true, "min_frequency": 2, ...}'
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .cli import run
from .common import StageError, log
from .data import contract
from .data.integrity import atomic_output, file_entries, write_record
from .data.text import DEFAULTS, Skipped, input_files, read_chunks, validation_flags

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNK, CLS, SEP = "[UNK]", "[CLS]", "[SEP]"
CONTINUING_PREFIX = "##"
# Unigram scores are log-probabilities around -3..-15; run-to-run noise is below 1e-10, so rounding to
# 1e-4 makes them reproducible and changes no segmentation that was not already a near-tie.
SCORE_DECIMALS = 4
PENALTY_STEP = 0.0001  # the step the Unigram trainer adds between characters it re-inserts
# BERT's inputs: transformers' generic fast tokenizer leaves token_type_ids out unless asked.
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def train(sentences: Iterable[str], out_dir: str | Path, params: dict) -> dict:
    """Train a tokenizer on `sentences` and save it (save_pretrained) to `out_dir`, atomically.

    params: model ("wordpiece" or "unigram"), vocab_size, lowercase, min_frequency (WordPiece only),
    model_max_length (default 512). The sentences are held in memory: WordPiece reads them twice."""
    kind, vocab_size, lowercase = _check(params)
    texts = [text for text in sentences if text and not text.isspace()]
    if not texts:
        raise StageError("the corpus has no text to train a tokenizer on")
    normalizer = _normalizer(lowercase, params.get("normalizer", "bert"))
    if kind == "wordpiece":
        tokenizer = _train_wordpiece(texts, vocab_size, normalizer, int(params.get("min_frequency", 2)))
    else:
        tokenizer = _train_unigram(texts, vocab_size, normalizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, SPECIAL_TOKENS.index(CLS)), (SEP, SPECIAL_TOKENS.index(SEP))])
    _save(tokenizer, Path(out_dir), int(params.get("model_max_length", 512)))
    return {"vocab_size": tokenizer.get_vocab_size(), "model": kind, "lowercase": lowercase}


def _check(params: dict) -> tuple[str, int, bool]:
    kind = params.get("model")
    if kind not in ("wordpiece", "unigram"):
        raise StageError(f"train_tokenizer: model must be 'wordpiece' or 'unigram', not {kind!r}")
    vocab_size = params.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise StageError(f"train_tokenizer: vocab_size must be an integer above {len(SPECIAL_TOKENS)} "
                         f"(the special tokens), not {vocab_size!r}")
    lowercase = params.get("lowercase")
    if not isinstance(lowercase, bool):
        raise StageError(f"train_tokenizer: lowercase must be true or false, not {lowercase!r}")
    return kind, vocab_size, lowercase


def _fit(tokenizer: Tokenizer, texts: list[str], trainer: trainers.Trainer) -> None:
    try:
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    except Exception as err:  # tokenizers raises bare Exceptions, e.g. a vocabulary smaller than the alphabet
        raise StageError(f"training the tokenizer failed: {err} (vocab_size {trainer.vocab_size})") from None


def _normalizer(lowercase: bool, kind: str = "bert") -> normalizers.Normalizer:
    if kind == "reference":  # the reference's train_tokenizer.py: LaTeX-style quotes become ", nothing else
        steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
        return normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))
    if kind != "bert":
        raise StageError(f"train_tokenizer: normalizer must be 'bert' or 'reference', not {kind!r}")
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                      lowercase=lowercase)


# ---- WordPiece ---------------------------------------------------------------------------------

def _train_wordpiece(texts: list[str], vocab_size: int, normalizer, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUING_PREFIX))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUING_PREFIX)
    # The trainer creates "##x" tokens lazily while walking its word counts in hash order, and their ids
    # break ties between equally frequent merges: listed after the special tokens they get fixed ids.
    continuations = [CONTINUING_PREFIX + c for c in sorted(_continuation_chars(texts, tokenizer))]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + continuations,
                                        continuing_subword_prefix=CONTINUING_PREFIX)
    _fit(tokenizer, texts, trainer)
    known = set(continuations)
    lazy = sorted(t for t in tokenizer.get_vocab() if t.startswith(CONTINUING_PREFIX)
                  and len(t) == len(CONTINUING_PREFIX) + 1 and t not in known)
    if lazy:
        log.warning("train_tokenizer: %d continuation tokens (%s) were missed before training; their ids, "
                    "and so the vocabulary, may differ between runs", len(lazy), " ".join(lazy[:10]))
    return _drop_added_tokens(tokenizer, known)


def _continuation_chars(texts: list[str], tokenizer: Tokenizer) -> set[str]:
    """Characters that occur inside a word (not first), after normalization and pre-tokenization."""
    # Both steps work character by character between spaces, so each distinct space-free chunk is
    # processed once instead of every sentence.
    chunks: set[str] = set()
    for text in texts:
        chunks.update(text.split(" "))
    chars: set[str] = set()
    for chunk in chunks:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(chunk)):
            chars.update(word[1:])
    return chars


def _drop_added_tokens(tokenizer: Tokenizer, contents: set[str]) -> Tokenizer:
    """The tokenizer without the added tokens in `contents` (they stay in the model's vocabulary)."""
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in contents]
    return Tokenizer.from_str(json.dumps(state))


# ---- Unigram -----------------------------------------------------------------------------------

def _train_unigram(texts: list[str], vocab_size: int, normalizer) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                      show_progress=False)
    _fit(tokenizer, texts, trainer)
    return _canonical_unigram(tokenizer)


def _canonical_unigram(tokenizer: Tokenizer) -> Tokenizer:
    """The trained Unigram model with reproducible scores and order: the special tokens first, then the
    pieces by decreasing score, ties by piece."""
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    specials, pieces = vocab[:len(SPECIAL_TOKENS)], dict(vocab[len(SPECIAL_TOKENS):])
    if [piece for piece, _ in specials] != SPECIAL_TOKENS:
        raise StageError(f"the Unigram trainer did not put the special tokens first: {specials}")
    _floor_reinserted_chars(pieces)
    scores = {piece: round(score, SCORE_DECIMALS) for piece, score in pieces.items()}
    ordered = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    state["model"]["vocab"] = [[piece, 0.0] for piece, _ in specials] + [list(item) for item in ordered]
    state["model"]["unk_id"] = SPECIAL_TOKENS.index(UNK)
    return Tokenizer.from_str(json.dumps(state))


def _floor_reinserted_chars(scores: dict[str, float]) -> None:
    """Put on the floor the characters EM dropped and the trainer put back.

    The trainer gives them the lowest score plus 0, 1, 2, ... steps of 1e-4 in hash order, so which
    character gets which step changes from run to run; it computes them exactly as below."""
    floor = min(scores.values())
    singles: dict[float, list[str]] = {}
    for piece, score in scores.items():
        if len(piece) == 1:
            singles.setdefault(score, []).append(piece)
    penalty = PENALTY_STEP
    while floor + penalty in singles:
        for piece in singles[floor + penalty]:
            scores[piece] = floor
        penalty += PENALTY_STEP


# ---- saving ------------------------------------------------------------------------------------

def _save(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK, pad_token="[PAD]", cls_token=CLS,
                                   sep_token=SEP, mask_token="[MASK]", model_max_length=model_max_length,
                                   model_input_names=MODEL_INPUT_NAMES)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        fast.save_pretrained(tmp)


# ---- the stage ---------------------------------------------------------------------------------

def training_sentences(files: list[Path], params: dict, skipped) -> Iterator[str]:
    """The sentences of the documents shard_corpus will put in training (validation ones are left out)."""
    limit = params["max_sentences"] or None
    sentences = (s for chunk in read_chunks(files, params, skipped)
                 for doc, held_out in zip(chunk.documents,
                                          validation_flags(chunk, params["validation_fraction"], params["seed"]))
                 if not held_out for s in doc)
    return itertools.islice(sentences, limit)


def train_stage(files: list[Path], out_dir: str, manifest_path: str, params: dict) -> dict:
    params = {**DEFAULTS, **params}
    skipped = Skipped(params["bad_input"])
    counted = _Counted(training_sentences(files, params, skipped))
    info = train(counted, out_dir, params)
    record = {"format_version": contract.FORMAT_VERSION["tokenizer"], **info, "sentences": counted.count,
              "inputs": [str(f) for f in files], "skipped": dict(skipped.counts), "params": params,
              "files": file_entries(Path(manifest_path).parent, [out_dir])}
    write_record(manifest_path, record)
    log.info("tokenizer: %s, %d tokens, trained on %d sentences", info["model"], info["vocab_size"], counted.count)
    return record


class _Counted:
    def __init__(self, items: Iterable[str]):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def main(paths, params: dict) -> dict:
    return train_stage(input_files(paths.text), paths.model, paths.manifest, params)


if __name__ == "__main__":
    run("tokenizer", main)
