"""Downstream tasks: which columns, labels and metrics a task has, and how its files are read.

A task is a GLUE task directory (official layout, train.tsv and dev.tsv; the task's name fixes its columns
and official metric; MNLI-mm scores MNLI on its mismatched dev set) or train/dev files with configured
text and label columns: train.tsv/dev.tsv (header row), train.csv/dev.csv (header row, quoted fields) or
train.jsonl/dev.jsonl (one object per line). No heavy imports: the workflow reads the file names at parse.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from ..common import Progress, StageError, log
from .conll import read_conll

csv.field_size_limit(sys.maxsize)
LARGE_BYTES = 64 << 20  # task files at least this large are announced in the log (QQP's train.tsv: 40 MB)


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple  # one column, or two for sentence pairs
    label_column: str
    metrics: tuple       # official metrics, the first two averaged into the score when there are two
    header: bool = True
    dev_file: str = "dev.tsv"
    labels: tuple | None = None  # the task's label set, where it is fixed (GLUE classification tasks)
    train_file: str = "train.tsv"
    # Further dev sets scored by the same fine-tuning, each reported as its own entry "<task>-<suffix>" (MNLI:
    # matched and mismatched genres); with them, dev_file's entry is "<task>-<dev_suffix>".
    more_dev: tuple = ()  # ((suffix, file), ...)
    dev_suffix: str = ""
    token_level: bool = False  # a tag per word (format conll: pipeline/data/conll.py), not one per example

    @property
    def regression(self) -> bool:
        return self.metrics[0] == "pearson"


BINARY, ENTAILMENT = ("0", "1"), ("entailment", "not_entailment")
GLUE = {
    # CoLA's files have no header: source, label, original label, sentence.
    "CoLA": TaskSpec((3,), 1, ("mcc",), header=False, labels=BINARY),
    "SST-2": TaskSpec(("sentence",), "label", ("accuracy",), labels=BINARY),
    "MRPC": TaskSpec(("#1 String", "#2 String"), "Quality", ("f1", "accuracy"), labels=BINARY),
    "QQP": TaskSpec(("question1", "question2"), "is_duplicate", ("f1", "accuracy"), labels=BINARY),
    "STS-B": TaskSpec(("sentence1", "sentence2"), "score", ("pearson", "spearman")),
    # One fine-tuning scored on both dev sets, GLUE's two entries MNLI-m and MNLI-mm.
    "MNLI": TaskSpec(("sentence1", "sentence2"), "gold_label", ("accuracy",), dev_file="dev_matched.tsv",
                     labels=("contradiction", "entailment", "neutral"), dev_suffix="m",
                     more_dev=(("mm", "dev_mismatched.tsv"),)),
    # The mismatched dev set alone (a fine-tuning of its own).
    "MNLI-mm": TaskSpec(("sentence1", "sentence2"), "gold_label", ("accuracy",), dev_file="dev_mismatched.tsv",
                        labels=("contradiction", "entailment", "neutral")),
    "QNLI": TaskSpec(("question", "sentence"), "label", ("accuracy",), labels=ENTAILMENT),
    "RTE": TaskSpec(("sentence1", "sentence2"), "label", ("accuracy",), labels=ENTAILMENT),
    "WNLI": TaskSpec(("sentence1", "sentence2"), "label", ("accuracy",), labels=BINARY),
}
METRICS_OF = {"accuracy": ("accuracy",), "f1": ("f1", "accuracy"), "mcc": ("mcc",), "pearson": ("pearson", "spearman")}


def glue_name(task: dict) -> str:
    """The GLUE entry a `format: glue` task config names: glue_task, else its directory's name."""
    return task.get("glue_task") or Path(task["path"]).name


def glue_task(task: dict) -> str | None:
    """The GLUE task a task config names (MNLI-mm scores MNLI), or None for another format."""
    if task["format"] != "glue":
        return None
    name = glue_name(task)
    return "MNLI" if name == "MNLI-mm" else name


def task_spec(task: dict) -> TaskSpec:
    if task["format"] == "glue":
        name = glue_name(task)
        if name not in GLUE:
            raise StageError(f"GLUE task directory {task['path']!r}: unknown task {name!r} "
                             f"(set glue_task to one of {', '.join(GLUE)})")
        return GLUE[name]
    if task["format"] == "conll":
        return TaskSpec((), "", ("f1",), train_file="train.txt", dev_file="dev.txt", token_level=True)
    suffix = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl"}[task["format"]]
    return TaskSpec(tuple(task["text_columns"]), task["label_column"], METRICS_OF[task.get("metric", "accuracy")],
                    train_file=f"train.{suffix}", dev_file=f"dev.{suffix}")


