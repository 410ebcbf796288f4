"""The pre-training objectives, as one table: what each needs and which losses it adds up.

`none` is the control: the student's architecture with fresh weights and no pre-training (its job only
initialises and saves the model, with the same initialisation as every other student of that size and
seed), fine-tuned like the others, so that the report can show what pre-training adds.

Read by the config's checks, the workflow's wiring (which inputs a student's job gets), pre-training (which
heads the model has, which losses it computes) and the report. No torch here: the workflow reads it at
every parse. The losses themselves are in pipeline/pretrain/losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    losses: tuple[str, ...]   # the loss parts, added up (mlm weighted by mlm_weight where mixed with mlsm)
    mlm_head: bool            # the student has BERT's MLM head (saved as BertForMaskedLM)
    teacher: bool             # needs a teacher (students.<name>.teacher)

    @property
    def trains(self) -> bool:
        """Has pre-training updates (every objective but the control `none`)."""
        return bool(self.losses)

    @property
    def targets(self) -> bool:
        """Needs MLSM targets: the teacher's activations, a dictionary and target shards (or online targets)."""
        return "mlsm" in self.losses

    @property
    def mlsm_head(self) -> bool:
        return self.targets


OBJECTIVES = {o.name: o for o in (
    Objective("mlsm", ("mlsm",), mlm_head=False, teacher=True),
    Objective("mlm", ("mlm",), mlm_head=True, teacher=False),
    Objective("kd", ("kd",), mlm_head=True, teacher=True),
    Objective("mlsm+mlm", ("mlsm", "mlm"), mlm_head=True, teacher=True),
    Objective("none", (), mlm_head=False, teacher=False),
)}
CONTROL = "none"
# The student options that fix a model's initial weights and shape: a control matches a student on these.
ARCHITECTURE_KEYS = ("size", "dropout", "seed")


def objective(name: str) -> Objective:
    return OBJECTIVES[name]
