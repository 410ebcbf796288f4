"""Small GLUE task directories in each task's exact official TSV layout (the column sets, their order, the
parse columns and the unquoted text of the GLUE distribution), for the tasks ../shared/data lacks: MNLI, QQP,
QNLI. Each row's text carries its label's words, so a tiny model can learn the task."""

from __future__ import annotations

from pathlib import Path

WORDS = {"entailment": "surely indeed", "neutral": "maybe perhaps", "contradiction": "never not",
         "0": "different unlike", "1": "same alike", "not_entailment": "never not"}
MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = [*MNLI_TRAIN[:10], "label1", "label2", "label3", "label4", "label5", "gold_label"]


def _parse(text: str) -> str:
    return "( " + " ".join(f"( {w} )" for w in text.split()) + " )"


def mnli_rows(count: int, genre: str) -> list[dict]:
    labels = ["entailment", "neutral", "contradiction"]
    rows = []
    for i in range(count):
        label = labels[i % 3]
        first, second = f"The {genre} story {i} says \"it\" rains.", f"It {WORDS[label]} rains ({i})."
        rows.append({"index": str(i), "promptID": str(1000 + i), "pairID": f"{1000 + i}{'enc'[i % 3]}", "genre": genre,
                     "sentence1_binary_parse": _parse(first), "sentence2_binary_parse": _parse(second),
                     "sentence1_parse": f"(ROOT (S {first}))", "sentence2_parse": f"(ROOT (S {second}))",
                     "sentence1": first, "sentence2": second, "label1": label, "label2": label, "label3": label,
                     "label4": label, "label5": label, "gold_label": label})
    return rows


def qqp_rows(count: int) -> list[dict]:
    return [{"id": str(i), "qid1": str(2 * i + 1), "qid2": str(2 * i + 2), "question1": f"How do I cook rice {i}?",
             "question2": f"Is it {WORDS[str(i % 2)]} to cook rice {i}?", "is_duplicate": str(i % 2)}
            for i in range(count)]


def qnli_rows(count: int) -> list[dict]:
    labels = ["entailment", "not_entailment"]
    return [{"index": str(i), "question": f"What colour is sky {i}?",
             "sentence": f"The sky {WORDS[labels[i % 2]]} is blue {i}.", "label": labels[i % 2]} for i in range(count)]


def write(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(columns) + "\n" + "".join("\t".join(r[c] for c in columns) + "\n" for r in rows))


def make(root: Path, train: int = 48, dev: int = 12) -> dict[str, dict[str, list[dict]]]:
    """MNLI/, QQP/ and QNLI/ under root; returns each task's rows by file name."""
    files = {"MNLI": {"train.tsv": (MNLI_TRAIN, mnli_rows(train, "fiction")),
                      "dev_matched.tsv": (MNLI_DEV, mnli_rows(dev, "fiction")),
                      "dev_mismatched.tsv": (MNLI_DEV, mnli_rows(dev + 3, "letters"))},
             "QQP": {"train.tsv": (list(qqp_rows(1)[0]), qqp_rows(train)),
                     "dev.tsv": (list(qqp_rows(1)[0]), qqp_rows(dev))},
             "QNLI": {"train.tsv": (list(qnli_rows(1)[0]), qnli_rows(train)),
                      "dev.tsv": (list(qnli_rows(1)[0]), qnli_rows(dev))}}
    for task, splits in files.items():
        for name, (columns, rows) in splits.items():
            write(root / task / name, columns, rows)
    return {task: {name: rows for name, (_, rows) in splits.items()} for task, splits in files.items()}


def all_of_glue(root: Path, shared: Path) -> Path:
    """root/<task> for every GLUE task: the real ones of ../shared/data/glue (linked), fixtures for the rest."""
    make(root)
    for task in shared.iterdir():
        if task.is_dir() and not (root / task.name).exists():
            (root / task.name).symlink_to(task.resolve())
    return root
