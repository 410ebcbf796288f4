"""The optional train_tokenizer stage: WordPiece and Unigram, cased and uncased, trained on real
sentences of the shared corpus and loaded back with AutoTokenizer."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from pipeline.common import StageError
from pipeline.tokenizer import SPECIAL_TOKENS, train

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "corpus" / "train.txt.gz"
SENTENCES = 5000
VOCAB_SIZE = 1000
CONFIGS = [("wordpiece", False), ("wordpiece", True), ("unigram", False), ("unigram", True)]
PLAIN = "the quick brown fox jumps over the lazy dog"


def params(model: str, lowercase: bool, **extra) -> dict:
    return {"model": model, "vocab_size": VOCAB_SIZE, "lowercase": lowercase, "min_frequency": 2, **extra}


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is absent")
    lines = []
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip("\n"))
                if len(lines) == SENTENCES:
                    break
    return lines


@pytest.fixture(scope="module")
def trained(sentences, tmp_path_factory) -> dict:
    """(model, lowercase) -> (directory, what train returned), each trained once."""
    out = {}
    for model, lowercase in CONFIGS:
        directory = tmp_path_factory.mktemp("tok") / f"{model}-{'uncased' if lowercase else 'cased'}"
        out[model, lowercase] = directory, train(iter(sentences), directory, params(model, lowercase))
    return out


def load(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("model,lowercase", CONFIGS)
def test_loads_as_a_fast_bert_style_tokenizer(trained, model, lowercase):
    directory, result = trained[model, lowercase]
    assert result == {"vocab_size": VOCAB_SIZE, "model": model, "lowercase": lowercase}
    tok = load(directory)
    assert tok.is_fast and len(tok) == VOCAB_SIZE and tok.model_max_length == 512
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    ids = (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert not list(directory.parent.glob(".*.tmp")), "atomic_output left its temporary directory"


@pytest.mark.parametrize("model,lowercase", CONFIGS)
def test_pair_encoding(trained, model, lowercase):
    tok = load(trained[model, lowercase][0])
    a = tok("the cat sat", add_special_tokens=False)["input_ids"]
    b = tok("on the mat", add_special_tokens=False)["input_ids"]
    pair = tok("the cat sat", "on the mat")
    assert pair["input_ids"] == [2, *a, 3, *b, 3]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok("the cat sat")["input_ids"] == [2, *a, 3]


@pytest.mark.parametrize("model,lowercase", CONFIGS)
def test_casing(trained, model, lowercase):
    tok = load(trained[model, lowercase][0])

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    if lowercase:
        assert ids("Hello World") == ids("hello world")
        assert ids("Café") == ids("cafe")  # accents stripped, as BERT uncased
    else:
        assert ids("Hello World") != ids("hello world")
        assert ids("Café") != ids("cafe")
        assert any(piece.lstrip("▁").startswith("H") for piece in tok.convert_ids_to_tokens(ids("Hello")))


@pytest.mark.parametrize("model,lowercase", CONFIGS)
def test_round_trip_and_unknown_characters(trained, model, lowercase):
    tok = load(trained[model, lowercase][0])
    for text in (PLAIN, "Results of the second experiment were better than expected."):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == (text.lower() if lowercase else text)
    # A character never seen in training is [UNK], not silently dropped.
    assert tok.unk_token_id in tok("☃", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
def test_training_twice_gives_identical_files(trained, sentences, tmp_path, model):
    # Hugging Face's trainers alone do not: they walk their word counts in a random hash order, a new
    # one for each training even within one process.
    first = trained[model, True][0]
    second = tmp_path / "again"
    train(iter(sentences), second, params(model, True))
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "tokenizer.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_wordpiece_warns_when_a_continuation_token_was_missed(tmp_path, monkeypatch, caplog):
    import pipeline.tokenizer as module

    monkeypatch.setattr(module, "_continuation_chars", lambda texts, tokenizer: {"e"})
    train(["hello world"] * 3, tmp_path / "tok", params("wordpiece", True))
    assert "continuation tokens (##d ##l ##o ##r) were missed" in caplog.text


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
def test_tiny_corpus_gives_a_smaller_vocabulary(tmp_path, model):
    result = train(["hello world", "hello there world"], tmp_path / "tiny", params(model, True))
    assert 5 < result["vocab_size"] < VOCAB_SIZE
    assert len(load(tmp_path / "tiny")) == result["vocab_size"]


def test_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    train(["hello world"] * 3, out, params("wordpiece", True))
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
@pytest.mark.parametrize("lines", [[], ["", "   ", "\n"]])
def test_no_text_is_a_stage_error(tmp_path, model, lines):
    with pytest.raises(StageError, match="no text to train a tokenizer on"):
        train(iter(lines), tmp_path / "tok", params(model, True))
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("bad", [{"model": "bpe"}, {"vocab_size": 3}, {"lowercase": "yes"}])
def test_bad_params_are_stage_errors(tmp_path, bad):
    with pytest.raises(StageError, match="train_tokenizer"):
        train(["hello world"], tmp_path / "tok", {**params("wordpiece", True), **bad})


def test_unigram_vocabulary_smaller_than_the_alphabet_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="vocab_size 10"):
        train([PLAIN], tmp_path / "tok", params("unigram", True, vocab_size=10))
    assert not (tmp_path / "tok").exists()
