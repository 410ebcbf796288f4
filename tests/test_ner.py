"""Issue #34: token classification (format conll): the CoNLL layout read, entity-level F1 as conlleval and
seqeval compute it, and a fine-tuning with labels on first sub-tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.common import StageError
from pipeline.data.conll import entities, entity_scores, read_conll
from pipeline.data.tasks import read_split, task_files, task_spec
from pipeline.stages import call

from conftest import SHARED, save_tiny_teacher

NER = SHARED / "ner" / "conll2002-esp"
needs_ner = pytest.mark.skipif(not NER.is_dir(), reason="../shared/data/ner is not beside this checkout")


def test_entities_follow_conllevals_rules_for_iob1_and_iob2():
    # IOB1 (CoNLL-2003's own): I- starts an entity after O or another type; B- only between two of one type.
    assert entities(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == {("PER", 0, 1), ("LOC", 3, 3),
                                                                             ("LOC", 4, 4), ("ORG", 5, 5)}
    # IOB2: every entity starts with B-; an I- of another type starts a new one.
    assert entities(["B-PER", "I-PER", "I-LOC", "O", "B-MISC"]) == {("PER", 0, 1), ("LOC", 2, 2), ("MISC", 4, 4)}
    assert entities(["O", "O"]) == set()


def test_entity_f1_equals_seqevals_on_random_tag_sequences():
    """seqeval in its default mode is the conlleval-compatible reference implementation."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for _ in range(50):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        predicted = [[t if rng.random() < 0.7 else rng.choice(tags) for t in sentence] for sentence in gold]
        ours = entity_scores(gold, predicted)
        assert ours["f1"] == pytest.approx(f1_score(gold, predicted))
        assert ours["precision"] == pytest.approx(precision_score(gold, predicted))
        assert ours["recall"] == pytest.approx(recall_score(gold, predicted))


def test_the_conll_layout_is_read_and_malformed_lines_are_named(tmp_path):
    (tmp_path / "train.txt").write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\n\n"
                                        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    sentences, tags = read_conll(tmp_path / "train.txt")
    assert sentences == [("EU", "rejects"), ("Peter", "Blackburn")]
    assert tags == [("I-ORG", "O"), ("I-PER", "I-PER")]
    (tmp_path / "bad.txt").write_text("EU I-ORG\nrejects\n")
    with pytest.raises(StageError, match=r"bad.txt, line 2: one column"):
        read_conll(tmp_path / "bad.txt")
    (tmp_path / "bad.txt").write_text("EU E-ORG\n")
    with pytest.raises(StageError, match=r"bad.txt, line 1: tag 'E-ORG' is not O, B-<type> or I-<type>"):
        read_conll(tmp_path / "bad.txt")


@needs_ner
def test_the_real_conll2002_task_is_read_sentence_for_sentence():
    spec = task_spec({"format": "conll", "path": str(NER)})
    train, devs = task_files({"format": "conll", "path": str(NER)})
    expected = {train: 8323, devs[0]: 1915}  # sentences, as ../shared/data/README.md counts them
    for path, count in expected.items():
        sentences, tags = read_split(Path(path), spec)
        assert len(sentences) == len(tags) == count
        assert all(len(s) == len(t) for s, t in zip(sentences, tags))
    assert {tag for sentence in tags for tag in sentence} == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG",
                                                               "I-ORG", "B-MISC", "I-MISC"}


def test_a_token_task_fine_tunes_to_its_entities(tmp_path):
    """Labels sit on each word's first sub-token; a word the truncation cut counts as predicted O."""
    rows = []
    for i in range(40):
        rows.append(f"señor B-PER\nsmith I-PER\nvisited O\nparis B-LOC\n\nthe O\nunited B-ORG\nnations I-ORG\n"
                    f"met O\n{'x' * (i % 3 + 1)} O\n")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "train.txt").write_text("\n".join(rows))
    (tmp_path / "task" / "dev.txt").write_text("\n".join(rows[:6]))
    model = save_tiny_teacher(tmp_path / "student", with_mlm_head=True)
    task = {"format": "conll", "path": str(tmp_path / "task")}
    train, devs = task_files(task)
    params = {"seed": 1, "epochs": 6, "batch_size": 8, "learning_rate": 2e-3, "weight_decay": 0.0,
              "warmup_fraction": 0.0, "max_seq_len": 32, "max_train_examples": 0, "device": "cpu", "task": task}
    result = call("finetune", params, train=train, dev=devs, model=str(model), model_summary=None,
                  scores=str(tmp_path / "scores.json"))
    assert result["metrics"] == ["f1"] and result["labels"] == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O"]
    assert result["score"] == result["final"]["f1"] > 0.9
    short = call("finetune", {**params, "max_seq_len": 4, "epochs": 1}, train=train, dev=devs, model=str(model),
                 model_summary=None, scores=str(tmp_path / "short.json"))
    assert short["final"]["recall"] < 1.0  # the entities past 2 sub-tokens are missed, not dropped from the count
