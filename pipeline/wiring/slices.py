"""What the rules' config slices share (pipeline/wiring/<stage>.py declares each rule's own): a part of
Workflow (pipeline/wiring/workflow.py). A job's params are its rule's slice and its stage's format version, and
nothing else: changing a key reruns exactly the jobs whose slice holds it (tests/test_wiring.py checks it key
by key).
"""

from __future__ import annotations

from .. import config as cfg
from ..data import contract
from . import RULES


class Slices:
    """The params of every rule's jobs, and the slices several rules share."""

    def params(self, rule: str, wildcards) -> str:
        declared = RULES[rule]
        version = contract.FORMAT_VERSION.get(declared.stage.format_version, 1)  # a new stage starts at 1
        return cfg.as_json({"format_version": version, **declared.params(self, wildcards)})

    def teacher_slice(self, teacher: str, *slices: dict) -> dict:
        """A teacher's options (not its auxiliary pre-training's), its source and the corpus tokenizer."""
        merged = {k: v for k, v in self.config["teachers"][teacher].items() if k != "auxiliary"}
        for part in slices:
            merged.update(part)
        return {**merged, "teacher": teacher, "source": self.teacher_source(teacher), "tokenizer": self.tokenizer,
                "device": self.device}

    def target_slice(self) -> dict:
        return {**self.config["targets"], "lambda": self.config["dictionary"]["lambda"]}

    def model_card(self) -> dict:
        """The metadata of the model cards pre-training writes into the model directories."""
        chosen = self.config["model_card"]
        hub = [d for d in self.hub_datasets() if d not in chosen["datasets"]]
        return {**chosen, "datasets": [*chosen["datasets"], *hub]}

    def online_settings(self, options: dict, teacher: str) -> dict:
        """What an online student's step codes targets with: the reference solver or the targets section's."""
        solver = cfg.REFERENCE_SOLVER
        if options["online_solver"] == "targets":
            solver = {k: self.config["targets"][k] for k in cfg.SOLVER_KEYS}
        return {**solver, "lambda": self.config["dictionary"]["lambda"], "source": self.teacher_source(teacher),
                "layer": self.config["teachers"][teacher]["layer"],
                "teacher_precision": self.config["targets"]["teacher_precision"],
                "trust_remote_code": self.config["teachers"][teacher]["trust_remote_code"]}
