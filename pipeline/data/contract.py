"""The data contract between stages: where each stage writes, in which format, at which version.

This module is the one place the contract is written down: every path, the parquet schemas the
stages write and the tests check, and the layout of the zarr store, the dictionary and the JSON
files. Bump a stage's FORMAT_VERSION when its code changes its output: the version is part of the
rule's params, so Snakemake reruns that stage and everything downstream of it.

Integrity (pipeline/data/integrity.py): every file is written atomically (temporary name, fsync, rename).
Each stage writes one record, a JSON file with a `checksum` of its own content, which lists the data
files the stage wrote under `files` ({name relative to the record's directory: {bytes, sha256}}):
tokenizer/manifest.json, corpus/manifest.json, teachers/{teacher}/auxiliary/summary.json,
teachers/{teacher}/manifest.json, dictionaries/{dictionary}/metrics.json,
targets/{dictionary}/manifest.json, students/{student}/summary.json, report/manifest.json (and the demo
data's manifest.json). Fine-tuning scores are records themselves. A consumer verifies the files it reads
against their record and refuses a missing, truncated or altered one, naming it. Parquet files also
carry page checksums. Data files hold no timings, so a stage's output depends only on its inputs and
params (timings are in the records of pre-training and fine-tuning, in logs and in benchmarks/).

Resumable state (pipeline/resume.py) of the long stages lives under RESUME_DIR, outside the outputs.
"""

from __future__ import annotations

FORMAT_VERSION = {
    "demo_data": 2,
    "tokenizer": 1,
    "corpus": 4,  # 4: long sentences split into windows instead of cut; text_tokens
    "activations": 3,
    "dictionary": 5,
    "targets": 7,
    "target_summary": 8,  # the targets' record (was the targets' version until it listed atom_usage)
    "pretrain": 5,
    "finetune": 3,
    "report": 5,
}

# ---- paths, relative to the config's `results` directory (demo data goes to resources/) --------
BBC_DIR = "resources/bbc_news"
CORPUS_SHARD = "corpus/shard-{shard}.parquet"  # shard: a 3-digit index, see shard_names()
CORPUS_MANIFEST = "corpus/manifest.json"
CORPUS_VALIDATION = "corpus/validation.parquet"
CORPUS_TOKEN_COUNTS = "corpus/token_counts.npy"
# The corpus packed at another length, for a phase of a student's seq_len_schedule (shard_corpus_phase).
CORPUS_PHASE_SHARD = "corpus/len{length}/shard-{shard}.parquet"
CORPUS_PHASE_VALIDATION = "corpus/len{length}/validation.parquet"
CORPUS_PHASE_TOKEN_COUNTS = "corpus/len{length}/token_counts.npy"
CORPUS_PHASE_MANIFEST = "corpus/len{length}/manifest.json"
TOKENIZER = "tokenizer/model"  # written by the optional train_tokenizer stage
TOKENIZER_MANIFEST = "tokenizer/manifest.json"
AUXILIARY_TEACHER = "teachers/{teacher}/auxiliary/model"  # an auxiliary teacher pre-trained by the pipeline
AUXILIARY_SUMMARY = "teachers/{teacher}/auxiliary/summary.json"
ACTIVATIONS = "teachers/{teacher}/activations.zarr"
ACTIVATIONS_MANIFEST = "teachers/{teacher}/manifest.json"
DICTIONARY = "dictionaries/{dictionary}/dictionary.npy"
DICTIONARY_METRICS = "dictionaries/{dictionary}/metrics.json"
DICTIONARY_ATOMS = "dictionaries/{dictionary}/atoms.json"
TARGET_SHARD = "targets/{dictionary}/shard-{shard}.parquet"
TARGET_VALIDATION = "targets/{dictionary}/validation.parquet"  # targets of corpus/validation.parquet
# A corpus part (a training shard "shard-{shard}" or "validation") and its targets, by the part's name.
CORPUS_PART = "corpus/{part}.parquet"
TARGET_PART = "targets/{dictionary}/{part}.parquet"
TARGET_PART_RECORD = "targets/{dictionary}/{part}.json"  # its bytes and sha256, written with it
VALIDATION_PART = "validation"
TARGET_MANIFEST = "targets/{dictionary}/manifest.json"
# Targets of the corpus packed at another length (its parts are "len{length}/shard-{shard}"), and their record.
TARGET_PHASE_SHARD = "targets/{dictionary}/len{length}/shard-{shard}.parquet"
TARGET_PHASE_MANIFEST = "targets/{dictionary}/len{length}/manifest.json"
STUDENT_MODEL = "students/{student}/model"
STUDENT_CHECKPOINTS = "students/{student}/checkpoints"  # step{N}/ per checkpoint_fractions entry
STUDENT_SUMMARY = "students/{student}/summary.json"
FINETUNE_SCORES = "finetune/{student}/{snapshot}/{task}/seed{seed}.json"  # snapshot: final or step{N}
LOGS = "logs"
BENCHMARKS = "benchmarks"
REPORT_MD = "report/report.md"
REPORT_ABLATION = "report/ablation"  # the plots of the ablation grids (config `grids`)
REPORT_HTML = "report/report.html"  # the same, one self-contained page (plots embedded)
REPORT_CSV = "report/results.csv"
REPORT_PLOT = "report/scores.png"
REPORT_CURVE = "report/sample_efficiency.png"
REPORT_CARDS = "report/cards"  # {student}/README.md: the student's model card with its fine-tuning scores
REPORT_MANIFEST = "report/manifest.json"
# Resumable state of one job of a long stage (checkpoints and journal.jsonl); `job` joins its wildcards.
RESUME_DIR = "resume/{rule}/{job}"


