"""The pre-training losses and how an objective adds them up (pipeline/objectives.py names its parts).

Each loss returns its sum over this process's masked positions divided by a count over the global batch,
so that the processes' shares add up to the mean over the whole global micro-batch.

- mlsm: KL(target || softmax(K units)) on the masked positions that have a target (the reference's
  batchmean over them);
- mlm: cross-entropy over the vocabulary on the masked positions;
- kd: KL(softmax(teacher MLM logits / T) || softmax(student logits / T)) * T^2 on the masked positions;
- mlsm+mlm: mlsm + mlm_weight * mlm.
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



def loss_parts(out: dict, batch: dict, params: dict, teacher) -> dict[str, torch.Tensor]:
    """This process's share of each loss the objective uses."""
    parts = {}
    for part in objective(params["objective"]).losses:
        if part == "mlsm":
            parts["mlsm"] = mlsm_loss(out["mlsm_logits"], batch["target_atoms"], batch["target_weights"],
                                      batch["with_target"])
        elif part == "mlm":
            parts["mlm"] = F.cross_entropy(out["mlm_logits"].float(), batch["labels"], reduction="sum") \
                / batch["masked_count"].clamp_min(1)
        else:
            parts["kd"] = kd_loss(out["mlm_logits"], teacher.logits(batch), params["kd_temperature"],
                                  batch["masked_count"])
    return parts


def total_loss(parts: dict[str, torch.Tensor], params: dict) -> torch.Tensor:
    if "mlsm" in parts and "mlm" in parts:
        return parts["mlsm"] + params["mlm_weight"] * parts["mlm"]
    return parts[params["objective"]]