def read_split(path: Path, spec: TaskSpec) -> tuple[list[tuple[str, ...]], list[str]]:
    """Texts and labels of one split; StageError naming the file and line of a malformed row or label."""
    if not path.is_file():
        raise StageError(f"task file {path} does not exist")
    size = path.stat().st_size
    if size >= LARGE_BYTES:
        log.info("task file %s: %d bytes, read whole (its examples are held in memory)", path, size)
    if spec.token_level:
        texts, labels = read_conll(path)
        if not texts:
            raise StageError(f"task file {path} has no sentences")
        return texts, labels
    progress = Progress(f"reading task file {path}", unit="examples")
    texts, labels = [], []
    try:
        rows = _json_rows(path, spec) if path.suffix == ".jsonl" else _delimited_rows(path, spec)
        for where, text, label in rows:
            progress.update(1)
            label = label.strip()
            _check_label(label, spec, where)
            texts.append(text)
            labels.append(label)
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8 at byte {err.start} of a read block ({err.reason})") from None
    if not texts:
        raise StageError(f"task file {path} has no examples")
    return texts, labels


def _delimited_rows(path: Path, spec: TaskSpec):
    """(where, texts, label) of a TSV (GLUE's: no quoting) or CSV (quoted fields) file. Every row has as
    many fields as the header (or, without one, as the first row): a field holding the delimiter would
    otherwise shift text into the label column."""
    csv_file = path.suffix == ".csv"
    # utf-8-sig: a byte-order mark (spreadsheet exports write one) is not part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh, strict=True) if csv_file else csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        width = None
        if spec.header:
            header = next(rows, None) or []
            missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
            if missing:
                raise StageError(f"{path}: header lacks column(s) {missing} (has {header})")
            # header.index would silently take the first of two same-named columns.
            twice = sorted({c for c in (*spec.text_columns, spec.label_column) if header.count(c) > 1})
            if twice:
                raise StageError(f"{path}: header names column(s) {twice} more than once (has {header}); "
                                 f"rename the columns so that each configured name is one column")
            columns = [header.index(c) for c in spec.text_columns], header.index(spec.label_column)
            width = len(header)
        else:
            columns = list(spec.text_columns), spec.label_column
        needed = max(columns[0] + [columns[1]]) + 1
        for line, extra_lines, row in _numbered(rows, path, csv_file):
            where = f"{path}, line {line}"
            width = len(row) if width is None else width
            if len(row) != width or len(row) < needed:
                raise StageError(_width_problem(where, row, width, needed, spec.header, csv_file, extra_lines))
            yield where, tuple(row[c] for c in columns[0]), row[columns[1]]


def _numbered(rows, path: Path, csv_file: bool):
    """(first line, further lines, fields) of each non-blank row of a csv reader."""
    line = rows.line_num + 1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as err:  # a quote still open at the end of the file
            raise StageError(f"{path}, line {line}: {err}" + (" (an unclosed quote? close it)" if csv_file else "")
                             ) from None
        if row:
            yield line, rows.line_num - line, row
        line = rows.line_num + 1


def _width_problem(where: str, row: list, width: int, needed: int, header: bool, csv_file: bool,
                   extra_lines: int) -> str:
    """What is wrong with a row of the wrong width, and what to do about it."""
    name, separator = ("CSV", "comma") if csv_file else ("TSV", "tab")
    if width < needed:  # a headerless file whose first row lacks the configured columns
        return f"{where}: {len(row)} {name} fields, expected at least {needed}"
    expected = f"the {'header' if header else 'first row'} has {width}"
    if len(row) > width:
        cause = (f"a {separator} inside an unquoted text field? quote that field" if csv_file else
                 "a tab inside a text field? TSV fields cannot hold tabs (no quoting, as in GLUE): replace the "
                 "tab with a space, or write the task as CSV with quoted fields (format: csv)")
    elif extra_lines:
        cause = f"the row runs over {extra_lines + 1} lines: an unclosed quote? close it"
    else:
        cause = "a missing field? fix or remove the row"
    return f"{where}: {len(row)} {name} fields, {expected} ({cause})"