def shard_names(count: int) -> list[str]:
    return [f"{i:03d}" for i in range(count)]


def part_names(count: int) -> list[str]:
    """The corpus parts: the training shards by file name (shard-000, ...), then the validation split."""
    return [f"shard-{name}" for name in shard_names(count)] + [VALIDATION_PART]


def phase_part_names(count: int, length: int) -> list[str]:
    """The training shards of the corpus packed at another length, as corpus parts (len512/shard-000, ...)."""
    return [f"len{length}/shard-{name}" for name in shard_names(count)]


def phase_length(part: str) -> int | None:
    """The packing length of a phase part (len512/shard-000 -> 512); None for a part of the main corpus."""
    return int(part.split("/", 1)[0].removeprefix("len")) if part.startswith("len") else None


def __getattr__(name: str):
    """The parquet schemas below, built on first use: pyarrow stays out of the workflow's parse."""
    if name in _SCHEMAS:
        import pyarrow as pa

        value = _SCHEMAS[name](pa)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- stage 0 (demo only), bbc_news_data ---------------------------------------------------------
# resources/bbc_news/pretrain.txt.gz: corpus text (one sentence per line, blank line between
# articles) from task-train articles only; topic/{train,dev}.tsv: header `text<TAB>label`;
# manifest.json: article counts per split.

# ---- optional stage train_tokenizer -------------------------------------------------------------
# tokenizer/model/: a fast tokenizer (save_pretrained; AutoTokenizer loads it) with [PAD] [UNK] [CLS]
# [SEP] [MASK] as ids 0-4. tokenizer/manifest.json: params, vocab_size, sentences, files, checksum.
# With corpus.tokenizer "train", the corpus (and every model trained on it) uses this tokenizer.

# ---- stage 1, shard_corpus: one row per packed sequence -----------------------------------------
# sentence_pairs packing: input_ids hold [CLS] A [SEP] B [SEP] (B may be empty: [CLS] A [SEP]);
# token_type_ids are 0 on [CLS] A [SEP] and 1 on B [SEP]. contiguous packing: [CLS] tokens [SEP] with
# a [SEP] between documents, token_type_ids all 0. No padding is stored. Shards are written in seq_id
# order, in row groups of ROW_GROUP_ROWS sequences (pipeline/corpus.py), so readers can stream them.
def _corpus_schema(pa):  # contract.CORPUS_SCHEMA
    return pa.schema([
        ("seq_id", pa.int64()),        # global, dense: 0..N-1 across the shards, then N.. in validation
        ("doc_id", pa.int64()),        # index of the (first) source document in input order
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
    ])
# validation.parquet: the held-out documents' sequences, same schema (possibly no rows).
# corpus/len{length}/ (shard_corpus_phase, for a seq_len_schedule phase at another length): the same files,
# the same documents packed at max_seq_len = length (the same seed, validation split and shard assignment
# rule); its targets lie in targets/{dictionary}/len{length}/ with their own manifest.json.
# token_counts.npy: int64 [vocab_size], how often each id occurs in the training shards.
# corpus/manifest.json: documents (training), sentences, sequences and tokens (training shards),
# validation {documents, sequences, tokens, path}, text_tokens {read: the text's tokens (no special
# tokens), train, validation: those written to each split, dropped: {reason: tokens} (reference_pairs
# only; read = train + validation + the dropped ones)}, split_sentences (sentences longer than
# max_seq_len - 2 tokens split into windows, sentence_pairs), skipped {empty_documents, and per reason what
# bad_input: skip dropped}, inputs, tokenizer (its config source), tokenizer_fingerprint (hash of the
# vocabulary; teachers must match it), vocab_size, params, shards [{path, sequences, tokens}], files,
# checksum.

