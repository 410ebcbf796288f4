"""The pre-training objectives, as one registry: each objective is one entry saying which loss parts it adds up
(and which option weighs a part), which heads the student has, whether it needs a teacher or MLSM targets, the
student options only it reads, and what its model card and the cost plan say of it. The loss parts themselves
(pipeline/pretrain/losses.py: LOSSES) are registered by name there; a part no loss implements is an error.

`none` is the control: the student's architecture with fresh weights and no pre-training (its job only
initialises and saves the model, with the same initialisation as every other student of that size and
seed), fine-tuned like the others, so that the report can show what pre-training adds.

Read by the config's checks (the schema's list of objectives comes from here), the workflow's wiring (which
inputs a student's job gets), pre-training (which heads the model has, which losses it computes), the model
cards, the report and the plan. No torch here: the workflow reads it at every parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossPart:
    name: str
    head: str              # the head whose logits it reads: "mlm" (the vocabulary) or "mlsm" (the K units)
    teacher: bool = False  # reads a teacher's logits in every step
    validated: bool = False  # measured on the validation split too (validation_<name>, the diagnostics)


LOSS_PARTS = {part.name: part for part in (
    LossPart("mlsm", head="mlsm", validated=True),
    LossPart("mlm", head="mlm", validated=True),
    LossPart("kd", head="mlm", teacher=True),
)}


@dataclass(frozen=True)
class Objective:
    name: str
    losses: tuple[str, ...]   # the loss parts, added up (each times the option `weights` names, else 1)
    tags: tuple[str, ...]     # its model cards' tags (the Hugging Face hub's)
    weights: dict = field(default_factory=dict)  # loss part -> the student option that weighs it
    options: tuple[str, ...] = ()  # student options only this objective reads
    rate_as: str = ""         # the objective the plan times its step as (the teacher's forward counted apart)

    def __post_init__(self):
        unknown = [part for part in self.losses if part not in LOSS_PARTS]
        if unknown:
            raise ValueError(f"objective {self.name}: unknown loss part(s) {unknown} (known: {sorted(LOSS_PARTS)})")

    @property
    def trains(self) -> bool:
        """Has pre-training updates (every objective but the control `none`)."""
        return bool(self.losses)

    @property
    def mlm_head(self) -> bool:
        """The student has BERT's MLM head (saved as BertForMaskedLM)."""
        return any(LOSS_PARTS[p].head == "mlm" for p in self.losses)

    @property
    def mlsm_head(self) -> bool:
        return any(LOSS_PARTS[p].head == "mlsm" for p in self.losses)

    @property
    def teacher(self) -> bool:
        """Needs a teacher (students.<name>.teacher): for MLSM targets, or logits in every step."""
        return self.targets or any(LOSS_PARTS[p].teacher for p in self.losses)

    @property
    def targets(self) -> bool:
        """Needs MLSM targets: the teacher's activations, a dictionary and target shards (or online targets)."""
        return "mlsm" in self.losses


OBJECTIVES = {o.name: o for o in (
    Objective("mlsm", ("mlsm",), tags=("masked-latent-semantic-modeling",), options=("mlsm_loss",)),
    Objective("mlm", ("mlm",), tags=("masked-language-modeling",)),
    Objective("kd", ("kd",), tags=("knowledge-distillation",), options=("kd_temperature", "kd_teacher_input"),
              rate_as="mlm"),
    Objective("mlsm+mlm", ("mlsm", "mlm"), tags=("masked-latent-semantic-modeling", "masked-language-modeling"),
              weights={"mlm": "mlm_weight"}, options=("mlm_weight", "mlsm_loss")),
    # The reference's distillation with --mlm_weight > 0 (pretrainer.py: the KL term plus mlm_weight x MLM).
    Objective("kd+mlm", ("kd", "mlm"), tags=("knowledge-distillation", "masked-language-modeling"),
              weights={"mlm": "mlm_weight"}, options=("kd_temperature", "kd_teacher_input", "mlm_weight"),
              rate_as="mlm"),
    Objective("none", (), tags=("no-pretraining-control",)),
)}
CONTROL = "none"
# The student options that fix a model's initial weights and shape: a control matches a student on these.
ARCHITECTURE_KEYS = ("size", "dropout", "seed")


def objective(name: str) -> Objective:
    return OBJECTIVES[name]


def reported_losses() -> tuple[str, ...]:
    """The entries of a student's history that are losses: every part, and the validation loss of those the
    diagnostics measure."""
    return (*LOSS_PARTS, *(f"validation_{p.name}" for p in LOSS_PARTS.values() if p.validated))
