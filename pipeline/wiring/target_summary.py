"""Stage 4b: the target shards' statistics, each verified against its own record, summed into the targets'
record: of the corpus's parts, and of each other length's (pipeline/target_summary.py)."""

from __future__ import annotations

from ..data import contract
from .base import TARGETS, Resources, Rule, Shown, Stage, inp, out

STAGE = Stage("target_summary", "the target shards' statistics summed into the targets' record", (
    inp("shards", many=True), inp("validation", optional=True),
    inp("records", many=True, optional=True, help="each shard's record, in the order of the shards and the "
                                                  "validation targets (default: beside each, .json)"),
    out("manifest")))


def inputs(w, job):
    # Each shard's record, in the order of the shards and the validation targets (the parts).
    records = [w.path(contract.TARGET_PART_RECORD, dictionary=job.dictionary, part=part) for part in w.parts]
    return {"shards": w.target_shards(job.dictionary),
            "validation": w.path(contract.TARGET_VALIDATION, dictionary=job.dictionary), "records": records}


def phase_inputs(w, job):
    parts = contract.phase_part_names(len(w.shards), int(job.length))
    return {"shards": w.phase_target_shards(job.dictionary, int(job.length)),
            "records": [w.path(contract.TARGET_PART_RECORD, dictionary=job.dictionary, part=part) for part in parts]}


def cost(plan, job):
    """Hashing every target shard against its record, THREADS at a time (those of one length for a phase's
    summary); the statistics come from the shards' footers."""
    from ..plan import BYTES, DISK_READ_BYTES_PER_SECOND, HASH_BYTES_PER_SECOND, stored_atoms

    tokens = plan.corpus.tokens + (plan.corpus.validation_tokens if not hasattr(job, "length") else 0)
    _, d, t = plan.workflow.coding(job.dictionary)
    stored = tokens * stored_atoms(d, t) * BYTES["target_per_atom"]
    rate = min(HASH_BYTES_PER_SECOND * min(THREADS, plan.cores), DISK_READ_BYTES_PER_SECOND)
    return plan.rates.startup(False) + stored / rate, BYTES["record"], 0


THREADS = 4  # shards hashed at a time
RESOURCES = Resources(mem_mb=2000, runtime=10, local=True)

SUMMARIZE_TARGETS = Rule(
    "summarize_targets", STAGE, job="{dictionary}", outputs={"manifest": contract.TARGET_MANIFEST},
    inputs=inputs, params=lambda w, job: w.target_slice(job.dictionary),
    jobs=lambda w: [{"dictionary": c} for c in w.codings],
    cost=cost, threads=THREADS, resources=RESOURCES,
    shown={"manifest": Shown("target_manifest", TARGETS, (("dictionary", "{dictionary}"),))})

SUMMARIZE_PHASE_TARGETS = Rule(
    "summarize_phase_targets", STAGE, job="{dictionary}_len{length}", uses=("shards", "records"),
    outputs={"manifest": contract.TARGET_PHASE_MANIFEST}, inputs=phase_inputs,
    params=lambda w, job: w.target_slice(job.dictionary),
    jobs=lambda w: [{"dictionary": c, "length": str(n)} for c in w.codings for n in w.target_lengths(c)],
    cost=cost, threads=THREADS, resources=RESOURCES)
