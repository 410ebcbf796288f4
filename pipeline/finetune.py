"""Stage 6, finetune: one pre-trained student on one task with one seed -> dev scores per epoch.

Tasks come as a GLUE task directory (official layout, train.tsv and dev.tsv; the task's name fixes its
columns and official metric; MNLI-mm scores MNLI on its mismatched dev set) or as train/dev files with
configured text and label columns: train.tsv/dev.tsv (header row), train.csv/dev.csv (header row,
quoted fields) or train.jsonl/dev.jsonl (one object per line). The
reported `score` is the GLUE convention: the task's official metric, or the mean of its two metrics
(MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman), at the last epoch.

A student's intermediate checkpoint (students/<s>/checkpoints/step<N>) is fine-tuned the same way, for the
sample-efficiency curve; the record names the model's pre-training updates.

    python -m pipeline.finetune --model students/mlsm/model [--student-summary students/mlsm/summary.json] \
        --out scores.json [--resume-dir state/] \
        --params '{"task": {"format": "glue", "path": "../shared/data/glue/RTE"}, "seed": 1, ...}'
"""

from __future__ import annotations

import csv
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import contract
from .common import StageError, log, parser, pick_device, run_stage, seed_everything, set_cpu_threads
from .integrity import CHECKSUM_KEY, read_verified, write_record
from .resume import Resume, load_model_and_optimizer, model_and_optimizer_tensors

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple  # one column, or two for sentence pairs
    label_column: str
    metrics: tuple       # official metrics, the first two averaged into the score when there are two
    header: bool = True
    dev_file: str = "dev.tsv"
    labels: tuple | None = None  # the task's label set, where it is fixed (GLUE classification tasks)
    train_file: str = "train.tsv"

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
    "MNLI": TaskSpec(("sentence1", "sentence2"), "gold_label", ("accuracy",), dev_file="dev_matched.tsv",
                     labels=("contradiction", "entailment", "neutral")),
    # The same training set, scored on the mismatched-genre dev set (a separate entry in GLUE's table).
    "MNLI-mm": TaskSpec(("sentence1", "sentence2"), "gold_label", ("accuracy",), dev_file="dev_mismatched.tsv",
                        labels=("contradiction", "entailment", "neutral")),
    "QNLI": TaskSpec(("question", "sentence"), "label", ("accuracy",), labels=ENTAILMENT),
    "RTE": TaskSpec(("sentence1", "sentence2"), "label", ("accuracy",), labels=ENTAILMENT),
    "WNLI": TaskSpec(("sentence1", "sentence2"), "label", ("accuracy",), labels=BINARY),
}
METRICS_OF = {"accuracy": ("accuracy",), "f1": ("f1", "accuracy"), "mcc": ("mcc",), "pearson": ("pearson", "spearman")}


def task_spec(task: dict) -> TaskSpec:
    if task["format"] == "glue":
        name = task.get("glue_task") or Path(task["path"]).name
        if name not in GLUE:
            raise StageError(f"GLUE task directory {task['path']!r}: unknown task {name!r} "
                             f"(set glue_task to one of {', '.join(GLUE)})")
        return GLUE[name]
    suffix = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl"}[task["format"]]
    return TaskSpec(tuple(task["text_columns"]), task["label_column"], METRICS_OF[task.get("metric", "accuracy")],
                    train_file=f"train.{suffix}", dev_file=f"dev.{suffix}")


def read_split(path: Path, spec: TaskSpec) -> tuple[list[tuple[str, ...]], list[str]]:
    """Texts and labels of one split; StageError naming the file and line of a malformed row or label."""
    if not path.is_file():
        raise StageError(f"task file {path} does not exist")
    texts, labels = [], []
    try:
        rows = _json_rows(path, spec) if path.suffix == ".jsonl" else _delimited_rows(path, spec)
        for where, text, label in rows:
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
    """(where, texts, label) of a TSV (GLUE's: no quoting) or CSV (quoted fields) file."""
    csv_file = path.suffix == ".csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh) if csv_file else csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header:
            header = next(rows, None) or []
            missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
            if missing:
                raise StageError(f"{path}: header lacks column(s) {missing} (has {header})")
            columns = [header.index(c) for c in spec.text_columns], header.index(spec.label_column)
        else:
            columns = list(spec.text_columns), spec.label_column
        width = max(columns[0] + [columns[1]])
        for row in rows:
            where = f"{path}, line {rows.line_num}"
            if len(row) <= width:
                raise StageError(f"{where}: {len(row)} columns, expected more than {width}")
            yield where, tuple(row[c] for c in columns[0]), row[columns[1]]


