"""Stage 1: raw text -> tokenized, packed sequences in parquet shards and a validation split
(pipeline/corpus.py); and the same text packed at another length, for a phase of a seq_len_schedule."""

from __future__ import annotations

from ..data import contract
from .base import CORPUS, Resources, Rule, Shown, Stage, inp, out
from .tokenizer import DATASET_OPTIONS, TEXT

STAGE = Stage("corpus", "raw text -> tokenized, packed sequences in parquet shards and a validation split", (
    TEXT,
    inp("tokenizer_manifest", optional=True, help="the record of a tokenizer train_tokenizer trained"),
    out("shards", many=True), out("validation"),
    out("token_counts", help=".npy: training-token frequency per vocabulary id"), out("manifest")),
    settings=("workers",))


def inputs(w, job):
    tokenizer = {"tokenizer_manifest": w.path(contract.TOKENIZER_MANIFEST)} if w.trained_tokenizer else {}
    return {"text": w.corpus_inputs(), **tokenizer}


def params(w, job):
    # threads changes speed, never the shards; unknown_files lets a run through or stops it before any job
    # (what it skips is counted from the inputs): not params, so changing them reruns nothing. The options of
    # dataset inputs concern only those: without one, changing them reruns nothing either.
    unused = {"threads", "unknown_files", *(() if w.has_datasets() else DATASET_OPTIONS)}
    return {**{k: v for k, v in w.config["corpus"].items() if k not in unused}, "tokenizer": w.tokenizer}


def cost(plan, job):
    """Reading, tokenizing and packing the text; a phase's packing reads and tokenizes it again."""
    from ..plan import BYTES, SHARD_THREADS_MIN_BYTES

    workers = min(plan.config["corpus"]["threads"], plan.cores)
    if plan.corpus.text_bytes < SHARD_THREADS_MIN_BYTES:
        workers = 1
    rate = plan.corpus_rate * workers
    tokens = plan.corpus.tokens + plan.corpus.validation_tokens
    return plan.rates.startup(True) + plan.corpus.text_bytes / rate, \
        tokens * BYTES["corpus_per_token"] + 8 * plan.vocab, 0


RESOURCES = Resources(mem_mb=lambda threads: 2000 + 2000 * threads, runtime=240)


def threads(w, job):
    return w.config["corpus"]["threads"]


SHARD_CORPUS = Rule(
    "shard_corpus", STAGE,
    outputs={"shards": contract.CORPUS_SHARD, "validation": contract.CORPUS_VALIDATION,
             "token_counts": contract.CORPUS_TOKEN_COUNTS, "manifest": contract.CORPUS_MANIFEST},
    inputs=inputs, params=params, jobs=lambda w: [{}], cost=cost, threads=threads, resources=RESOURCES,
    shown={"manifest": Shown("corpus_manifest", CORPUS, (("record", "corpus manifest"),))})

SHARD_CORPUS_PHASE = Rule(
    "shard_corpus_phase", STAGE, job="len{length}",
    outputs={"shards": contract.CORPUS_PHASE_SHARD, "validation": contract.CORPUS_PHASE_VALIDATION,
             "token_counts": contract.CORPUS_PHASE_TOKEN_COUNTS, "manifest": contract.CORPUS_PHASE_MANIFEST},
    inputs=inputs, params=lambda w, job: {**params(w, job), "max_seq_len": int(job.length)},
    jobs=lambda w: [{"length": str(n)} for n in w.extra_lengths()], cost=cost, threads=threads, resources=RESOURCES)
