"""Stage 5: a BERT-style model pre-trained with its objective (pipeline/pretrain/): every student, and an
auxiliary teacher the pipeline pre-trains with MLM itself (the BabyLM variant), before its activations."""

from __future__ import annotations

from ..data import contract
from ..objectives import ARCHITECTURE_KEYS, objective
from .base import LOG, RESUME, STUDENTS, Port, Resources, Rule, Shown, Stage, inp, out
from .teacher import AUXILIARY

STAGE = Stage("pretrain", "a BERT-style model pre-trained with its objective (from scratch, or from a checkpoint)", (
    inp("corpus_shards", many=True), inp("corpus_manifest"),
    inp("validation", optional=True, help="held-out sequences for validation losses and diagnostics"),
    inp("token_counts", optional=True, help="training-token frequencies: the MLM diagnostic's baseline"),
    inp("target_shards", many=True, optional=True), inp("target_manifest", optional=True),
    inp("validation_targets", optional=True),
    inp("dictionary", optional=True, help="with targets online"), inp("dictionary_metrics", optional=True),
    inp("phase_shards", many=True, optional=True,
        help="seq_len_schedule: the corpus shards packed at each other length, length after length"),
    inp("phase_manifests", many=True, optional=True, help="their records, one per length"),
    inp("phase_target_shards", many=True, optional=True, help="their target shards, length after length"),
    inp("phase_target_manifests", many=True, optional=True, help="their records, one per length"),
    *AUXILIARY,
    inp("continue_from", directory=True, optional=True,
        help="the checkpoints of the same student with a shorter budget, whose final state this run continues "
             "(a grid's budgets under a schedule that does not depend on max_steps)"),
    inp("continue_summary", optional=True, help="that student's record, which lists the state's checksum"),
    out("model", directory=True), out("checkpoints", directory=True, optional=True), out("summary"),
    Port("metrics_csv", LOG, optional=True, help="the training log as CSV"),
    Port("tensorboard", LOG, directory=True, optional=True, help="TensorBoard events, if installed"),
    RESUME), settings=("checkpoint_seconds", "log_every"), entry="train")

# A control's job beside its architecture: no updates, its diagnostics' masks, what else shapes its weights.
CONTROL_KEYS = ("objective", "max_steps", "checkpoint_fractions", "mask_fraction", "mask_strategy", "architecture",
                "init", "seq_len_schedule")
RESOURCES = Resources(mem_mb=8000, runtime=720, gpu=True)


def teacher_options(w, job) -> dict:
    return {**w.config["teachers"][job.teacher]["auxiliary"], "objective": "mlm"}


PRETRAIN_TEACHER = Rule(
    "pretrain_teacher", STAGE, job="{teacher}", uses=("corpus_shards", "corpus_manifest", "phase_shards",
                                                      "phase_manifests"),
    outputs={"model": contract.AUXILIARY_TEACHER, "summary": contract.AUXILIARY_SUMMARY},
    inputs=lambda w, job: {"corpus_shards": w.corpus_shards(), "corpus_manifest": w.path(contract.CORPUS_MANIFEST),
                           **w.phase_inputs(w.config["teachers"][job.teacher]["auxiliary"], None)},
    params=lambda w, job: {**teacher_options(w, job), "student": f"auxiliary teacher {job.teacher}",
                           "device": w.device, "model_card": w.model_card()},
    jobs=lambda w: [{"teacher": t} for t in w.auxiliary_teachers()],
    cost=lambda plan, job: plan.pretraining(teacher_options(plan.workflow, job), "mlm", None),
    threads=lambda w, job: w.process_threads(w.gpus("pretrain_teacher", job)), resources=RESOURCES,
    resumable=True, gpus_key="teacher")


