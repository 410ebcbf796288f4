# Shared by every rule: the validated config, output paths, and each stage's params slice.
import os
import re as _re
import sys as _sys

from pipeline import config as cfg
from pipeline import contract
from pipeline import corpus as _corpus
from pipeline.finetune import task_spec as _task_spec
from pipeline.launch import torchrun_command
from pipeline.resume import INTERVAL_VARIABLE as RESUME_INTERVAL_VARIABLE

try:
    CONFIG = cfg.validate(config)
except cfg.ConfigError as _err:
    _sys.exit(f"Error: {_err}")

R = CONFIG["results"]
SHARDS = contract.shard_names(CONFIG["corpus"]["shards"])
STUDENTS = sorted(CONFIG["students"])
TASKS = sorted(CONFIG["tasks"])
SEEDS = CONFIG["finetune"]["seeds"]
TEACHERS = cfg.teachers_in_use(CONFIG)
GPU = 1 if CONFIG["device"] == "cuda" else 0
# How often long stages save resumable state. Jobs read it from the environment (set again when a
# cluster job parses this file), so that changing it, which changes no result, reruns nothing.
os.environ[RESUME_INTERVAL_VARIABLE] = str(CONFIG["checkpoint_seconds"])


def _names(names):
    return "|".join(_re.escape(n) for n in names) or "^$"


wildcard_constraints:
    shard=r"\d{3}",
    teacher=_names(CONFIG["teachers"]),
    student=_names(STUDENTS),
    task=_names(TASKS),
    seed=r"\d+",
    snapshot=r"final|step\d+",


def path(template, **wildcards):
    """A contract path under the results directory; unfilled fields stay Snakemake wildcards."""
    return f"{R}/{template.format_map(_Keep(wildcards))}"


class _Keep(dict):
    def __missing__(self, key):
        return f"{{{key}}}"


def log_path(rule, *parts):
    return f"{R}/{contract.LOGS}/{rule}/{'_'.join(parts) or rule}.log"


def resume_dir(rule, *parts):
    """Where a job of a long stage keeps its resumable state (not an output: it survives a failure)."""
    return path(contract.RESUME_DIR, rule=rule, job="_".join(parts) or rule)


def bench_path(rule, *parts):
    return f"{R}/{contract.BENCHMARKS}/{rule}/{'_'.join(parts) or rule}.tsv"


def stage_params(stage, *slices, **extra):
    """The JSON a stage receives: its config slices, its format version and extras."""
    merged = {"format_version": contract.FORMAT_VERSION[stage]}
    for part in slices:
        merged.update(part)
    merged.update(extra)
    return cfg.as_json(merged)


def corpus_shards():
    return [path(contract.CORPUS_SHARD, shard=s) for s in SHARDS]


def target_shards(teacher):
    return [path(contract.TARGET_SHARD, teacher=teacher, shard=s) for s in SHARDS]


def corpus_inputs():
    # Missing files stay in the list, so that Snakemake names them as missing input.
    return [str(f) for f in _corpus.input_files(CONFIG["corpus"]["inputs"], strict=False)]


# The corpus tokenizer: a model source, or the one the train_tokenizer stage fits.
TRAINED_TOKENIZER = CONFIG["corpus"]["tokenizer"] == cfg.TRAINED_TOKENIZER
TOKENIZER = path(contract.TOKENIZER) if TRAINED_TOKENIZER else CONFIG["corpus"]["tokenizer"]


def corpus_params():
    # threads changes speed, never the shards: not a param, so changing it reruns nothing.
    options = {k: v for k, v in CONFIG["corpus"].items() if k != "threads"}
    return stage_params("corpus", options, tokenizer=TOKENIZER)


def tokenizer_params():
    # What reading the text takes (which documents are validation ones, what is bad input) and the training.
    reading = {k: CONFIG["corpus"][k] for k in
               ("format", "text_field", "validation_fraction", "bad_input", "max_line_bytes", "seed")}
    return stage_params("tokenizer", reading, CONFIG["tokenizer_training"])


def is_auxiliary(teacher):
    return CONFIG["teachers"][teacher]["source"] == cfg.AUXILIARY_TEACHER


def teacher_source(teacher):
    """What from_pretrained loads: the configured source, or the auxiliary teacher pretrain_teacher writes."""
    if is_auxiliary(teacher):
        return path(contract.AUXILIARY_TEACHER, teacher=teacher)
    return CONFIG["teachers"][teacher]["source"]


def teacher_model_inputs(teacher):
    """The auxiliary teacher's model and record, which a job using the teacher must wait for."""
    if not is_auxiliary(teacher):
        return {}
    return {"teacher_model": path(contract.AUXILIARY_TEACHER, teacher=teacher),
            "teacher_summary": path(contract.AUXILIARY_SUMMARY, teacher=teacher)}


def teacher_params(teacher, stage, *slices):
    options = {k: v for k, v in CONFIG["teachers"][teacher].items() if k != "auxiliary"}
    return stage_params(stage, options, *slices, teacher=teacher, source=teacher_source(teacher),
                        tokenizer=TOKENIZER, device=CONFIG["device"])


