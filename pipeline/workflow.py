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
from .hfdata import DatasetInput
from .launch import torchrun_command
from .objectives import objective
from .rules import RULES, fill
from .slices import Slices
from .slurm import job_threads
from .stages import STAGES
from .tasks import task_files
from .text import input_files

BBC_DIR = contract.BBC_DIR


class Workflow(Slices):
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
        """The corpus files (and local dataset directories) Snakemake tracks. Missing files stay in the list,
        so that Snakemake names them as missing input (preflight.check_inputs has stopped the run before,
        unless a rule writes them); a hub dataset is no file, its name is in the params."""
        tracked = []
        for item in self._corpus_items():
            if not isinstance(item, DatasetInput):
                tracked.append(str(item))
            elif item.local is not None:
                tracked.append(str(item.local))
        return tracked

    def arguments(self, port: str) -> list[str]:
        """What the command gets for a verbatim port: the corpus inputs in order, datasets as hf:<name>."""
        assert port == "text", port
        return [str(f) for f in self._corpus_items()]

    def _corpus_items(self) -> list:
        corpus = self.config["corpus"]
        return input_files(corpus["inputs"], strict=False, unknown_files=corpus["unknown_files"])

    def has_datasets(self) -> bool:
        return any(isinstance(f, DatasetInput) for f in self._corpus_items())

    def hub_datasets(self) -> list[str]:
        """Ids of the hub datasets among the corpus inputs (a model card names them)."""
        return [f.name for f in self._corpus_items() if isinstance(f, DatasetInput) and f.local is None]

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

    def threads(self, rule: str, wildcards) -> int:
        """The job's threads (`threads:` of its rule; Snakemake sets OMP_NUM_THREADS and the like from them): the
        corpus stage's processes, two for the learners that overlap reading and computing, and for the jobs of
        the model stages one per process, two per GPU with CUDA (the process and its loader thread)."""
        if rule in ("shard_corpus", "shard_corpus_phase"):
            return self.config["corpus"]["threads"]
        if rule in ("extract_activations", "fit_dictionary"):
            return 2
        if rule in ("pretrain_student", "pretrain_teacher", "precompute_targets", "finetune"):
            return job_threads(self.gpus(rule, wildcards), int(self.device == "cuda"))
        return 1

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
        imported = self.config["teachers"][w.teacher].get("activations")  # states computed elsewhere (HDF5)
        return {"corpus_shards": self.corpus_shards(), "corpus_manifest": self.path(contract.CORPUS_MANIFEST),
                "token_counts": self.path(contract.CORPUS_TOKEN_COUNTS), **self.teacher_model(w.teacher),
                **({"states": imported} if imported else {})}

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
            inputs["dictionary_metrics"] = self.path(contract.DICTIONARY_METRICS, teacher=teacher)  # model card
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
