"""Stage 6, finetune: one pre-trained model on one task with one seed -> dev scores per epoch.

Tasks and their files: pipeline/data/tasks.py. The reported `score` is the GLUE convention: the task's official
metric, or the mean of its two metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman), at the
last epoch. A student's intermediate checkpoint (params `snapshot`: step<N>, a directory of the
checkpoints given as --model) is fine-tuned the same way, for the sample-efficiency curve; the record
names the model's pre-training updates.

    python -m pipeline.finetune --train RTE/train.tsv --dev RTE/dev.tsv --model students/mlsm/model \
        [--model-summary students/mlsm/summary.json] --scores scores.json [--resume-dir state/] \
        --params '{"task": {"format": "glue", "path": "../shared/data/glue/RTE"}, "seed": 1, ...}'
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .cli import run
from .common import StageError, log, pick_device, seed_everything, set_cpu_threads
from .config import section_defaults
from .data import contract
from .data.conll import encode_words, entity_scores
from .data.encoded import encode_in_chunks
from .data.integrity import CHECKSUM_KEY, read_verified, write_record
from .data.tasks import TaskSpec, capped_examples, check_label_count, evaluation_names, read_split, task_spec
from .models import loading, saved_json
from .resume import Resume, load_training, save_training
from .training import adamw, autocast, rng_states, set_rng_states, training_precision, warmup_then_decay

# Keys added after the first release: callers that predate them get the schema's defaults.
NEW_KEYS = ("lr_schedule", "max_grad_norm", "classifier_init", "shuffle_seed", "precision")


def encode_labels(train: list, devs: list[tuple[str, list]], spec: TaskSpec):
    """The training labels and each dev set's ((path, labels) pairs) as numbers, and the label names (None for a
    regression); a dev label the training set lacks is an error naming its file and example."""
    if spec.regression:
        return np.array(train, np.float32), [np.array(dev, np.float32) for _, dev in devs], None
    if spec.token_level:  # a tag per word: arrays of tag ids, the tags named by the training set's
        names = sorted({tag for tags in train for tag in tags})
        index = {name: i for i, name in enumerate(names)}
        for path, dev in devs:
            for sentence, tags in enumerate(dev, start=1):
                if unknown := sorted(set(tags) - set(index)):
                    raise StageError(f"{path}, sentence {sentence}: tag(s) {unknown} are not among the training "
                                     f"tags {names}")
        return ([np.array([index[t] for t in tags]) for tags in train],
                [[np.array([index[t] for t in tags]) for tags in dev] for _, dev in devs], names)
    names = sorted(spec.labels or set(train))
    index = {name: i for i, name in enumerate(names)}
    for path, dev in devs:
        for example, label in enumerate(dev, start=1):
            if label not in index:
                raise StageError(f"{path}, example {example}: label {label!r} is not among the training labels "
                                 f"{names}")
    return np.array([index[x] for x in train]), [np.array([index[x] for x in dev]) for _, dev in devs], names


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


def model_directory(paths, params: dict) -> str:
    """The fine-tuned model: the given directory, or a checkpoint inside it (snapshot step<N>)."""
    snapshot = params.get("snapshot", "final")
    return paths.model if snapshot == "final" else str(Path(paths.model) / snapshot)


def read_task(paths, params: dict, spec: TaskSpec) -> dict:
    """The task's examples (the training set capped at max_train_examples, drawn with the seed) and labels; its
    dev sets (one, or MNLI's two), each under the name the report gives it."""
    devs = [paths.dev] if isinstance(paths.dev, str) else list(paths.dev)
    names = evaluation_names(params.get("task_name", "task"), params["task"])
    if len(devs) != len(names):
        raise StageError(f"task {params.get('task_name', params['task'].get('path'))}: {len(devs)} dev file(s) given "
                         f"({', '.join(devs)}), the task has {len(names)} dev set(s)")
    train_texts, train_labels = read_split(Path(paths.train), spec)
    dev_sets = [(name, path, *read_split(Path(path), spec)) for name, path in zip(names, devs)]
    all_dev_labels = [label for *_, labels in dev_sets for label in labels]
    train_texts, train_labels = capped_examples(train_texts, train_labels, all_dev_labels, spec, paths.train,
                                                params["max_train_examples"], params["seed"])
    check_label_count(train_labels, spec, paths.train)
    y_train, y_devs, names = encode_labels(train_labels, [(path, labels) for _, path, _, labels in dev_sets], spec)
    return {"train": train_texts, "y_train": y_train, "labels": names,
            "dev_sets": [{"name": name, "texts": texts, "y": y} for (name, _, texts, _), y in zip(dev_sets, y_devs)]}


HEAD_STD = 0.02  # BERT's initializer_range, which the reference's copied head was drawn with


def shared_head(model, seed: int, missing: list[str]) -> None:
    """Initialise the classification head from the seed, the hidden size and the number of labels only (and
    the pooler, when the checkpoint has none), so that every student gets the same head for a seed."""
    classifier = model.classifier
    hidden, labels = classifier.in_features, classifier.out_features
    state = np.random.SeedSequence([seed, hidden, labels]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    layers = [classifier]
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None and any(".pooler." in key or key.startswith("pooler.") for key in missing):
        layers.append(pooler.dense)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * HEAD_STD)
            layer.bias.zero_()


def finetune(paths, params: dict) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    params = {**section_defaults("finetune", NEW_KEYS), **params}  # for callers outside the workflow
    set_cpu_threads()
    seed_everything(params["seed"])
    device = pick_device(params.get("device", "auto"))
    training_precision(device)
    model_dir = model_directory(paths, params)
    student = read_verified(paths.model_summary, [model_dir]) if paths.model_summary else {}
    spec = task_spec(params["task"])
    task = read_task(paths, params, spec)
    with loading(f"model {model_dir}"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        head = {"num_labels": len(task["labels"])} if spec.token_level else {
            "num_labels": 1 if spec.regression else len(task["labels"]),
            "problem_type": "regression" if spec.regression else "single_label_classification"}
        model, info = (AutoModelForTokenClassification if spec.token_level else AutoModelForSequenceClassification
                       ).from_pretrained(model_dir, **head, attn_implementation="sdpa", trust_remote_code=False,
                                         output_loading_info=True)
    if params["classifier_init"] == "per_seed":
        shared_head(model, params["seed"], info["missing_keys"])
    model.to(device)
    encoded = encode_task(tokenizer, task, spec, params["max_seq_len"])
    steps = params["epochs"] * -(-len(task["train"]) // params["batch_size"])
    optimizer = adamw(model, params["learning_rate"], params["weight_decay"], exempt_biases_and_norms=False)
    scheduler = warmup_then_decay(optimizer, steps, params["warmup_fraction"], params["lr_schedule"])
    resume = Resume(paths.resume_dir, {"params": params, "student": student.get(CHECKSUM_KEY)},
                    interval=paths.checkpoint_seconds)
    started = time.perf_counter()
    epochs = Epochs(model, tokenizer, optimizer, scheduler, resume, device, params)
    progress = epochs.run(encoded, task, spec)
    final = progress["epochs"][-1]
    dev_sets = task["dev_sets"]
    result = {
        "format_version": contract.FORMAT_VERSION["finetune"], "params": params, "task": params["task"],
        "pretrain_steps": (saved_json(model_dir, "pretraining.json") or {}).get("steps"),
        "metrics": list(spec.metrics), "score": task_score(final, spec),
        "final": final, "epochs": progress["epochs"], "train_examples": len(task["train"]),
        "dev_examples": len(dev_sets[0]["y"]), "labels": task["labels"], "seconds": time.perf_counter() - started,
    }
    if len(dev_sets) > 1:  # the top-level score and metrics are the first dev set's
        result["evaluations"] = [{"name": dev["name"], "dev_examples": len(dev["y"]), "final": metrics,
                                  "score": task_score(metrics, spec)}
                                 for dev in dev_sets for metrics in [final["dev_sets"][dev["name"]]]]
    write_record(paths.scores, result)
    resume.finish()
    return result


def encode_task(tokenizer, task: dict, spec: TaskSpec, max_length: int) -> dict:
    """The training set and each dev set, tokenised a chunk at a time into compact arrays (pipeline/data/
    encoded.py: MNLI's 393 k pairs); a token task's words with their tags on first sub-tokens."""
    if spec.token_level:
        def tagged(rows):
            return encode_words(tokenizer, [words for words, _ in rows], [tags for _, tags in rows], max_length)

        return {"train": encode_in_chunks(tagged, list(zip(task["train"], task["y_train"]))),
                "dev": [encode_in_chunks(lambda rows: encode_words(tokenizer, rows, None, max_length), dev["texts"])
                        for dev in task["dev_sets"]]}

    def encode(texts):
        return tokenizer(*list(zip(*texts)), truncation=True, max_length=max_length)

    return {"train": encode_in_chunks(encode, task["train"]),
            "dev": [encode_in_chunks(encode, dev["texts"]) for dev in task["dev_sets"]]}


def task_score(metrics: dict, spec: TaskSpec) -> float:
    """The GLUE convention: the task's official metric, or the mean of its two."""
    return float(np.mean([metrics[m] for m in spec.metrics[:2]]))


class Epochs:
    """The fine-tuning epochs, each scored on dev. One unit of work is one update; a checkpoint holds the
    weights, the optimizer, and the random states at the start of its epoch (the batch order is redrawn
    from them) and of the update."""

    def __init__(self, model, tokenizer, optimizer, scheduler, resume: Resume, device, params: dict):
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.resume, self.device, self.params = resume, device, params
        shuffle_seed = params["shuffle_seed"]
        self.rng = np.random.default_rng(params["seed"] if shuffle_seed is None else shuffle_seed)
        self.progress = {"epoch": 0, "batch": 0, "epochs": [], "loss": None}

    def collate(self, encoding, rows, labels=None) -> dict:
        """A padded batch of `rows`; with labels, an example's label, or a token task's tag ids (the encoding's
        "labels", padded with -100: no loss there)."""
        features = [{k: encoding[k][i] for k in encoding.keys() if k not in ("labels", "first_tokens")} for i in rows]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        if labels is not None and "labels" in encoding.keys():
            width, left = batch["input_ids"].shape[1], self.tokenizer.padding_side == "left"
            tags = [encoding["labels"][i] for i in rows]
            batch["labels"] = torch.tensor([[-100] * (width - len(t)) + t if left else t + [-100] * (width - len(t))
                                            for t in tags])
        elif labels is not None:
            batch["labels"] = torch.as_tensor(labels[rows])
        return {k: v.to(self.device) for k, v in batch.items()}

    def run(self, encoded: dict, task: dict, spec: TaskSpec) -> dict:
        self._load_state()
        params, progress = self.params, self.progress
        for epoch in range(progress["epoch"], params["epochs"]):
            rng_at_epoch_start = self.rng.bit_generator.state
            order = batches(len(task["train"]), params["batch_size"], self.rng)
            self.model.train()
            for index in range(progress["batch"] if epoch == progress["epoch"] else 0, len(order)):
                with autocast(self.device, self.params["precision"]):
                    loss = self.model(**self.collate(encoded["train"], order[index], task["y_train"])).loss
                loss.backward()
                if params["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), params["max_grad_norm"])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.update(epoch=epoch, batch=index + 1, loss=loss.item())
                if self.resume.due():
                    self._save_state(epoch * len(order) + index + 1, rng_at_epoch_start)
            scored = {dev["name"]: self.score(encoding, dev, spec, task["labels"])
                      for dev, encoding in zip(task["dev_sets"], encoded["dev"])}
            metrics = next(iter(scored.values()))  # a task with one dev set: its record as before MNLI's two
            extra = {"dev_sets": scored} if len(scored) > 1 else {}
            progress["epochs"].append({"epoch": epoch + 1, "last_train_loss": progress["loss"], **metrics, **extra})
            progress.update(epoch=epoch + 1, batch=0)
            log.info("epoch %d: %s", epoch + 1, metrics)
        return progress

    def score(self, encoding, dev: dict, spec: TaskSpec, label_names) -> dict:
        """The official metrics on one dev set (a token task's: entity-level F1, with every word the truncation
        cut predicted O)."""
        if not spec.token_level:
            return compute_metrics(spec.metrics, self.predict(encoding, spec), dev["y"], label_names)
        outside = label_names.index("O") if "O" in label_names else 0
        predicted = [[label_names[i] for i in words] + [label_names[outside]] * (len(gold) - len(words))
                     for words, gold in zip(self.predict(encoding, spec), dev["y"], strict=True)]
        return entity_scores([[label_names[i] for i in gold] for gold in dev["y"]], predicted)

    def predict(self, encoding, spec: TaskSpec):
        """Each example's prediction (an array); a token task's, a list of each sentence's predicted tag ids at
        the first sub-token of every word the truncation kept."""
        self.model.eval()
        predictions = []
        with torch.inference_mode(), autocast(self.device, self.params["precision"]):
            for rows in batches(len(encoding["input_ids"]), self.params["batch_size"] * 2, None):
                logits = self.model(**self.collate(encoding, rows)).logits.float()
                if spec.token_level:
                    best = logits.argmax(-1).cpu().numpy()
                    predictions += [best[n][encoding["first_tokens"][row]] for n, row in enumerate(rows)]
                else:
                    predictions.append(logits.squeeze(-1) if spec.regression else logits.argmax(-1))
        return predictions if spec.token_level else torch.cat(predictions).cpu().numpy()

    def _save_state(self, unit: int, rng_at_epoch_start: dict) -> None:
        # The CUDA generator's state too: dropout on a GPU draws from it (issue #32: a resumed GPU run differed).
        save_training(self.resume, unit, self.model, self.optimizer, self.scheduler,
                      {"rng_at_epoch_start": rng_at_epoch_start, "progress": self.progress},
                      {f"rng.{name}": state for name, state in rng_states().items()})

    def _load_state(self) -> None:
        saved = load_training(self.resume, self.model, self.optimizer, self.scheduler)
        if saved is None:
            return
        meta, tensors = saved
        states = {key.removeprefix("rng."): state for key, state in tensors.items() if key.startswith("rng.")}
        set_rng_states(states or {"torch": tensors["torch_rng"]})  # or a state saved before the CUDA one was
        self.rng.bit_generator.state = meta["rng_at_epoch_start"]
        self.progress = meta["progress"]


if __name__ == "__main__":
    run("finetune", finetune)