# ---- stage 2, extract_activations: zarr store (N sampled non-special tokens) --------------------
# states float16 [N, d] (raw hidden states, not normalised); token_ids int32 [N];
# seq_ids int64 [N]; positions int16 [N] (rows sorted by seq_id, then position);
# chunks of 16384 rows. attrs: teacher, source, revision (hub commit, if any), model_fingerprint (hash of
# the weight files), layer (from the last), hidden_layer_index, hidden_size, tokenizer,
# tokenizer_fingerprint, normalisation ("none": consumers L2-normalise), dtype, tokens, sampling
# (sample_tokens, sample_seed, subsample, subsample_threshold, positions_per_sequence), format_version.
# An auxiliary teacher (teachers/{teacher}/auxiliary/): model/ and summary.json as a student's (stage 5).
# teachers/{teacher}/manifest.json: the same attributes, files (every file of the store), checksum.
ACTIVATION_ARRAYS = ("states", "token_ids", "seq_ids", "positions")

# ---- stage 3, fit_dictionary ---------------------------------------------------------------------
# dictionary.npy: float32 [d, K], unit-norm columns (atoms), for codes a >= 0.
# metrics.json: heldout_objective (mean 1/2||x - Da||^2 + lambda||a||_1 on held-out L2-normalised
# states, converged codes), relative_residual, mean_nnz, p99_nnz, zero_code_fraction,
# atoms_used_fraction, mutual_coherence, lipschitz, atoms, lambda, hidden_size, train_tokens,
# heldout_tokens, teacher, layer, backend, heldout_curve [[mini-batches, objective]] (torch backend),
# format_version, files (dictionary.npy, atoms.json), checksum.
# atoms.json: [{atom, usage, tokens_used, top_tokens: [{token, weight}]}] for the most-used atoms.

# ---- stage 4, precompute_targets: one row per sequence, aligned with the corpus shard -----------
# Each position keeps a variable number of (atom, weight) entries: the non-zeros of its lasso code, by
# decreasing weight, cut to top_k (`none`: no cut, the reference's full code) and to the first atoms that
# hold top_mass of the code's mass. atom_counts [length] says how many entries each position has (0: its
# code is all zero, it carries no target); atom_ids/weights hold the positions' entries one after another
# (position p's are the atom_counts[p] entries after those of positions 0..p-1). A position's weights sum to
# 1. Every position has a row, special tokens included; the student uses those it masks. One row per
# sequence (not per token) so that a shard reads back as four flat arrays with no per-row work
# (bench/targets.py measures the read speed).
def _target_schema(pa):  # contract.TARGET_SCHEMA
    return pa.schema([
        ("seq_id", pa.int64()),
        ("atom_counts", pa.list_(pa.uint16())),
        ("atom_ids", pa.list_(pa.uint16())),
        ("weights", pa.list_(pa.float16())),
    ])
# validation.parquet: the same for corpus/validation.parquet (possibly no rows).
# {part}.json beside each: the record of that one shard (format_version, dictionary, tokens, files: the
# shard's bytes and sha256, checksum), written by the job that wrote the shard; summarize_targets verifies
# every shard against it before listing it in the manifest.
NNZ_BINS = (0, 1, 8, 16, 32, 64, 128, 256, 512, 1024)  # left edges of the nnz histogram's bins
# Each shard's parquet metadata key b"mlsm_target_stats" holds its statistics (JSON: tokens, mean_nnz,
# p99_nnz, nnz_histogram, zero_code_fraction, mean/max_mass_lost_to_top_k (the mass the top_k and top_mass
# cuts lose), mean_kept_atoms, mean_entropy_nats,
# mean/p99_iterations, atom_usage, dictionary = the dictionary record's checksum). manifest.json sums the
# training shards': tokens, mean_nnz, zero_code_fraction, zero_code_tokens, mean/max_mass_lost_to_top_k,
# mean_entropy_nats, mean_iterations, nnz_histogram {bins, tokens}, atom_usage (the training targets'
# mass per atom: K numbers), atoms_used_fraction, mean_kept_atoms, atom_usage_histogram, dictionary, params
# (solver, lambda, top_k, top_mass, ...), shards [{path, tokens}],
# validation {path, tokens, mean_nnz, zero_code_fraction}, files, checksum.

