"""Stage 2: a teacher's hidden states of one layer for a sample of tokens -> zarr (pipeline/teacher.py), or its
states computed elsewhere (HDF5) imported."""

from __future__ import annotations

from ..data import contract
from .base import RESUME, Resources, Rule, Stage, inp, out

AUXILIARY = (inp("teacher_model", directory=True, optional=True, help="an auxiliary teacher the pipeline trained"),
             inp("teacher_summary", optional=True, help="its record, to verify it"))

STAGE = Stage("teacher", "a teacher's hidden states of one layer for a sample of tokens -> zarr", (
    inp("corpus_shards", many=True), inp("corpus_manifest"),
    inp("token_counts", optional=True, help="needed for subsample w2v and drop"), *AUXILIARY,
    inp("states", optional=True, help="teacher states computed elsewhere (HDF5, pipeline/hdf5.py), imported "
        "instead of running the teacher"),
    out("store", directory=True, help="the zarr store"), out("manifest"), RESUME),
    settings=("checkpoint_seconds",), version="activations", entry="extract")


def inputs(w, job):
    imported = w.config["teachers"][job.teacher].get("activations")  # states computed elsewhere (HDF5)
    return {"corpus_shards": w.corpus_shards(), "corpus_manifest": w.path(contract.CORPUS_MANIFEST),
            "token_counts": w.path(contract.CORPUS_TOKEN_COUNTS), **w.teacher_model(job.teacher),
            **({"states": imported} if imported else {})}


def params(w, job):
    a = w.config["activations"]
    sample = {"sample_tokens": a["sample_tokens"], "sample_seed": a["seed"], "subsample": a["subsample"],
              "subsample_threshold": a["subsample_threshold"], "positions_per_sequence": a["positions_per_sequence"],
              "teacher_precision": a["teacher_precision"]}
    return w.teacher_slice(job.teacher, sample)


def cost(plan, job):
    from ..plan import BYTES, COPY_BYTES_PER_SECOND, SUBSAMPLE_KEEP, specials

    a, teacher = plan.config["activations"], plan.config["teachers"][job.teacher]
    hidden = plan.hidden(job.teacher)
    disk = a["sample_tokens"] * (hidden * BYTES["store_per_value"] + BYTES["store_per_row"])
    if teacher.get("activations"):  # imported from HDF5: a copy
        return plan.rates.startup(True) + a["sample_tokens"] * hidden * 2 / COPY_BYTES_PER_SECOND, disk, 1
    per_sequence = plan.length - specials(plan.config["corpus"]["packing"])
    if a["positions_per_sequence"]:
        per_sequence = min(per_sequence, a["positions_per_sequence"])
    tokens = min(plan.corpus.tokens, a["sample_tokens"] / SUBSAMPLE_KEEP[a["subsample"]] / per_sequence * plan.length)
    load, rate = plan.teacher(job.teacher, EXTRACT_ACTIVATIONS.job_threads(plan.workflow, job))
    return plan.rates.startup(True) + load + tokens / rate, disk, 1


EXTRACT_ACTIVATIONS = Rule(
    "extract_activations", STAGE, job="{teacher}",
    outputs={"store": contract.ACTIVATIONS, "manifest": contract.ACTIVATIONS_MANIFEST},
    inputs=inputs, params=params, jobs=lambda w: [{"teacher": t} for t in w.teachers], cost=cost,
    threads=2, resources=Resources(mem_mb=8000, runtime=120, gpu=True), resumable=True)
