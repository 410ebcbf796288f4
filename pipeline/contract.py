"""The data contract between stages: where each stage writes, in which format, at which version.

docs/data-contract.md describes the same contract in prose; the schemas below are what the stages
write and what the tests check. Bump a stage's FORMAT_VERSION when its code changes its output: the
version is part of the rule's params, so Snakemake reruns that stage and everything downstream.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = {
    "demo_data": 1,
    "corpus": 1,
    "activations": 1,
    "dictionary": 1,
    "targets": 1,
    "pretrain": 1,
    "finetune": 1,
    "report": 1,
}

# ---- paths, relative to the config's `results` directory (demo data goes to resources/) --------
BBC_DIR = "resources/bbc_news"
CORPUS_SHARD = "corpus/shard-{shard}.parquet"  # shard: a 3-digit index, see shard_names()
CORPUS_MANIFEST = "corpus/manifest.json"
ACTIVATIONS = "teachers/{teacher}/activations.zarr"
DICTIONARY = "dictionaries/{teacher}/dictionary.npy"
DICTIONARY_METRICS = "dictionaries/{teacher}/metrics.json"
DICTIONARY_ATOMS = "dictionaries/{teacher}/atoms.json"
TARGET_SHARD = "targets/{teacher}/shard-{shard}.parquet"
TARGET_MANIFEST = "targets/{teacher}/manifest.json"
STUDENT_MODEL = "students/{student}/model"
STUDENT_SUMMARY = "students/{student}/summary.json"
FINETUNE_SCORES = "finetune/{student}/{task}/seed{seed}.json"
LOGS = "logs"
BENCHMARKS = "benchmarks"
REPORT_MD = "report/report.md"
REPORT_CSV = "report/results.csv"
REPORT_PLOT = "report/scores.png"



def shard_names(count: int) -> list[str]:
    return [f"{i:03d}" for i in range(count)]


# ---- stage 1: one row per packed sequence ------------------------------------------------------
# input_ids hold [CLS] A [SEP] B [SEP] (B may be empty: [CLS] A [SEP]); token_type_ids are 0 on
# [CLS] A [SEP] and 1 on B [SEP]. No padding is stored.
CORPUS_SCHEMA = pa.schema([
    ("seq_id", pa.int64()),        # global, dense, 0..N-1 across all shards
    ("doc_id", pa.int64()),        # index of the source document in input order
    ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())),
])

# ---- stage 2: zarr store arrays (N sampled tokens) ---------------------------------------------
# states float16 [N, d] (raw hidden states, not normalised); token_ids int32 [N];
# seq_ids int64 [N]; positions int16 [N]. attrs: teacher, source, layer, hidden_layer_index,
# hidden_size, tokenizer, normalisation ("none": consumers L2-normalise), format_version.
ACTIVATION_ARRAYS = ("states", "token_ids", "seq_ids", "positions")

# ---- stage 3: dictionary.npy float32 [d, K], unit-norm non-negative-coded columns --------------

# ---- stage 4: one row per sequence, aligned with the corpus shard of the same index -----------
# atom_ids/weights are flattened [length * top_k]: position p's atoms are [p*k:(p+1)*k]. Weights of a
# position sum to 1 over its kept atoms, or are all 0 where the lasso code is 0 (no target there).
TARGET_SCHEMA = pa.schema([
    ("seq_id", pa.int64()),
    ("atom_ids", pa.list_(pa.uint16())),
    ("weights", pa.list_(pa.float16())),
])
