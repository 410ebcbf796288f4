"""Stage 1a, with corpus.tokenizer: train: a WordPiece or Unigram vocabulary fitted on the corpus text
(pipeline/tokenizer.py), which the corpus, the auxiliary teacher and the students then use."""

from __future__ import annotations

from ..data import contract
from .base import Resources, Rule, Stage, inp, out

TEXT = inp("text", many=True, verbatim=True,
           help="text files, directories or globs, or Hugging Face datasets (hf:<saved dir, dataset dir or hub id>)")
# What reading the corpus text takes: which documents are validation ones, what is bad input, how lines split.
READING = ("inputs", "format", "text_field", "validation_fraction", "bad_input", "max_line_bytes", "max_expansion",
           "max_documents", "sentence_split", "seed")
DATASET_OPTIONS = ("split", "dataset_config")  # corpus options only Hugging Face dataset inputs read

STAGE = Stage("tokenizer", "a WordPiece or Unigram vocabulary trained on the corpus", (
    TEXT, out("model", directory=True, help="the tokenizer (save_pretrained)"), out("manifest")))


def params(w, job):
    keys = (*READING, *(DATASET_OPTIONS if w.has_datasets() else ()))
    return {**{k: w.config["corpus"][k] for k in keys}, **w.config["tokenizer_training"]}


def cost(plan, job):
    from ..plan import TOKENIZER_TRAINING_BYTES_PER_SECOND

    return plan.rates.startup(True) + plan.corpus.text_bytes / TOKENIZER_TRAINING_BYTES_PER_SECOND, 1e6, 0


TRAIN_TOKENIZER = Rule(
    "train_tokenizer", STAGE, outputs={"model": contract.TOKENIZER, "manifest": contract.TOKENIZER_MANIFEST},
    inputs=lambda w, job: {"text": w.corpus_inputs()}, params=params,
    jobs=lambda w: [{}] if w.trained_tokenizer else [], cost=cost,
    resources=Resources(mem_mb=8000, runtime=120))