# ---- stage 5, pretrain_student --------------------------------------------------------------------
# model/: save_pretrained of BertModel (mlsm, and the control none: its initialisation, no update) or
# BertForMaskedLM (mlm, kd, mlsm+mlm) plus its tokenizer (loads with AutoModel /
# AutoModelForSequenceClassification); BertForMaskedLM also for an MLSM student with mlsm_head tied;
# mlsm_head.safetensors for MLSM objectives (metadata atoms; a separate head: a transform, LayerNorm and
# decoder; tied: decoder.weight [K, d] and decoder.bias [K], the K rows the MLM decoder and its bias gain in
# the reference's layout, behind the MLM head's transform);
# pretraining.json (params, steps, objective, atoms, world_size, tokens_seen); README.md, the model card
# (pipeline/reporting/cards.py: Hugging Face YAML front matter, then the training details).
# checkpoints/step{N}/: the same layout, saved after N updates (N = round(f * max_steps) for each
# checkpoint_fractions entry f < 1; pretraining.json's steps is N); empty without checkpoint_fractions.
# summary.json: the same plus seconds, tokens_per_second, parameters, checkpoints (names), card (the facts
# the model cards state: pipeline/pretrain/card.py), final (the
# last history entry), history [{step, loss per part, grad_norm, lr, masked_tokens, tokens_per_second,
# mfu (null off known GPUs), seconds, and at each save validation_mlsm / validation_mlm: the losses
# on corpus/validation.parquet with fixed masks}], baselines {unigram_entropy, unigram_missing_mass,
# seen_tokens, atoms}, diagnostics [{step (0: at initialisation, then each save), validation_mlm,
# unigram_loss, mlm_gain, mlm_gain_se, mlm_tokens, validation_mlsm, mean_target_loss, uniform_loss,
# mlsm_gain, mlsm_gain_se, mlsm_tokens, masked_cosine, real_cosine, embedding_cosine}] (the training-health
# measurements of pipeline/pretrain/diagnostics.py; the losses only where the student has that head and
# the inputs they need), files (every file under model/ and checkpoints/), checksum.
# logs/pretrain_student/{student}.csv: the history.

# ---- stage 6, finetune ----------------------------------------------------------------------------
# finetune/{student}/{snapshot}/{task}/seed{seed}.json, snapshot "final" (model/) or "step{N}"
# (checkpoints/step{N}/): params (with snapshot), task, pretrain_steps (updates of the fine-tuned model),
# metrics (names), score (GLUE convention: mean of the task's official metrics at the last epoch),
# final, epochs, labels, example counts, seconds, checksum.

# ---- stage 7, report --------------------------------------------------------------------------------
# report.md (final models' scores per student x task: mean ± std [95 % bootstrap CI] over seeds and
# the GLUE-style average, with the control, the majority class and each student's training health;
# warnings for failed diagnostics; the diagnostics table; each student against its control, paired by
# seed; MLSM vs MLM differences paired by seed with CIs and a reading that marks those that are not
# findings; the checkpoints' scores by pre-training updates; students; dictionary metrics; atom browser;
# wall and GPU time per stage), report.html (the same page with the plots embedded), results.csv (one
# row per student x snapshot x task x seed: score, control, control_score, minus_control,
# majority_score, health, the diagnostics at that snapshot and the cosines at initialisation),
# scores.png, sample_efficiency.png,
# cards/{student}/README.md (the student's model card with its fine-tuning scores and a model-index),
# manifest.json (files, checksum).

# ---- HDF5 interchange (pipeline/hdf5.py; not a stage's output) -------------------------------------
# python -m pipeline.hdf5 store|dictionary|targets writes the activation store (/states, /token_ids,
# /seq_ids, /positions; the store's attributes as root attributes), a dictionary (/dictionary [d, K]; the
# metrics record in attribute `metrics`) or a targets record's shards (a group per shard: /seq_id,
# /offsets [S+1], /atom_counts [T], /atom_ids and /weights [Z]; attribute `stats`) to HDF5. teachers.<name>.activations
# names an HDF5 file in the store's layout (at least /states and /token_ids) that extract_activations
# imports instead of running the teacher.


_SCHEMAS = {"CORPUS_SCHEMA": _corpus_schema, "TARGET_SCHEMA": _target_schema}