def student_inputs(w, job):
    """Corpus and validation split; for MLSM objectives the targets of both and their record, or with targets
    online the dictionary; a teacher the pipeline trained, with its record."""
    inputs = {"corpus_shards": w.corpus_shards(), "corpus_manifest": w.path(contract.CORPUS_MANIFEST),
              "validation": w.path(contract.CORPUS_VALIDATION), "token_counts": w.path(contract.CORPUS_TOKEN_COUNTS)}
    teacher, coding = w.student_teacher(job.student), w.student_coding(job.student)
    if w.online_targets(job.student):
        inputs["dictionary"] = w.path(contract.DICTIONARY, dictionary=coding)
        inputs["dictionary_metrics"] = w.path(contract.DICTIONARY_METRICS, dictionary=coding)
    elif coding is not None:
        inputs["target_shards"] = w.target_shards(coding)
        inputs["target_manifest"] = w.path(contract.TARGET_MANIFEST, dictionary=coding)
        inputs["validation_targets"] = w.path(contract.TARGET_VALIDATION, dictionary=coding)
        inputs["dictionary_metrics"] = w.path(contract.DICTIONARY_METRICS, dictionary=coding)  # model card
    inputs.update(w.phase_inputs(w.student_options(job.student),
                                 coding if w.precomputed_targets(job.student) else None))
    shorter = w.budget_chain.get(job.student)
    if shorter is not None:
        inputs["continue_from"] = w.path(contract.STUDENT_CHECKPOINTS, student=shorter)
        inputs["continue_summary"] = w.path(contract.STUDENT_SUMMARY, student=shorter)
    return {**inputs, **w.teacher_model(teacher)}


def student_params(w, job):
    student = job.student
    options = w.student_options(student)
    needs = objective(options["objective"])
    extra = {"student": student, "device": w.device, "model_card": w.model_card()}
    if not needs.trains:  # the control: only what fixes its weights and the masks of its diagnostics
        return {**{k: options[k] for k in (*ARCHITECTURE_KEYS, *CONTROL_KEYS)}, **extra}
    teacher = w.student_teacher(student)
    if teacher is None:
        options.pop("teacher", None)
    else:
        extra["teacher_source"] = w.teacher_source(teacher)
        extra["teacher_trust_remote_code"] = w.config["teachers"][teacher]["trust_remote_code"]
    if needs.targets:
        extra["atoms"] = w.coding(w.student_coding(student))[1]["atoms"]
    else:
        options.pop("targets")  # an option of MLSM students only: changing it must not rerun the others
    if w.online_targets(student):
        extra["online"] = w.online_settings(options, w.student_coding(student))
    else:
        options.pop("online_solver")  # only online students use it
    return {**options, **extra}


def student_cost(plan, job):
    options = plan.workflow.student_options(job.student)
    needs = objective(options["objective"])
    if not needs.trains:  # the control: initialised, measured and saved
        return plan.rates.startup(True), plan.model_bytes(options["size"], options["objective"], None), 0
    student, w = job.student, plan.workflow
    shorter = w.budget_chain.get(student)
    if shorter is not None:  # it trains the updates beyond the shorter budget only
        options = {**options, "max_steps": options["max_steps"] - w.student_options(shorter)["max_steps"]}
    return plan.pretraining(options, options["objective"], w.student_teacher(student), w.student_coding(student))


PRETRAIN_STUDENT = Rule(
    "pretrain_student", STAGE, job="{student}",
    outputs={"model": contract.STUDENT_MODEL, "checkpoints": contract.STUDENT_CHECKPOINTS,
             "summary": contract.STUDENT_SUMMARY},
    logs={"metrics_csv": f"{contract.LOGS}/pretrain_student/{{student}}.csv",
          "tensorboard": f"{contract.LOGS}/pretrain_student/{{student}}.tensorboard"},
    inputs=student_inputs, params=student_params, jobs=lambda w: [{"student": s} for s in w.students],
    cost=student_cost, threads=lambda w, job: w.process_threads(w.gpus("pretrain_student", job)),
    resources=RESOURCES, resumable=True, gpus_key="student",
    when=dict.fromkeys(("continue_from", "continue_summary"), lambda w: bool(w.budget_chain)),
    shown={"summary": Shown("student_summary", STUDENTS, (("student", "{student}"),))})
