"""What the rules' config slices share (pipeline/wiring/<stage>.py declares each rule's own): a part of
Workflow (pipeline/wiring/workflow.py). A job's params are its rule's slice and its stage's format version, and
nothing else: changing a key reruns exactly the jobs whose slice holds it (tests/test_wiring.py checks it key
by key).
"""

from __future__ import annotations

from .. import config as cfg
from ..data import contract
from . import RULES

# Keys added after results were first made, at the value that does what the pipeline did before the key existed:
# left out of a job's params at that value, so that upgrading the pipeline reruns no job whose behaviour it did
# not change; set to anything else, the key enters the params and reruns the jobs that read it. The stages
# read each with that value as its default. (key: (value, the rules it applies to; None: every rule))
ADDED_AT_DEFAULT = {
    "teacher_precision": ("bf16", None),
    "spams_call": ("pipeline", None),
    "mask_unknown": (False, None),
    "mlsm_loss": ("kl", None),
    "precision": ("bf16", ("pretrain_student", "pretrain_teacher")),  # finetune's precision is not new
}


def without_added_defaults(rule: str, params: dict) -> dict:
    """params (and the dicts inside them) without the ADDED_AT_DEFAULT keys at their old behaviour's value."""
    def keep(key, value) -> bool:
        if key not in ADDED_AT_DEFAULT:
            return True
        default, rules = ADDED_AT_DEFAULT[key]
        return value != default or (rules is not None and rule not in rules)

    return {k: without_added_defaults(rule, v) if isinstance(v, dict) else v for k, v in params.items() if keep(k, v)}


class Slices:
    """The params of every rule's jobs, and the slices several rules share."""

    def params(self, rule: str, wildcards) -> str:
        declared = RULES[rule]
        version = contract.FORMAT_VERSION.get(declared.stage.format_version, 1)  # a new stage starts at 1
        params = {"format_version": version, **declared.params(self, wildcards)}
        return cfg.as_json(without_added_defaults(rule, params))

    def teacher_slice(self, teacher: str, *slices: dict) -> dict:
        """A teacher's options (not its auxiliary pre-training's), its source and the corpus tokenizer."""
        merged = {k: v for k, v in self.config["teachers"][teacher].items() if k not in ("auxiliary", "dictionaries")}
        for part in slices:
            merged.update(part)
        return {**merged, "teacher": teacher, "source": self.teacher_source(teacher), "tokenizer": self.tokenizer,
                "device": self.device}

    def target_slice(self, coding: str) -> dict:
        """A coding's targets section and its dictionary's lambda."""
        _, dictionary, targets = self.coding(coding)
        return {**targets, "lambda": dictionary["lambda"]}

    def model_card(self) -> dict:
        """The metadata of the model cards pre-training writes into the model directories."""
        chosen = self.config["model_card"]
        hub = [d for d in self.hub_datasets() if d not in chosen["datasets"]]
        return {**chosen, "datasets": [*chosen["datasets"], *hub]}

    def online_settings(self, options: dict, coding: str) -> dict:
        """What an online student's step codes targets with: the reference solver or its coding's targets
        section's."""
        teacher, dictionary, targets = self.coding(coding)
        solver = cfg.REFERENCE_SOLVER
        if options["online_solver"] == "targets":
            solver = {k: targets[k] for k in cfg.SOLVER_KEYS}
        return {**solver, "lambda": dictionary["lambda"], "source": self.teacher_source(teacher),
                "layer": self.config["teachers"][teacher]["layer"],
                "teacher_precision": targets["teacher_precision"],
                "trust_remote_code": self.config["teachers"][teacher]["trust_remote_code"]}