def _json_rows(path: Path, spec: TaskSpec):
    """(where, texts, label) of a JSON-lines file: one object per line with the named fields."""
    with open(path, encoding="utf-8-sig") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{where}: not JSON ({err.msg})") from None
            missing = [c for c in (*spec.text_columns, spec.label_column)
                       if not isinstance(example, dict) or c not in example]
            if missing:
                raise StageError(f"{where}: lacks field(s) {missing}")
            # str() would make a null text the text 'None' and a null label the class 'None'.
            for column, kind in ((spec.label_column, "label"), *((c, "text") for c in spec.text_columns)):
                if example[column] is None or isinstance(example[column], (list, dict)):
                    raise StageError(f"{where}: field {column!r} is {json.dumps(example[column])}; a {kind} is a "
                                     f"string or a number (fix or remove the example)")
            yield where, tuple(str(example[c]) for c in spec.text_columns), str(example[spec.label_column])


def _check_label(label: str, spec: TaskSpec, where: str) -> None:
    if spec.regression:
        try:
            if not math.isfinite(float(label)):
                raise ValueError
        except ValueError:
            raise StageError(f"{where}: label {label!r} is not a finite number (regression task)") from None
    elif not label:
        raise StageError(f"{where}: the label is empty; every example needs a label (fix or remove the row)")
    elif spec.labels is not None and label not in spec.labels:
        raise StageError(f"{where}: label {label!r} is not one of the task's labels {list(spec.labels)}")


def check_label_count(labels: list[str], spec: TaskSpec, path) -> None:
    """A classification task's training examples carry at least two labels (with one, the model would have a
    single output, which transformers trains as a regression)."""
    if spec.token_level:
        labels = [tag for tags in labels for tag in tags]
    if not spec.regression and len(set(labels)) < 2:
        raise StageError(f"{path}: every training example has the label {labels[0]!r}; a classification task "
                         f"needs at least two (check label_column, or raise max_train_examples)")


def capped_examples(texts: list, labels: list[str], dev_labels: list[str], spec: TaskSpec, path, cap: int,
                    seed: int) -> tuple[list, list[str]]:
    """The training examples, at most `cap` of them (0: all) drawn with the seed; a label of the dev set that the
    training file has but the draw left out is an error that names the cap (not the dev set)."""
    if not cap:
        return texts, labels
    import numpy as np

    keep = np.random.default_rng(seed).permutation(len(texts))[:cap]
    drawn = [labels[i] for i in keep]
    every, kept, dev = labels, drawn, dev_labels
    if spec.token_level:  # the tags of the sentences
        every, kept, dev = ([tag for tags in split for tag in tags] for split in (labels, drawn, dev_labels))
    if not spec.regression:
        lost = sorted((set(every) - set(kept)) & set(dev))
        if lost:
            raise StageError(f"{path}: the {len(keep)} training examples that finetune.max_train_examples ({cap}) "
                             f"draws with seed {seed} hold no example of label(s) {lost}, which the file's "
                             f"{len(texts)} examples and the dev set have; raise max_train_examples")
    return [texts[i] for i in keep], drawn


def task_files(task: dict) -> tuple[str, list[str]]:
    """The paths of a task's training file and of its dev files (one, or MNLI's two)."""
    spec = task_spec(task)
    return f"{task['path']}/{spec.train_file}", [f"{task['path']}/{name}" for _, name in dev_sets(spec)]


def dev_sets(spec: TaskSpec) -> list[tuple[str, str]]:
    """(suffix, file) of each dev set a fine-tuning is scored on; the suffix is "" for a task with one."""
    return [(spec.dev_suffix, spec.dev_file), *spec.more_dev]


def evaluation_names(name: str, task: dict) -> list[str]:
    """The report's entries of a task: its name, or one per dev set (MNLI-m, MNLI-mm)."""
    return [f"{name}-{suffix}" if suffix else name for suffix, _ in dev_sets(task_spec(task))]


def expected_layout(task: dict) -> str:
    """What a task's directory holds, in words: its files and their columns."""
    spec = task_spec(task)
    files = " and ".join([spec.train_file, *(name for _, name in dev_sets(spec))])
    if task["format"] == "glue":
        name = glue_name(task)
        columns = ("no header row; columns: source, label, original label, sentence" if not spec.header else
                   f"a header naming {', '.join((*spec.text_columns, spec.label_column))}")
        return f"GLUE {name} as the GLUE distribution lays it out: {files}, tab-separated, {columns}"
    if spec.token_level:
        return (f"{files}: CoNLL layout, one token a line with its tag (O, B-<type>, I-<type>) in the last column, "
                "a blank line between sentences")
    fields = ", ".join((*spec.text_columns, spec.label_column))
    kind = {"jsonl": "JSON lines with the fields", "csv": "CSV with a header naming",
            "tsv": "TSV with a header naming"}[task["format"]]
    return f"{files}: {kind} {fields}"
