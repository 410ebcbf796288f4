"""Stage 5, pretrain_student (and pretrain_teacher): a BERT-style model from scratch (a size preset or any
BERT config) or continued from a checkpoint (`init`), with its objective.

The objectives (pipeline/objectives.py; losses in losses.py):
- mlsm: K extra output units (a separate head, or K rows of the tied MLM decoder); KL(target ||
  softmax(units)) on the masked positions that have a target (or over all of them, zero_code_positions);
- mlm: cross-entropy over the vocabulary on the masked positions;
- kd: KL to the teacher's MLM distribution on the masked positions (the teacher sees the masked input, or
  the original one with kd_teacher_input original, and must have an MLM head);
- mlsm+mlm: mlsm + mlm_weight * mlm.
A seq_len_schedule trains its phases on the corpus (and targets) packed at each phase's length.
MLSM targets come from the precomputed target shards (targets: precomputed) or, to reproduce and time
the reference recipe, are made in the step (targets: online: teacher forward + lasso, teachers.py).

The package: data.py (shards, the batch stream, masking), model.py (the student and its heads),
losses.py, teachers.py (KD teacher, online targets), setup.py (everything built before the first
update), trainer.py (the loop, its state, the outputs), history.py (the training log and validation
losses), distributed.py (torchrun).

Outputs: the final model (save_pretrained: loads with AutoModel; with AutoModelForMaskedLM too when it
has an MLM head; the MLSM head beside it as mlsm_head.safetensors), the models saved after
checkpoint_fractions of the updates (checkpoints/step{N}/), and the record. The training log (losses,
lr, grad norm, masked tokens, tokens/s, MFU on known GPUs, validation MLSM and MLM losses at each save)
goes to the record's history, a CSV, TensorBoard if installed, and the log.

    python -m pipeline.pretrain --corpus-shards s0.parquet ... --corpus-manifest m.json \
        [--validation validation.parquet] [--target-shards t0.parquet ... --target-manifest tm.json \
        --validation-targets tv.parquet] --model model/ [--checkpoints checkpoints/] --summary summary.json \
        [--metrics-csv log.csv] [--tensorboard tb/] [--resume-dir state/] --params '{...}'
"""

from .trainer import train

__all__ = ["train"]
