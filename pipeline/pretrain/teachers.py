"""Teachers inside the pre-training step: the KD teacher's MLM logits, and the reference recipe's online
MLSM targets (teacher forward + lasso in every step)."""

from __future__ import annotations

import torch

from ..common import StageError
from ..data.formats import load_dictionary
from ..data.integrity import read_verified
from ..models import check_vocabulary, load_encoder, loading, resolve_model_source
from ..solvers.lasso import l2_normalise, make_solver
from .data import encoder_mask, gather_masked, with_labels
from .distributed import all_ranks_sum


class KdTeacher:
    def __init__(self, source: str, device: torch.device, corpus_manifest: dict, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForMaskedLM

        path = resolve_model_source(source)
        with loading(f"teacher {source!r}"):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        check_vocabulary(source, path, config, corpus_manifest, trust_remote_code)
        with loading(f"teacher {source!r}"):
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True,
                                                               trust_remote_code=trust_remote_code)
        missing_head = [k for k in info["missing_keys"] if k.startswith("cls.")]
        if missing_head:
            raise StageError(f"objective kd needs a teacher with an MLM head, but {source!r} has none "
                             f"(missing {missing_head[0]}, ...); use a teacher saved with BertForMaskedLM")
        self.model = model.eval().to(device)

    @torch.inference_mode()
    def logits(self, batch: dict, original: bool = False) -> torch.Tensor:
        """The teacher's MLM logits at the masked positions, given the student's masked input or (`original`,
        as the reference, whose teacher runs before the masking) the input before masking."""
        ids = batch["input_ids"]
        if original:
            ids = with_labels(ids, batch)
        hidden = self.model.bert(input_ids=ids, token_type_ids=batch["token_type_ids"],
                                 attention_mask=encoder_mask(self.model.bert, batch)).last_hidden_state
        return self.model.cls(gather_masked(hidden, batch))


class OnlineTargets:
    """MLSM targets made inside the step, as the reference trainer does: the teacher's state of every
    masked token (in the unmasked input), L2-normalised, coded with the lasso solver interface that
    precompute_targets uses (settings `online`: source, layer, lambda, solver, max_iterations, tolerance,
    precision), normalised to sum 1, with no top-k cut. It costs a teacher forward and a solve per step:
    for comparison runs."""

    def __init__(self, settings: dict, device: torch.device, corpus_manifest: dict, dictionary: str, metrics: str):
        self.record = read_verified(metrics, [dictionary])
        self.encoder = load_encoder(settings["source"], settings["layer"], device, corpus_manifest,
                                    settings["trust_remote_code"], settings.get("teacher_precision", "bf16"))
        atoms = torch.from_numpy(load_dictionary(dictionary)).float().to(device)
        if atoms.shape[0] != self.encoder.hidden_size:
            raise StageError(f"dictionary {dictionary} has atoms of size {atoms.shape[0]} but teacher "
                             f"{settings['source']!r} has hidden size {self.encoder.hidden_size}")
        self.solver = make_solver(atoms, settings)

    @torch.no_grad()
    def add_to(self, batch: dict, world: int) -> None:
        original = with_labels(batch["input_ids"], batch)
        with self.encoder.autocast():
            hidden = self.encoder.model(input_ids=original, token_type_ids=batch["token_type_ids"],
                                        attention_mask=encoder_mask(self.encoder.model, batch)).last_hidden_state
        codes = self.solver(l2_normalise(gather_masked(hidden, batch).float())).codes
        total = codes.sum(1, keepdim=True)
        batch["target_weights"] = torch.where(total > 0, codes / total.clamp_min(1e-30), codes)
        batch["target_atoms"] = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)
        count = (total.squeeze(1) > 0).sum().double()  # the losses divide by the global count
        batch["with_target"] = all_ranks_sum(count, world)

