"""Stage 6: every student x task x seed fine-tuned on the task's train split and scored on dev
(pipeline/finetune.py); for the finetune.checkpoint_tasks, the students' intermediate checkpoints too."""

from __future__ import annotations

from ..data import contract
from ..data.tasks import task_files
from .base import RESUME, Resources, Rule, Stage, inp, out

STAGE = Stage("finetune", "one pre-trained model on one task with one seed -> dev scores", (
    inp("train", help="the task's training file"),
    inp("dev", many=True, help="the task's dev file (MNLI: matched and mismatched, scored by one fine-tuning)"),
    inp("model", directory=True, help="a model directory, or a student's checkpoints (params snapshot)"),
    inp("model_summary", optional=True, help="the pre-training record listing the model's files"),
    out("scores"), RESUME), settings=("checkpoint_seconds",), entry="finetune")


def inputs(w, job):
    train, dev = task_files(w.config["tasks"][job.task])
    model = contract.STUDENT_MODEL if job.snapshot == "final" else contract.STUDENT_CHECKPOINTS
    return {"train": train, "dev": dev, "model": w.path(model, student=job.student),
            "model_summary": w.path(contract.STUDENT_SUMMARY, student=job.student)}


def params(w, job):
    # The lists of seeds and checkpoint tasks are left out: they add jobs and must not rerun the others; pack only
    # groups the jobs into submissions.
    options = {k: v for k, v in w.config["finetune"].items() if k not in ("seeds", "checkpoint_tasks", "pack")}
    return {**options, "snapshot": job.snapshot, "student": job.student, "task_name": job.task,
            "objective": w.config["students"][job.student]["objective"], "task": w.config["tasks"][job.task],
            "seed": int(job.seed), "device": w.device}


def jobs(w):
    """Each student x task x seed on the final model, and on the saved checkpoints for the checkpoint tasks."""
    return [{"student": s, "snapshot": c, "task": t, "seed": str(seed)}
            for s in w.students for t in w.tasks for c in w.finetuned_snapshots(s, t) for seed in w.seeds]


def cost(plan, job):
    from ..plan import BYTES, FORWARD_SHARE_OF_STEP

    options, task = plan.config["finetune"], plan.tasks[job.task]
    size = plan.workflow.student_options(job.student)["size"]
    length = max(1, round(task.length))
    rate = plan.rates.finetuning(size, min(options["batch_size"], 32), length, plan.vocab, 1)
    train = options["epochs"] * task.train * task.length
    dev = options["epochs"] * task.dev * task.length
    return plan.rates.startup(True) + (train + dev * FORWARD_SHARE_OF_STEP) / rate, BYTES["record"], 1


FINETUNE = Rule(
    "finetune", STAGE, job="{student}_{snapshot}_{task}_seed{seed}", outputs={"scores": contract.FINETUNE_SCORES},
    inputs=inputs, params=params, jobs=jobs, cost=cost, threads=lambda w, job: w.process_threads(1),
    resources=Resources(mem_mb=6000, runtime=240, gpu=True), resumable=True,
    group=("finetune_{student}_{snapshot}", lambda config: config["finetune"].get("pack", 1)))