def _json_rows(path: Path, spec: TaskSpec):
    """(where, texts, label) of a JSON-lines file: one object per line with the named fields."""
    with open(path, encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{where}: not JSON ({err.msg})") from None
            missing = [c for c in (*spec.text_columns, spec.label_column) if not isinstance(example, dict) or c not in example]
            if missing:
                raise StageError(f"{where}: lacks field(s) {missing}")
            yield where, tuple(str(example[c]) for c in spec.text_columns), str(example[spec.label_column])


def _check_label(label: str, spec: TaskSpec, where: str) -> None:
    if spec.regression:
        try:
            if not np.isfinite(float(label)):
                raise ValueError
        except ValueError:
            raise StageError(f"{where}: label {label!r} is not a finite number (regression task)") from None
    elif spec.labels is not None and label not in spec.labels:
        raise StageError(f"{where}: label {label!r} is not one of the task's labels {list(spec.labels)}")


def encode_labels(train: list[str], dev: list[str], spec: TaskSpec, task_dir: Path):
    if spec.regression:
        return np.array(train, np.float32), np.array(dev, np.float32), None
    names = sorted(spec.labels or set(train))
    index = {name: i for i, name in enumerate(names)}
    for example, label in enumerate(dev, start=1):
        if label not in index:
            raise StageError(f"{task_dir / spec.dev_file}, example {example}: label {label!r} is not among the "
                             f"training labels {names}")
    return np.array([index[x] for x in train]), np.array([index[x] for x in dev]), names


def compute_metrics(names: tuple, predictions: np.ndarray, gold: np.ndarray, label_names) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float((predictions == gold).mean())
        elif name == "f1":
            positive = label_names.index("1") if "1" in label_names else 1
            out[name] = float(f1_score(gold, predictions, pos_label=positive, average="binary"))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(gold, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(predictions, gold)[0])
        elif name == "spearman":
            out[name] = float(spearmanr(predictions, gold)[0])
    return out


def batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def finetune(model_dir: str, student_summary: str | None, task: dict, out: str, params: dict,
             resume_dir: str | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    set_cpu_threads()
    seed_everything(params["seed"])
    device = pick_device(params.get("device", "auto"))
    student = read_verified(student_summary, [model_dir]) if student_summary else {}
    spec = task_spec(task)
    task_dir = Path(task["path"])
    train_texts, train_labels = read_split(task_dir / spec.train_file, spec)
    dev_texts, dev_labels = read_split(task_dir / spec.dev_file, spec)
    if params["max_train_examples"]:
        keep = np.random.default_rng(params["seed"]).permutation(len(train_texts))[: params["max_train_examples"]]
        train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
    y_train, y_dev, label_names = encode_labels(train_labels, dev_labels, spec, task_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    num_labels = 1 if spec.regression else len(label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, problem_type="regression" if spec.regression else "single_label_classification",
        attn_implementation="sdpa", trust_remote_code=False).to(device)

    def encode(texts):
        columns = list(zip(*texts))
        return tokenizer(*columns, truncation=True, max_length=params["max_seq_len"])

    train_enc, dev_enc = encode(train_texts), encode(dev_texts)
    steps = params["epochs"] * -(-len(train_texts) // params["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["learning_rate"], weight_decay=params["weight_decay"])
    warmup = max(1, int(params["warmup_fraction"] * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rng = np.random.default_rng(params["seed"])

    def collate(encoding, rows, labels=None):
        features = [{k: encoding[k][i] for k in encoding.keys()} for i in rows]
        batch = tokenizer.pad(features, return_tensors="pt")
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[rows])
        return {k: v.to(device) for k, v in batch.items()}

    # One unit of work is one update; a checkpoint holds the weights, the optimizer, and the random
    # states at the start of its epoch (the batch order is redrawn from them) and of the update.
    resume = Resume(resume_dir, {"params": params, "student": student.get(CHECKSUM_KEY)})
    progress = {"epoch": 0, "batch": 0, "epochs": [], "loss": None}
    saved = resume.load_state()
    if saved is not None:
        meta, tensors = saved
        load_model_and_optimizer(model, optimizer, tensors, meta["optimizer_groups"])
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        rng.bit_generator.state = meta["rng_at_epoch_start"]
        progress = meta["progress"]

    started = time.perf_counter()
    for epoch in range(progress["epoch"], params["epochs"]):
        rng_at_epoch_start = rng.bit_generator.state
        order = batches(len(train_texts), params["batch_size"], rng)
        model.train()
        for index in range(progress["batch"] if epoch == progress["epoch"] else 0, len(order)):
            with autocast:
                loss = model(**collate(train_enc, order[index], y_train)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(epoch=epoch, batch=index + 1, loss=loss.item())
            if resume.due():
                tensors, groups = model_and_optimizer_tensors(model, optimizer)
                resume.save_state(epoch * len(order) + index + 1, {
                    "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
                    "rng_at_epoch_start": rng_at_epoch_start, "progress": progress},
                    {**tensors, "torch_rng": torch.get_rng_state()})
        model.eval()
        predictions = []
        with torch.inference_mode(), autocast:
            for rows in batches(len(dev_texts), params["batch_size"] * 2, None):
                logits = model(**collate(dev_enc, rows)).logits.float()
                predictions.append(logits.squeeze(-1) if spec.regression else logits.argmax(-1))
        predictions = torch.cat(predictions).cpu().numpy()
        metrics = compute_metrics(spec.metrics, predictions, y_dev, label_names)
        progress["epochs"].append({"epoch": epoch + 1, "last_train_loss": progress["loss"], **metrics})
        progress.update(epoch=epoch + 1, batch=0)
        log.info("epoch %d: %s", epoch + 1, metrics)
    final = progress["epochs"][-1]
    result = {
        "format_version": contract.FORMAT_VERSION["finetune"], "params": params, "task": task,
        "pretrain_steps": pretrain_steps(model_dir), "metrics": list(spec.metrics), "score": float(np.mean([final[m] for m in spec.metrics[:2]])),
        "final": final, "epochs": progress["epochs"], "train_examples": len(train_texts),
        "dev_examples": len(dev_texts), "labels": label_names, "seconds": time.perf_counter() - started,
    }
    write_record(out, result)
    resume.finish()
    return result


def pretrain_steps(model_dir: str) -> int | None:
    """The updates the fine-tuned model had been pre-trained for (pretraining.json), if it is a student."""
    record = Path(model_dir) / "pretraining.json"
    return json.loads(record.read_text())["steps"] if record.exists() else None


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a save_pretrained directory")
    p.add_argument("--student-summary", help="the pre-training record listing the model's checksums")
    p.add_argument("--out", required=True)
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    args = p.parse_args(argv)
    finetune(args.model, args.student_summary, args.params["task"], args.out, args.params, args.resume_dir)


if __name__ == "__main__":
    run_stage(main)
