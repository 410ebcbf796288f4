"""One config's workflow: its names and paths, and the helpers the rules' declarations share
(pipeline/wiring/<stage>.py declares each rule: its jobs, inputs, config slice, threads, resources and cost).
The Snakemake rules (workflow/rules/pipeline.smk) ask this class for every job's inputs, outputs and params,
and the tests, the cost plan and the repair list its jobs from it, so that a rule is declared once.

Each job's params are its rule's config slice and its stage's format version, and nothing else: changing a key
reruns exactly the jobs whose slice holds it (tests/test_wiring.py checks it key by key). Nothing here imports
torch or pyarrow: Snakemake reads it at every parse, also in every cluster job.
"""

from __future__ import annotations

from functools import cached_property

from .. import ablation
from .. import config as cfg
from ..data import contract
from ..data.hfdata import DatasetInput
from ..data.tasks import task_files
from ..data.text import input_files
from ..launch import torchrun_command
from ..objectives import objective
from ..slurm import job_threads
from . import RULES, fill
from .slices import Slices

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
        self.teachers = cfg.teachers_in_use(config)  # teachers whose activations run
        self.codings = ablation.codings_in_use(config)  # their dictionaries whose targets some student learns
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
        declared, out = RULES[rule], {}
        for port, template in declared.outputs.items():
            if port in declared.when and not declared.when[port](self):
                continue
            if declared.beside_results:
                out[port] = template
            elif declared.stage.port(port).many:
                out[port] = [self.path(template, shard=s) for s in self.shards]
            else:
                out[port] = self.path(template)
        return out

    def logs(self, rule: str) -> dict:
        return {"main": self.log(rule), **{port: self.path(t) for port, t in RULES[rule].logs.items()}}

    # ---- names ----

    def corpus_shards(self) -> list[str]:
        return [self.path(contract.CORPUS_SHARD, shard=s) for s in self.shards]

    def target_shards(self, coding: str) -> list[str]:
        return [self.path(contract.TARGET_SHARD, dictionary=coding, shard=s) for s in self.shards]

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

    def student_coding(self, student: str) -> str | None:
        """The dictionary (a teacher's, or one of its variants) whose targets an MLSM student learns."""
        return ablation.student_coding(self.config, student)

    def coding(self, name: str) -> tuple[str, dict, dict]:
        """(teacher, dictionary section, targets section) of a dictionary: a variant's keys over the sections."""
        return ablation.coding_sections(self.config, name)

    @cached_property
    def budget_chain(self) -> dict[str, str]:
        """Student -> the shorter budget's student whose final state it continues (ablation.budget_chain)."""
        return ablation.budget_chain(self.config, self.student_options)

    def coding_teacher(self, name: str) -> str:
        return ablation.coding_parts(name)[0]

    def online_targets(self, student: str) -> bool:
        """Whether the student makes its MLSM targets in the step (from the dictionary) instead of reading them."""
        options = self.student_options(student)
        return objective(options["objective"]).targets and options["targets"] == "online"

    def trainee(self, rule: str, wildcards) -> dict:
        """The options of a pre-training job's trainee (the student, or the auxiliary teacher); {} for other rules."""
        if RULES[rule].gpus_key == "student":
            return self.student_options(wildcards.student)
        if RULES[rule].gpus_key == "teacher":
            return self.config["teachers"][wildcards.teacher]["auxiliary"]
        return {}

    def gpus(self, rule: str, wildcards) -> int:
        """Processes (torchrun) per node of a job: its trainee's `gpus`, else 1."""
        return self.trainee(rule, wildcards).get("gpus", 1)

    def nodes(self, rule: str, wildcards) -> int:
        """Nodes of a job (SLURM): its trainee's `nodes`, else 1."""
        return self.trainee(rule, wildcards).get("nodes", 1)

    def multi_node(self) -> dict[str, tuple[int, int]]:
        """The trainees that span several nodes: their `nodes` key ('students.<s>.nodes') -> (nodes, processes
        per node)."""
        trainees = {f"students.{s}.nodes": self.student_options(s) for s in self.students}
        trainees.update({f"teachers.{t}.auxiliary.nodes": self.config["teachers"][t]["auxiliary"]
                         for t in self.auxiliary_teachers()})
        return {key: (o["nodes"], o["gpus"]) for key, o in trainees.items() if o.get("nodes", 1) > 1}

    def submissions(self) -> int:
        """How many jobs a cluster executor submits: one per job of a rule that is not local, where a rule packs
        its jobs (Rule.group) one per group of at most its size."""
        from collections import Counter
        from math import ceil

        single, groups = 0, Counter()
        for rule, wildcards in self.jobs():
            declared = RULES[rule]
            if declared.resources.local:
                continue
            if declared.group is not None and declared.group[1](self.config) > 1:
                groups[rule, fill(declared.group[0], **wildcards)] += 1
            else:
                single += 1
        return single + sum(ceil(n / RULES[rule].group[1](self.config)) for (rule, _), n in groups.items())

    def launcher(self, rule: str, wildcards) -> str:
        return torchrun_command(self.gpus(rule, wildcards), self.nodes(rule, wildcards))

    def threads(self, rule: str, wildcards) -> int:
        """The job's threads (its rule's declaration; Snakemake sets OMP_NUM_THREADS and the like from them)."""
        return RULES[rule].job_threads(self, wildcards)

    def gpu_requests(self) -> int:
        """GPUs a GPU rule's job asks for per process: 1 with device cuda, and with auto where this machine's
        driver shows a GPU (a workstation); 0 on the CPU."""
        from ..common import nvidia_gpus

        return int(self.device == "cuda" or (self.device == "auto" and nvidia_gpus() > 0))

    def process_threads(self, processes: int) -> int:
        """Threads of a job of a model stage: one per process, two per GPU with CUDA (the process and its
        loader thread)."""
        return job_threads(processes, self.gpu_requests())

    # ---- what the rules' inputs share ----

    def inputs(self, rule: str, wildcards) -> dict:
        """Port -> path(s) of one job (its rule's declaration)."""
        return RULES[rule].inputs(self, wildcards)

    def teacher_model(self, teacher: str | None) -> dict:
        """The auxiliary teacher's model and record, which a job using the teacher reads."""
        if teacher is None or not self.is_auxiliary(teacher):
            return {}
        return {"teacher_model": self.path(contract.AUXILIARY_TEACHER, teacher=teacher),
                "teacher_summary": self.path(contract.AUXILIARY_SUMMARY, teacher=teacher)}

    def phase_target_shards(self, coding: str, length: int) -> list[str]:
        return [self.path(contract.TARGET_PHASE_SHARD, dictionary=coding, length=length, shard=s) for s in self.shards]

    def phase_inputs(self, options: dict, coding: str | None) -> dict:
        """The corpus (and, given a dictionary, its targets) at the other lengths of a seq_len_schedule, length
        after length in the order of phase_lengths."""
        lengths = self.phase_lengths(options)
        if not lengths:
            return {}
        inputs = {"phase_shards": [self.path(contract.CORPUS_PHASE_SHARD, length=n, shard=s)
                                   for n in lengths for s in self.shards],
                  "phase_manifests": [self.path(contract.CORPUS_PHASE_MANIFEST, length=n) for n in lengths]}
        if coding is not None:
            inputs["phase_target_shards"] = [p for n in lengths for p in self.phase_target_shards(coding, n)]
            inputs["phase_target_manifests"] = [self.path(contract.TARGET_PHASE_MANIFEST, dictionary=coding, length=n)
                                                for n in lengths]
        return inputs

    def finetuned_snapshots(self, student: str, task: str) -> list[str]:
        return cfg.finetuned_snapshots(self.config, student, task)

    def finetune_scores(self) -> list[str]:
        """Every fine-tuning run's scores: student x task x seed on the final model, and on the saved
        checkpoints for the finetune.checkpoint_tasks."""
        return [self.path(contract.FINETUNE_SCORES, **wildcards) for rule, wildcards in self.jobs()
                if rule == "finetune"]

    # ---- the jobs a config makes ----

    def jobs(self) -> list[tuple[str, dict]]:
        """(rule, wildcards) of every job of the DAG, rule after rule in the order the stages run."""
        return [(name, wildcards) for name, rule in RULES.items() if rule.enabled(self.config)
                for wildcards in rule.jobs(self)]

    def final_outputs(self) -> list[str]:
        """The outputs the workflow's target asks for besides the report's: those of rules declared final."""
        return [fill(path, **wildcards) for rule, wildcards in self.jobs() if RULES[rule].final
                for value in self.outputs(rule).values() for path in (value if isinstance(value, list) else [value])]

    def uses_demo_data(self) -> bool:
        """Whether the DAG reads the demo data: a corpus input or a task lies under its directory."""
        if not self.config["demo_data"]["bbc_news"]["enabled"]:
            return False
        made = set(RULES["bbc_news_data"].outputs.values())
        read = set(self.corpus_inputs()) | {f for t in self.config["tasks"].values()
                                            for train, devs in [task_files(t)] for f in (train, *devs)}
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

    def target_lengths(self, coding: str) -> list[int]:
        """The other lengths at which a dictionary's targets are computed: those of its MLSM students' schedules."""
        return sorted({n for s in self.students if self.student_coding(s) == coding and self.precomputed_targets(s)
                       for n in self.phase_lengths(self.student_options(s))})

    def auxiliary_teachers(self) -> list[str]:
        """Auxiliary teachers some job reads: an MLSM student's (its activations) or a KD student's."""
        used = {self.student_teacher(s) for s in self.students} - {None}
        return sorted(t for t in used if self.is_auxiliary(t))