def auxiliary_params(teacher):
    options = {**CONFIG["teachers"][teacher]["auxiliary"], "objective": "mlm"}
    return stage_params("pretrain", options, student=f"auxiliary teacher {teacher}", device=CONFIG["device"])


def student_teacher(student):
    options = CONFIG["students"][student]
    return options.get("teacher") if options["objective"] in cfg.OBJECTIVES_NEEDING_TEACHER else None


def student_inputs(wildcards):
    """Corpus and validation split; for MLSM objectives the targets of both (the stage finds their
    manifest beside them), or with targets: online the dictionary; an auxiliary teacher's model."""
    inputs = {"shards": corpus_shards(), "manifest": path(contract.CORPUS_MANIFEST),
              "validation": path(contract.CORPUS_VALIDATION), "targets": []}
    teacher = student_teacher(wildcards.student)
    if online_targets(wildcards.student):
        inputs["dictionary"] = path(contract.DICTIONARY, teacher=teacher)
        inputs["dictionary_metrics"] = path(contract.DICTIONARY_METRICS, teacher=teacher)
    elif CONFIG["students"][wildcards.student]["objective"] in cfg.OBJECTIVES_NEEDING_TARGETS:
        inputs["targets"] = target_shards(teacher)
        inputs["validation_targets"] = path(contract.TARGET_VALIDATION, teacher=teacher)
        inputs["target_manifest"] = path(contract.TARGET_MANIFEST, teacher=teacher)
    if teacher is not None:
        inputs.update(teacher_model_inputs(teacher))
    return inputs


def online_targets(student):
    """Whether the student makes its MLSM targets in the step (from the dictionary) instead of reading them."""
    options = cfg.student_options(CONFIG, student)
    return options["objective"] in cfg.OBJECTIVES_NEEDING_TARGETS and options["targets"] == "online"


def optional_input(name):
    """A params function: the path of input `name`, or "" where this job has no such input (the option
    is then given without a value, which the stage reads as absent)."""
    return lambda wildcards, input: getattr(input, name, "")


def student_gpus(student):
    return cfg.student_options(CONFIG, student)["gpus"]


def student_params(student):
    options = cfg.student_options(CONFIG, student)
    extra = {"student": student, "device": CONFIG["device"]}
    teacher = student_teacher(student)
    if teacher is None:
        options.pop("teacher", None)
    else:
        extra["teacher_source"] = teacher_source(teacher)
        extra["teacher_trust_remote_code"] = CONFIG["teachers"][teacher]["trust_remote_code"]
    if options["objective"] in cfg.OBJECTIVES_NEEDING_TARGETS:
        extra["atoms"] = CONFIG["dictionary"]["atoms"]
    if not online_targets(student):
        options.pop("online_solver")  # only online students use it: changing it must not rerun the others
    if options["objective"] not in cfg.OBJECTIVES_NEEDING_TARGETS:
        options.pop("targets")  # an option of MLSM students only: changing it must not rerun the others
    if online_targets(student):
        solver = cfg.REFERENCE_SOLVER
        if options["online_solver"] == "targets":
            solver = {k: CONFIG["targets"][k] for k in cfg.SOLVER_KEYS}
        extra["online"] = {**solver, "lambda": CONFIG["dictionary"]["lambda"], "source": teacher_source(teacher),
                           "layer": CONFIG["teachers"][teacher]["layer"],
                           "trust_remote_code": CONFIG["teachers"][teacher]["trust_remote_code"]}
    return stage_params("pretrain", options, **extra)


def task_files(wildcards):
    task = CONFIG["tasks"][wildcards.task]
    return {
        "train": f"{task['path']}/{_task_spec(task).train_file}",
        "dev": f"{task['path']}/{_task_spec(task).dev_file}",
    }


def finetune_scores():
    """Every fine-tuning run's scores: student x task x seed on the final model, and on the saved
    checkpoints for the finetune.checkpoint_tasks."""
    return [path(contract.FINETUNE_SCORES, student=s, snapshot=c, task=t, seed=seed)
            for s in STUDENTS for t in TASKS for c in cfg.finetuned_snapshots(CONFIG, s, t) for seed in SEEDS]


def finetune_model(wildcards):
    """The model a fine-tuning job starts from, and the record that lists its files."""
    model = (path(contract.STUDENT_MODEL, student=wildcards.student) if wildcards.snapshot == "final"
             else path(contract.STUDENT_CHECKPOINTS, student=wildcards.student))
    return {"model": model, "summary": path(contract.STUDENT_SUMMARY, student=wildcards.student)}


def finetune_model_dir(wildcards, input):
    return input.model if wildcards.snapshot == "final" else f"{input.model}/{wildcards.snapshot}"


def finetune_params(student, task, seed, snapshot):
    # The lists of seeds and checkpoint tasks are left out: they add jobs and must not rerun the others.
    options = {k: v for k, v in CONFIG["finetune"].items() if k not in ("seeds", "checkpoint_tasks")}
    return stage_params(
        "finetune",
        options,
        snapshot=snapshot,
        student=student,
        objective=CONFIG["students"][student]["objective"],
        task_name=task,
        task=CONFIG["tasks"][task],
        seed=int(seed),
        device=CONFIG["device"],
    )
