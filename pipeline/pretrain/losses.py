"""The pre-training losses, registered by the loss part they implement (pipeline/objectives.py: LOSS_PARTS), and
how an objective adds them up (each part times the option its entry names, else 1).

Each loss returns its sum over this process's masked positions divided by a count over the global batch,
so that the processes' shares add up to the mean over the whole global micro-batch.

- mlsm: KL(target || softmax(K units)) summed over the masked positions that have a target, divided by
  their number (zero_code_positions: exclude) or by the number of masked positions (count: the reference's
  batchmean, where an all-zero target adds 0 to the sum but 1 to the denominator);
- mlm: cross-entropy over the vocabulary on the masked positions;
- kd: KL(softmax(teacher MLM logits / T) || softmax(student logits / T)) * T^2 on the masked positions, the
  teacher given the masked input (kd_teacher_input: masked) or the original one (original: the reference);
- mlsm+mlm: mlsm + mlm_weight * mlm.

A new loss part is a function (out, batch, params, teacher) -> this process's share, in LOSSES.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives import objective


def mlsm_loss(logits: torch.Tensor, atoms: torch.Tensor, weights: torch.Tensor,
              count: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || softmax(logits)) with sparse targets, summed over positions with a target / count
    (by default, their number: the reference's batchmean over masked tokens that have a target)."""
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, atoms)
    entropy_term = torch.where(weights > 0, weights * weights.clamp_min(1e-30).log(), torch.zeros_like(weights))
    total = (entropy_term - weights * log_probs).sum()  # positions without a target have zero weights
    count = (weights.sum(1) > 0).sum() if count is None else count
    return total / count.clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            count: torch.Tensor | None = None) -> torch.Tensor:
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    total = F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2
    return total / (len(student_logits) if count is None else count.clamp_min(1))


def mlsm_count(batch: dict, params: dict) -> torch.Tensor:
    """What the MLSM loss sum is divided by: the masked positions with a target, or all masked positions."""
    return batch["masked_count"] if params.get("zero_code_positions") == "count" else batch["with_target"]


def mlsm_part(out: dict, batch: dict, params: dict, teacher) -> torch.Tensor:
    if params.get("mlsm_loss", "kl") == "argmax":
        return argmax_loss(out["mlsm_logits"], batch["target_atoms"], batch["target_weights"],
                           mlsm_count(batch, params),
                           params.get("zero_code_positions") == "count")
    return mlsm_loss(out["mlsm_logits"], batch["target_atoms"], batch["target_weights"], mlsm_count(batch, params))


def argmax_loss(logits: torch.Tensor, atoms: torch.Tensor, weights: torch.Tensor, count: torch.Tensor,
                zero_codes_as_atom_0: bool) -> torch.Tensor:
    """The cross-entropy of each position's largest target atom (the reference's --not-kl_loss), summed and divided
    by `count`. A position without a target has atom 0 as its largest (the argmax of a zero vector), as the
    reference has it, or is left out."""
    largest = atoms.gather(1, weights.argmax(1, keepdim=True)).squeeze(1)
    has_target = weights.sum(1) > 0
    largest = torch.where(has_target, largest, torch.zeros_like(largest))
    losses = F.cross_entropy(logits.float(), largest, reduction="none")
    counted = has_target | zero_codes_as_atom_0
    return torch.where(counted, losses, torch.zeros_like(losses)).sum() / count.clamp_min(1)


def mlm_part(out: dict, batch: dict, params: dict, teacher) -> torch.Tensor:
    return F.cross_entropy(out["mlm_logits"].float(), batch["labels"], reduction="sum") \
        / batch["masked_count"].clamp_min(1)


def kd_part(out: dict, batch: dict, params: dict, teacher) -> torch.Tensor:
    original = params.get("kd_teacher_input") == "original"
    return kd_loss(out["mlm_logits"], teacher.logits(batch, original), params["kd_temperature"],
                   batch["masked_count"])


LOSSES = {"mlsm": mlsm_part, "mlm": mlm_part, "kd": kd_part}


def loss_parts(out: dict, batch: dict, params: dict, teacher) -> dict[str, torch.Tensor]:
    """This process's share of each loss the objective uses."""
    parts = {}
    for part in objective(params["objective"]).losses:
        if part not in LOSSES:
            raise ValueError(f"objective {params['objective']}: no loss implements the part {part!r} "
                             f"(pipeline/pretrain/losses.py: LOSSES has {sorted(LOSSES)})")
        parts[part] = LOSSES[part](out, batch, params, teacher)
    return parts


def total_loss(parts: dict[str, torch.Tensor], params: dict) -> torch.Tensor:
    """The parts added up, each times the option the objective's entry names for it (else 1)."""
    weights = objective(params["objective"]).weights
    return sum(params[weights[name]] * part if name in weights else part for name, part in parts.items())
