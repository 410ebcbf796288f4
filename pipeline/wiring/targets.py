"""Stage 4: the MLSM targets of each corpus part, a training shard or the validation split, at the corpus's
length and at each other length of an MLSM student's seq_len_schedule (pipeline/targets.py)."""

from __future__ import annotations

from ..data import contract
from .base import RESUME, Resources, Rule, Stage, inp, out
from .teacher import AUXILIARY

STAGE = Stage("targets", "per-token MLSM target distributions of one corpus part", (
    inp("corpus_part", help="a corpus shard, or the validation split"), inp("corpus_manifest"),
    inp("dictionary"), inp("dictionary_metrics"), *AUXILIARY, out("targets"),
    out("record", optional=True, help="the shard's record: its bytes and sha256 (default: beside it, .json)"),
    RESUME), settings=("checkpoint_seconds",), entry="compute")


def inputs(w, job):
    length = contract.phase_length(job.part)
    manifest = contract.CORPUS_MANIFEST if length is None else contract.CORPUS_PHASE_MANIFEST
    return {"corpus_part": w.path(contract.CORPUS_PART, part=job.part),
            "corpus_manifest": w.path(manifest, length=length),
            "dictionary": w.path(contract.DICTIONARY, dictionary=job.dictionary),
            "dictionary_metrics": w.path(contract.DICTIONARY_METRICS, dictionary=job.dictionary),
            **w.teacher_model(w.coding_teacher(job.dictionary))}


def jobs(w):
    """Every part of the corpus, then of each other length an MLSM student of the coding trains at."""
    found = []
    for coding in w.codings:
        parts = list(w.parts) + [p for n in w.target_lengths(coding)
                                 for p in contract.phase_part_names(len(w.shards), n)]
        found += [{"dictionary": coding, "part": part} for part in parts]
    return found


def params(w, job):
    return w.teacher_slice(w.coding_teacher(job.dictionary), w.target_slice(job.dictionary))


def cost(plan, job):
    from ..plan import BYTES, stored_atoms

    teacher, d, t = plan.workflow.coding(job.dictionary)
    tokens = plan.corpus.validation_tokens if job.part == "validation" else \
        plan.corpus.tokens / plan.config["corpus"]["shards"]
    load, forward = plan.teacher(teacher, 1)
    solve = plan.rates.lasso(plan.hidden(teacher), d["atoms"], plan.key(plan.solver(t, d["lambda"])), 1)
    seconds = plan.rates.startup(True) + load + tokens / forward + tokens / solve
    return seconds, tokens * stored_atoms(d, t) * BYTES["target_per_atom"], 1


PRECOMPUTE_TARGETS = Rule(
    "precompute_targets", STAGE, job="{dictionary}_{part}",
    outputs={"targets": contract.TARGET_PART, "record": contract.TARGET_PART_RECORD},
    inputs=inputs, params=params, jobs=jobs, cost=cost,
    threads=lambda w, job: w.process_threads(1), resources=Resources(mem_mb=8000, runtime=240, gpu=True),
    resumable=True)
