"""The workflow's wiring for one config, in tested Python: each job's input paths and config slice, and the
list of jobs the config makes.

The Snakemake rules (workflow/rules/*.smk) take everything but their resources from here and from
pipeline/rules.py, so that a port is named once (pipeline/stages.py) and its path once. Each rule's
params are its stage's config slice and format version, and nothing else: changing a key reruns exactly
the jobs whose slice holds it (tests/test_wiring.py checks it key by key). Nothing here imports torch or
pyarrow: Snakemake reads it at every parse, also in every cluster job.
"""

from __future__ import annotations

from . import config as cfg
from . import contract
from .launch import torchrun_command
from .objectives import ARCHITECTURE_KEYS, objective
from .rules import RULES, fill
from .stages import STAGES
from .tasks import task_files
from .text import input_files

BBC_DIR = contract.BBC_DIR
# A control's job beside its architecture: no updates, its diagnostics' masks, what else shapes its weights.
CONTROL_KEYS = ("objective", "max_steps", "checkpoint_fractions", "mask_fraction", "mask_strategy", "architecture",
                "init", "seq_len_schedule")


class Workflow:
    """One validated config's DAG: its names, paths, each job's inputs and config slice, and its jobs."""

    def __init__(self, config: dict):
        self.config = config
        self.results = config["results"]
        self.shards = contract.shard_names(config["corpus"]["shards"])
        self.parts = contract.part_names(config["corpus"]["shards"])
        self.students = sorted(config["students"])
        self.tasks = sorted(config["tasks"])
        self.seeds = config["finetune"]["seeds"]
        self.teachers = cfg.teachers_in_use(config)  # teachers whose activations, dictionary and targets run
        self.trained_tokenizer = config["corpus"]["tokenizer"] == cfg.TRAINED_TOKENIZER
        self.tokenizer = self.path(contract.TOKENIZER) if self.trained_tokenizer else config["corpus"]["tokenizer"]
        self.device = config["device"]

    # ---- paths ----

    def path(self, template: str, **wildcards) -> str:
        """A contract path under the results directory; unfilled fields stay Snakemake wildcards."""
        return f"{self.results}/{fill(template, **wildcards)}"

    def job(self, rule: str, **wildcards) -> str:
        return fill(RULES[rule].job, **wildcards) or rule

    def log(self, rule: str, **wildcards) -> str:
        return f"{self.results}/{contract.LOGS}/{rule}/{self.job(rule, **wildcards)}.log"

    def benchmark(self, rule: str, **wildcards) -> str:
        return f"{self.results}/{contract.BENCHMARKS}/{rule}/{self.job(rule, **wildcards)}.tsv"

    def resume_dir(self, rule: str, **wildcards) -> str:
        """Where a job of a long stage keeps its resumable state (not an output: it survives a failure)."""
        return self.path(contract.RESUME_DIR, rule=rule, job=self.job(rule, **wildcards))

    def outputs(self, rule: str) -> dict:
        """Port -> path template (a list for a port of many files)."""
        out = {}
        for port, template in RULES[rule].outputs.items():
            if rule == "bbc_news_data":
                out[port] = f"{BBC_DIR}/{template}"
            elif STAGES[RULES[rule].stage].port(port).many:
                out[port] = [self.path(template, shard=s) for s in self.shards]
            else:
                out[port] = self.path(template)
        return out

    def logs(self, rule: str) -> dict:
        return {"main": self.log(rule), **{port: self.path(t) for port, t in RULES[rule].logs.items()}}

    # ---- names ----

    def corpus_shards(self) -> list[str]:
        return [self.path(contract.CORPUS_SHARD, shard=s) for s in self.shards]

    def target_shards(self, teacher: str) -> list[str]:
        return [self.path(contract.TARGET_SHARD, teacher=teacher, shard=s) for s in self.shards]

    def corpus_inputs(self) -> list[str]:
        # Missing files stay in the list, so that Snakemake names them as missing input (preflight.check_inputs
        # has stopped the run before, unless a rule writes them).
        corpus = self.config["corpus"]
        return [str(f) for f in input_files(corpus["inputs"], strict=False, unknown_files=corpus["unknown_files"])]

    def is_auxiliary(self, teacher: str) -> bool:
        return self.config["teachers"][teacher]["source"] == cfg.AUXILIARY_TEACHER

    def teacher_source(self, teacher: str) -> str:
        """What from_pretrained loads: the configured source, or the auxiliary teacher pretrain_teacher writes."""
        if self.is_auxiliary(teacher):
            return self.path(contract.AUXILIARY_TEACHER, teacher=teacher)
        return self.config["teachers"][teacher]["source"]

    def student_options(self, student: str) -> dict:
        return cfg.student_options(self.config, student)

    def student_teacher(self, student: str) -> str | None:
        options = self.config["students"][student]
        return options.get("teacher") if objective(options["objective"]).teacher else None

    def online_targets(self, student: str) -> bool:
        """Whether the student makes its MLSM targets in the step (from the dictionary) instead of reading them."""
        options = self.student_options(student)
        return objective(options["objective"]).targets and options["targets"] == "online"

    def gpus(self, rule: str, wildcards) -> int:
        """Processes (torchrun) of a pre-training job: the student's or auxiliary teacher's `gpus`."""
        if RULES[rule].gpus_key == "student":
            return self.student_options(wildcards.student)["gpus"]
        if RULES[rule].gpus_key == "teacher":
            return self.config["teachers"][wildcards.teacher]["auxiliary"]["gpus"]
        return 1

    def launcher(self, rule: str, wildcards) -> str:
        return torchrun_command(self.gpus(rule, wildcards))

    # ---- each rule's inputs: port -> path(s), for one job ----

    def inputs(self, rule: str, wildcards) -> dict:
        return getattr(self, f"_{rule}_inputs")(wildcards)

    def _bbc_news_data_inputs(self, w) -> dict:
        return {}

    def _train_tokenizer_inputs(self, w) -> dict:
        return {"text": self.corpus_inputs()}

    def _shard_corpus_inputs(self, w) -> dict:
        tokenizer = {"tokenizer_manifest": self.path(contract.TOKENIZER_MANIFEST)} if self.trained_tokenizer else {}
        return {"text": self.corpus_inputs(), **tokenizer}

    def _shard_corpus_phase_inputs(self, w) -> dict:
        return self._shard_corpus_inputs(w)

    def _pretrain_teacher_inputs(self, w) -> dict:
        return {"corpus_shards": self.corpus_shards(), "corpus_manifest": self.path(contract.CORPUS_MANIFEST),
                **self.phase_inputs(self.config["teachers"][w.teacher]["auxiliary"], None)}

    def teacher_model(self, teacher: str | None) -> dict:
        """The auxiliary teacher's model and record, which a job using the teacher reads."""
        if teacher is None or not self.is_auxiliary(teacher):
            return {}
        return {"teacher_model": self.path(contract.AUXILIARY_TEACHER, teacher=teacher),
                "teacher_summary": self.path(contract.AUXILIARY_SUMMARY, teacher=teacher)}

    def _extract_activations_inputs(self, w) -> dict:
        return {"corpus_shards": self.corpus_shards(), "corpus_manifest": self.path(contract.CORPUS_MANIFEST),
                "token_counts": self.path(contract.CORPUS_TOKEN_COUNTS), **self.teacher_model(w.teacher)}

    def _fit_dictionary_inputs(self, w) -> dict:
        return {"activations": self.path(contract.ACTIVATIONS, teacher=w.teacher),
                "activations_manifest": self.path(contract.ACTIVATIONS_MANIFEST, teacher=w.teacher)}

    def _precompute_targets_inputs(self, w) -> dict:
        length = contract.phase_length(w.part)
        manifest = contract.CORPUS_MANIFEST if length is None else contract.CORPUS_PHASE_MANIFEST
        return {"corpus_part": self.path(contract.CORPUS_PART, part=w.part),
                "corpus_manifest": self.path(manifest, length=length),
                "dictionary": self.path(contract.DICTIONARY, teacher=w.teacher),
                "dictionary_metrics": self.path(contract.DICTIONARY_METRICS, teacher=w.teacher),
                **self.teacher_model(w.teacher)}

    def _summarize_targets_inputs(self, w) -> dict:
        # Each shard's record, in the order of the shards and the validation targets (the parts).
        records = [self.path(contract.TARGET_PART_RECORD, teacher=w.teacher, part=part) for part in self.parts]
        return {"shards": self.target_shards(w.teacher),
                "validation": self.path(contract.TARGET_VALIDATION, teacher=w.teacher), "records": records}

    def _summarize_phase_targets_inputs(self, w) -> dict:
        parts = contract.phase_part_names(len(self.shards), int(w.length))
        return {"shards": self.phase_target_shards(w.teacher, int(w.length)),
                "records": [self.path(contract.TARGET_PART_RECORD, teacher=w.teacher, part=part) for part in parts]}

    def phase_target_shards(self, teacher: str, length: int) -> list[str]:
        return [self.path(contract.TARGET_PHASE_SHARD, teacher=teacher, length=length, shard=s) for s in self.shards]

    def phase_inputs(self, options: dict, teacher: str | None) -> dict:
        """The corpus (and, given the teacher, the targets) at the other lengths of a seq_len_schedule, length
        after length in the order of phase_lengths."""
        lengths = self.phase_lengths(options)
        if not lengths:
            return {}
        inputs = {"phase_shards": [self.path(contract.CORPUS_PHASE_SHARD, length=n, shard=s)
                                   for n in lengths for s in self.shards],
                  "phase_manifests": [self.path(contract.CORPUS_PHASE_MANIFEST, length=n) for n in lengths]}
        if teacher is not None:
            inputs["phase_target_shards"] = [p for n in lengths for p in self.phase_target_shards(teacher, n)]
            inputs["phase_target_manifests"] = [self.path(contract.TARGET_PHASE_MANIFEST, teacher=teacher, length=n)
                                                for n in lengths]
        return inputs

    def _pretrain_student_inputs(self, w) -> dict:
        """Corpus and validation split; for MLSM objectives the targets of both and their record, or with
        targets online the dictionary; a teacher the pipeline trained, with its record."""
        inputs = {"corpus_shards": self.corpus_shards(), "corpus_manifest": self.path(contract.CORPUS_MANIFEST),
                  "validation": self.path(contract.CORPUS_VALIDATION),
                  "token_counts": self.path(contract.CORPUS_TOKEN_COUNTS)}
        teacher = self.student_teacher(w.student)
        if self.online_targets(w.student):
            inputs["dictionary"] = self.path(contract.DICTIONARY, teacher=teacher)
            inputs["dictionary_metrics"] = self.path(contract.DICTIONARY_METRICS, teacher=teacher)
        elif objective(self.config["students"][w.student]["objective"]).targets:
            inputs["target_shards"] = self.target_shards(teacher)
            inputs["target_manifest"] = self.path(contract.TARGET_MANIFEST, teacher=teacher)
            inputs["validation_targets"] = self.path(contract.TARGET_VALIDATION, teacher=teacher)
        inputs.update(self.phase_inputs(self.student_options(w.student),
                                        teacher if self.precomputed_targets(w.student) else None))
        return {**inputs, **self.teacher_model(teacher)}

    def _finetune_inputs(self, w) -> dict:
        train, dev = task_files(self.config["tasks"][w.task])
        model = contract.STUDENT_MODEL if w.snapshot == "final" else contract.STUDENT_CHECKPOINTS
        return {"train": train, "dev": dev, "model": self.path(model, student=w.student),
                "model_summary": self.path(contract.STUDENT_SUMMARY, student=w.student)}

    def _report_inputs(self, w) -> dict:
        return {"scores": self.finetune_scores(),
                "students": [self.path(contract.STUDENT_SUMMARY, student=s) for s in self.students],
                "dictionaries": [self.path(contract.DICTIONARY_METRICS, teacher=t) for t in self.teachers],
                "atoms": [self.path(contract.DICTIONARY_ATOMS, teacher=t) for t in self.teachers],
                "targets": [self.path(contract.TARGET_MANIFEST, teacher=t) for t in self.teachers],
                "benchmarks": [self.benchmark(rule, **wildcards) for rule, wildcards in self.jobs()
                               if rule != "report"],
                "task_files": [path for task in self.tasks for path in task_files(self.config["tasks"][task])]}

    def finetuned_snapshots(self, student: str, task: str) -> list[str]:
        return cfg.finetuned_snapshots(self.config, student, task)

    def finetune_scores(self) -> list[str]:
        """Every fine-tuning run's scores: student x task x seed on the final model, and on the saved
        checkpoints for the finetune.checkpoint_tasks."""
        return [self.path(contract.FINETUNE_SCORES, **wildcards) for rule, wildcards in self.jobs()
                if rule == "finetune"]

    # ---- each rule's params: its stage's config slice and format version ----

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
        reading = {k: self.config["corpus"][k] for k in
                   ("format", "text_field", "validation_fraction", "bad_input", "max_line_bytes", "max_documents",
                    "seed")}
        return self._slice("train_tokenizer", reading, self.config["tokenizer_training"])

    def _shard_corpus_params(self, w) -> dict:
        # threads changes speed, never the shards; unknown_files lets a run through or stops it before any
        # job (what it skips is counted from the inputs): not params, so changing them reruns nothing.
        options = {k: v for k, v in self.config["corpus"].items() if k not in ("threads", "unknown_files")}
        return self._slice("shard_corpus", options, tokenizer=self.tokenizer)

    def _shard_corpus_phase_params(self, w) -> dict:
        options = {**self._shard_corpus_params(w), "max_seq_len": int(w.length)}
        return self._slice("shard_corpus_phase", options)

    def _pretrain_teacher_params(self, w) -> dict:
        options = {**self.config["teachers"][w.teacher]["auxiliary"], "objective": "mlm"}
        return self._slice("pretrain_teacher", options, student=f"auxiliary teacher {w.teacher}", device=self.device)

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
            return self._slice("pretrain_student", kept, student=student, device=self.device)
        extra = {"student": student, "device": self.device}
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

    # ---- the jobs a config makes ----

    def jobs(self) -> list[tuple[str, dict]]:
        """(rule, wildcards) of every job of the DAG, in the order the stages run."""
        jobs = [("bbc_news_data", {})] if self.uses_demo_data() else []
        jobs += [("train_tokenizer", {})] if self.trained_tokenizer else []
        jobs.append(("shard_corpus", {}))
        jobs += [("shard_corpus_phase", {"length": str(n)}) for n in self.extra_lengths()]
        jobs += [("pretrain_teacher", {"teacher": t}) for t in self.auxiliary_teachers()]
        for teacher in self.teachers:
            jobs += [("extract_activations", {"teacher": teacher}), ("fit_dictionary", {"teacher": teacher})]
            jobs += [("precompute_targets", {"teacher": teacher, "part": part}) for part in self.parts]
            jobs.append(("summarize_targets", {"teacher": teacher}))
            for n in self.target_lengths(teacher):
                jobs += [("precompute_targets", {"teacher": teacher, "part": part})
                         for part in contract.phase_part_names(len(self.shards), n)]
                jobs.append(("summarize_phase_targets", {"teacher": teacher, "length": str(n)}))
        jobs += [("pretrain_student", {"student": s}) for s in self.students]
        jobs += [("finetune", {"student": s, "snapshot": c, "task": t, "seed": str(seed)})
                 for s in self.students for t in self.tasks for c in self.finetuned_snapshots(s, t)
                 for seed in self.seeds]
        return jobs + [("report", {})]

    def uses_demo_data(self) -> bool:
        """Whether the DAG reads the demo data: a corpus input or a task lies under its directory."""
        if not self.config["demo_data"]["bbc_news"]["enabled"]:
            return False
        made = {f"{BBC_DIR}/{p}" for p in RULES["bbc_news_data"].outputs.values()}
        read = set(self.corpus_inputs()) | {f for t in self.config["tasks"].values() for f in task_files(t)}
        return bool(made & read)

    def phase_lengths(self, options: dict) -> list[int]:
        """The lengths of a trainee's seq_len_schedule other than corpus.max_seq_len, in order of first use."""
        return cfg.phase_lengths(options, self.config["corpus"]["max_seq_len"])

    def precomputed_targets(self, student: str) -> bool:
        return objective(self.config["students"][student]["objective"]).targets and not self.online_targets(student)

    def extra_lengths(self) -> list[int]:
        """The lengths the corpus is also packed at (shard_corpus_phase): those some trainee's schedule uses."""
        trainees = [self.student_options(s) for s in self.students]
        trainees += [self.config["teachers"][t]["auxiliary"] for t in self.auxiliary_teachers()]
        return sorted({n for options in trainees for n in self.phase_lengths(options)})

    def target_lengths(self, teacher: str) -> list[int]:
        """The other lengths at which a teacher's targets are computed: those of its MLSM students' schedules."""
        return sorted({n for s in self.students if self.student_teacher(s) == teacher and self.precomputed_targets(s)
                       for n in self.phase_lengths(self.student_options(s))})

    def auxiliary_teachers(self) -> list[str]:
        """Auxiliary teachers some job reads: an MLSM student's (its activations) or a KD student's."""
        used = {self.student_teacher(s) for s in self.students} - {None}
        return sorted(t for t in used if self.is_auxiliary(t))
