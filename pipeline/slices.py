"""Each rule's params: its stage's config slice and format version, and nothing else (changing a key reruns
exactly the jobs whose slice holds it; tests/test_wiring.py checks it key by key). A part of Workflow
(pipeline/workflow.py), which gives the names and paths these use.
"""

from __future__ import annotations

from . import config as cfg
from . import contract
from .objectives import ARCHITECTURE_KEYS, objective
from .rules import RULES
from .stages import STAGES

# A control's job beside its architecture: no updates, its diagnostics' masks, what else shapes its weights.
CONTROL_KEYS = ("objective", "max_steps", "checkpoint_fractions", "mask_fraction", "mask_strategy", "architecture",
                "init", "seq_len_schedule")
DATASET_OPTIONS = ("split", "dataset_config")  # corpus options only Hugging Face dataset inputs read


class Slices:
    """The params of every rule's jobs, by the rule's name: `_<rule>_params(wildcards)`."""

    def params(self, rule: str, wildcards) -> str:
        return cfg.as_json(getattr(self, f"_{rule}_params")(wildcards))

    def _slice(self, rule: str, *slices: dict, **extra) -> dict:
        merged = {"format_version": contract.FORMAT_VERSION[STAGES[RULES[rule].stage].format_version]}
        for part in slices:
            merged.update(part)
        return {**merged, **extra}

    def _bbc_news_data_params(self, w) -> dict:
        return self._slice("bbc_news_data", self.config["demo_data"]["bbc_news"])

    def _train_tokenizer_params(self, w) -> dict:
        # What reading the text takes (which documents are validation ones, what is bad input) and the training.
        keys = ("inputs", "format", "text_field", "validation_fraction", "bad_input", "max_line_bytes", "max_expansion",
                "max_documents", "sentence_split", "seed", *(DATASET_OPTIONS if self.has_datasets() else ()))
        reading = {k: self.config["corpus"][k] for k in keys}
        return self._slice("train_tokenizer", reading, self.config["tokenizer_training"])

    def _shard_corpus_params(self, w) -> dict:
        # threads changes speed, never the shards; unknown_files lets a run through or stops it before any
        # job (what it skips is counted from the inputs): not params, so changing them reruns nothing. The
        # options of dataset inputs concern only those: without one, changing them reruns nothing either.
        unused = {"threads", "unknown_files", *(() if self.has_datasets() else DATASET_OPTIONS)}
        options = {k: v for k, v in self.config["corpus"].items() if k not in unused}
        return self._slice("shard_corpus", options, tokenizer=self.tokenizer)

    def _shard_corpus_phase_params(self, w) -> dict:
        options = {**self._shard_corpus_params(w), "max_seq_len": int(w.length)}
        return self._slice("shard_corpus_phase", options)

    def _pretrain_teacher_params(self, w) -> dict:
        options = {**self.config["teachers"][w.teacher]["auxiliary"], "objective": "mlm"}
        return self._slice("pretrain_teacher", options, student=f"auxiliary teacher {w.teacher}", device=self.device,
                           model_card=self.model_card())

    def _teacher_slice(self, rule: str, teacher: str, *slices: dict) -> dict:
        options = {k: v for k, v in self.config["teachers"][teacher].items() if k != "auxiliary"}
        return self._slice(rule, options, *slices, teacher=teacher, source=self.teacher_source(teacher),
                           tokenizer=self.tokenizer, device=self.device)

    def _extract_activations_params(self, w) -> dict:
        a = self.config["activations"]
        sample = {"sample_tokens": a["sample_tokens"], "sample_seed": a["seed"], "subsample": a["subsample"],
                  "subsample_threshold": a["subsample_threshold"],
                  "positions_per_sequence": a["positions_per_sequence"]}
        return self._teacher_slice("extract_activations", w.teacher, sample)

    def _fit_dictionary_params(self, w) -> dict:
        return self._slice("fit_dictionary", self.config["dictionary"], device=self.device)

    def target_slice(self) -> dict:
        return {**self.config["targets"], "lambda": self.config["dictionary"]["lambda"]}

    def _precompute_targets_params(self, w) -> dict:
        return self._teacher_slice("precompute_targets", w.teacher, self.target_slice())

    def _summarize_targets_params(self, w) -> dict:
        return self._slice("summarize_targets", self.target_slice())

    def _summarize_phase_targets_params(self, w) -> dict:
        return self._slice("summarize_phase_targets", self.target_slice())

    def _pretrain_student_params(self, w) -> dict:
        student = w.student
        options = self.student_options(student)
        needs = objective(options["objective"])
        if not needs.trains:  # the control: only what fixes its weights and the masks of its diagnostics
            kept = {k: options[k] for k in (*ARCHITECTURE_KEYS, *CONTROL_KEYS)}
            return self._slice("pretrain_student", kept, student=student, device=self.device,
                               model_card=self.model_card())
        extra = {"student": student, "device": self.device, "model_card": self.model_card()}
        teacher = self.student_teacher(student)
        if teacher is None:
            options.pop("teacher", None)
        else:
            extra["teacher_source"] = self.teacher_source(teacher)
            extra["teacher_trust_remote_code"] = self.config["teachers"][teacher]["trust_remote_code"]
        if needs.targets:
            extra["atoms"] = self.config["dictionary"]["atoms"]
        else:
            options.pop("targets")  # an option of MLSM students only: changing it must not rerun the others
        if self.online_targets(student):
            extra["online"] = self.online_settings(options, teacher)
        else:
            options.pop("online_solver")  # only online students use it
        return self._slice("pretrain_student", options, **extra)

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
                "trust_remote_code": self.config["teachers"][teacher]["trust_remote_code"]}

    def _finetune_params(self, w) -> dict:
        # The lists of seeds and checkpoint tasks are left out: they add jobs and must not rerun the others.
        options = {k: v for k, v in self.config["finetune"].items() if k not in ("seeds", "checkpoint_tasks")}
        return self._slice("finetune", options, snapshot=w.snapshot, student=w.student,
                           objective=self.config["students"][w.student]["objective"], task_name=w.task,
                           task=self.config["tasks"][w.task], seed=int(w.seed), device=self.device)

    def _report_params(self, w) -> dict:
        gpus = {s: self.student_options(s)["gpus"] for s in self.students}
        return self._slice("report", device=self.device, student_gpus=gpus)
