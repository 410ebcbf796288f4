"""What a config will cost, before anything runs: every stage's disk use and compute time on a hardware
class, and the total.

    python -m pipeline.plan --configfile config/config.yaml                  # on this machine (CPU, or its GPU)
    python -m pipeline.plan --configfile config/paper.yaml --hardware h100 --corpus-tokens 3e9
    python -m pipeline.plan --configfile config/config.yaml --check results  # predicted / actual, after a run

The jobs are the workflow's own (pipeline/wiring/workflow.py: Workflow.jobs). Their sizes come from the config
and its inputs (pipeline/plan_inputs.py: the corpus sampled and packed by the corpus stage's code, the
tasks' examples); their speeds from pipeline/plan_rates.py: measured here with the pipeline's code at the
config's shapes, or, for a GPU class this machine lacks, recorded benchmark rates (--bench) or the
assumptions it prints. Compute time is the sum of the jobs' wall times (what Snakemake's benchmark files
record); GPU time is that times the GPUs a job holds with device cuda. Bytes per token on disk were
measured on the demo's outputs (BYTES). With --check, the outputs and benchmark files of a finished run
of the same config give the actual figures and the ratio predicted / actual of each stage.
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from . import config as cfg
from . import plan_inputs, plan_rates
from .common import StageError
from .objectives import objective
from .wiring import RULES
from .wiring.workflow import Workflow

# Bytes on disk, measured on the demo's outputs (make demo; MiniLM vocabulary, BBC News text).
BYTES = {"corpus_per_token": 1.9, "store_per_value": 1.84, "store_per_row": 14, "target_per_atom": 2.4,
         "tokenizer": 0.7e6, "record": 2e3, "report": 1e5}
# A record's files hashed (sha256) on one core: measured 1.4 GB/s with pipeline.data.integrity.sha256_file on a
# 200 MB file (this project's 2-core CI machine); the disk's read rate, assumed (an NVMe drive), caps the threads.
HASH_BYTES_PER_SECOND, DISK_READ_BYTES_PER_SECOND = 1.0e9, 2.0e9
COPY_BYTES_PER_SECOND = 200e6  # HDF5 states imported into the zarr store
TOKENIZER_TRAINING_BYTES_PER_SECOND = 1e6  # train_tokenizer (assumed: the plan does not train one)
FORWARD_SHARE_OF_STEP = 1 / 3  # a forward pass costs about a third of a training step
REPORT_SECONDS = 0.5  # tables and two plots
SPECIALS = {"sentence_pairs": 2.5, "contiguous": 2, "reference_pairs": 3}  # special tokens per sequence (mean)
ASSUMED_NONZEROS = 90  # atoms of a whole code (targets.top_k: none): ~90 at K = 3000 on real MiniLM states
EARLY_STOP = 0.5  # share of the dictionary's epochs assumed run before the held-out objective stalls
SUBSAMPLE_KEEP = {"none": 1.0, "w2v": 0.5, "drop": 0.6}  # assumed share of eligible tokens kept
SHARD_THREADS_MIN_BYTES = 2 * (1 << 20) // 4  # below this the corpus stage uses one process (pipeline/corpus.py)


@dataclass
class Cost:
    rule: str
    jobs: int = 0
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    disk: float = 0.0
    cpu_seconds: float = 0.0  # of a finished run: its jobs' CPU time over the threads each had
    timed: int = 0  # of a finished run: its jobs with a benchmark file


class Planner:
    """Each job's seconds and bytes for one validated config."""

    def __init__(self, config: dict, rates, cores: int, corpus_tokens: float | None = None):
        from .models import load_tokenizer

        self.config, self.rates, self.cores = config, rates, cores
        self.workflow = Workflow(config)
        self.demo = plan_inputs.DemoData(config)
        tokenizer_source = config["corpus"]["tokenizer"]
        self.tokenizer = load_tokenizer(plan_inputs.STAND_IN_TOKENIZER if tokenizer_source == cfg.TRAINED_TOKENIZER
                                        else tokenizer_source)
        self.vocab = len(self.tokenizer)
        self.corpus = plan_inputs.corpus(config, self.demo, corpus_tokens)
        self.length = round(self.corpus.mean_length)
        self.tasks = {name: plan_inputs.task(task, self.demo, config["finetune"], self.tokenizer)
                      for name, task in config["tasks"].items()}
        self.gpu = config["device"] == "cuda" or (config["device"] == "auto" and rates.name != "cpu")

    def costs(self) -> list[Cost]:
        """Each rule's jobs costed by its declaration (pipeline/wiring/<stage>.py: cost)."""
        by_rule: dict[str, Cost] = {}
        for rule, wildcards in self.workflow.jobs():
            seconds, disk, gpus = RULES[rule].cost(self, SimpleNamespace(**wildcards))
            cost = by_rule.setdefault(rule, Cost(rule))
            cost.jobs += 1
            cost.seconds += seconds
            cost.gpu_seconds += seconds * gpus if self.gpu else 0.0
            cost.disk += disk
        return list(by_rule.values())

    # ---- what the rules' costs share (each rule's own: pipeline/wiring/<stage>.py) ----

    @property
    def corpus_rate(self) -> float:
        return self.rates.tokenize_bytes_per_second(self.corpus.pack_bytes_per_second)

    def teacher(self, name: str, threads: int) -> tuple[float, float]:
        """(load seconds, forward tokens/s) of a teacher up to its layer."""
        teacher = self.config["teachers"][name]
        source = self.workflow.teacher_source(name) if not self.workflow.is_auxiliary(name) else None
        if source is None:  # trained by the pipeline: not there yet; a student of its size stands in
            options = teacher["auxiliary"]
            step = self.rates.training(self.key(options), "mlm", 0, self.length, self.vocab, threads)
            return 0.0, step / FORWARD_SHARE_OF_STEP
        return self.rates.teacher(source, teacher["layer"], min(teacher["batch_size"], 32), self.length, threads,
                                  teacher["trust_remote_code"])

    def hidden(self, name: str) -> int:
        teacher = self.config["teachers"][name]
        if self.workflow.is_auxiliary(name):
            from .pretrain.model import PRESETS

            return PRESETS[teacher["auxiliary"]["size"]]["hidden_size"]
        from .models import model_hidden_size

        return model_hidden_size(teacher["source"], teacher["trust_remote_code"])

    @staticmethod
    def solver(settings: dict, lambda_: float) -> dict:
        return {**{k: settings[k] for k in cfg.SOLVER_KEYS}, "lambda": lambda_}

    def pretraining(self, options: dict, name: str, teacher: str | None, coding: str | None = None):
        """A trainee's job; `coding` names the dictionary an MLSM objective's targets come from."""
        dictionary, targets = self.workflow.coding(coding)[1:] if coding else (None, None)
        atoms = dictionary["atoms"] if dictionary else None
        gpus = options["gpus"] * options.get("nodes", 1)  # the processes of all nodes (the world size)
        tokens = options["max_steps"] * options["batch_size"] * options["grad_accumulation"] * gpus * self.length
        rate = self.rates.training(self.key(options), name, atoms, self.length, self.vocab, 1) * gpus
        seconds = tokens / rate
        if "kd" in objective(name).losses or (atoms and options["targets"] == "online"):
            seconds += tokens / (self.teacher(teacher, 1)[1] * gpus)  # the teacher's forward in every step
        if atoms and options["targets"] == "online":
            solver = cfg.REFERENCE_SOLVER if options["online_solver"] == "reference" else targets
            masked = tokens * options["mask_fraction"]
            settings = self.key(self.solver(solver, dictionary["lambda"]))
            seconds += masked / (self.rates.lasso(self.hidden(teacher), atoms, settings, 1) * gpus)
        saves = 1 + len(cfg.checkpoint_steps(options))
        return self.rates.startup(True) + seconds, saves * self.model_bytes(options["size"], name, atoms), gpus

    def model_bytes(self, size: str, name: str, atoms: int | None) -> float:
        from .pretrain.model import PRESETS

        shape = PRESETS[size]
        h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        params = (self.vocab + 514) * h + layers * (4 * h * h + 2 * h * i + 9 * h + i)
        params += (h * h + self.vocab if objective(name).mlm_head else 0) + (h * h + h * atoms if atoms else 0)
        return params * 4 + BYTES["tokenizer"]

    @staticmethod
    def key(options: dict) -> tuple:
        """Options as a hashable key (the rates cache their measurements by it)."""
        return tuple(sorted((k, v) for k, v in options.items() if not isinstance(v, (list, dict))))


def specials(packing: str) -> float:
    """Special tokens per packed sequence (mean) of a packing."""
    return SPECIALS[packing]


def stored_atoms(dictionary: dict, targets: dict) -> float:
    """Atoms stored per token in a coding's target shards: top_k, or with the whole code its assumed non-zeros."""
    top_k = targets["top_k"]
    return min(dictionary["atoms"], ASSUMED_NONZEROS) if top_k == "none" else top_k


def actual_costs(config: dict, results: Path, cores: int) -> dict[str, Cost]:
    """Seconds (benchmark files: the last run of each job) and bytes of the outputs of a finished run whose
    results directory is `results` (paths outside it, as the demo data's, are read beside it)."""
    from .wiring import fill

    workflow = Workflow(config)
    workdir = results.parent if not Path(workflow.results).is_absolute() else Path("/")
    by_rule: dict[str, Cost] = {}
    for rule, wildcards in workflow.jobs():
        cost = by_rule.setdefault(rule, Cost(rule))
        cost.jobs += 1
        benchmark = results / Path(workflow.benchmark(rule, **wildcards)).relative_to(workflow.results)
        rows = list(csv.DictReader(benchmark.open(), delimiter="\t")) if benchmark.is_file() else []
        if rows:
            cost.timed += 1
            cost.seconds += float(rows[-1]["s"])
            threads = min(workflow.threads(rule, SimpleNamespace(**wildcards)), cores)  # the job had these
            cost.cpu_seconds += float(rows[-1]["cpu_time"]) / threads
        for value in workflow.outputs(rule).values():
            for path in value if isinstance(value, list) else [value]:
                path = fill(path, **wildcards)
                inside = path.startswith(workflow.results + "/")
                cost.disk += _bytes(results / Path(path).relative_to(workflow.results) if inside else workdir / path)
    return by_rule


def _bytes(path: Path) -> float:
    if path.is_dir():
        return float(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    return float(path.stat().st_size) if path.is_file() else 0.0


def human_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return ""


def human_seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:,.1f} h"


def render(config_path: str, planner: Planner, costs: list[Cost]) -> str:
    corpus = planner.corpus
    lines = [f"# Plan of {config_path}", "",
             f"Hardware: {planner.rates.basis}.",
             f"Corpus: {corpus.basis}: {corpus.tokens:,.0f} training tokens in {corpus.sequences:,.0f} sequences "
             f"({corpus.mean_length:.0f} tokens each), {corpus.validation_tokens:,.0f} held out.",
             *(["Measured: " + "; ".join(f"{k} {v}" for k, v in planner.rates.figures.items()) + "."]
               if planner.rates.figures else []),
             "Tasks: " + ", ".join(f"{name} {t.train:,} train / {t.dev:,} dev examples of {t.length:.0f} tokens"
                                   for name, t in planner.tasks.items()) + ".", "",
             "| rule | jobs | disk | compute (all jobs) | per job | GPU hours |", "|---|---:|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c.rule} | {c.jobs} | {human_bytes(c.disk)} | {human_seconds(c.seconds)} | "
                     f"{human_seconds(c.seconds / c.jobs)} | {c.gpu_seconds / 3600:,.2f} |")
    total = Cost("total", sum(c.jobs for c in costs), sum(c.seconds for c in costs),
                 sum(c.gpu_seconds for c in costs), sum(c.disk for c in costs))
    lines.append(f"| **total** | {total.jobs} | {human_bytes(total.disk)} | {human_seconds(total.seconds)} | | "
                 f"{total.gpu_seconds / 3600:,.2f} |")
    lines += ablation_lines(planner) + submission_lines(planner, costs)
    lines += ["", "Compute is the sum of the jobs' wall times (jobs run side by side as cores and GPUs allow); disk "
              "is the outputs (resumable state and logs aside). Assumed where not measured: bytes per token "
              f"{BYTES}, share of the dictionary's epochs run {EARLY_STOP}, subsampling keeps {SUBSAMPLE_KEEP}."]
    return "\n".join(lines)


def submission_lines(planner: Planner, costs: list[Cost]) -> list[str]:
    """On SLURM: the jobs submitted (all but the local rules), and the trainees that span nodes."""
    local = {name for name, rule in RULES.items() if rule.resources.local}
    submitted, jobs = planner.workflow.submissions(), sum(c.jobs for c in costs if c.rule not in local)
    packed = "" if submitted == jobs else f" ({jobs} jobs, packed by finetune.pack)"
    lines = ["", f"On SLURM (profiles/slurm): {submitted} submissions{packed}: every job but those of "
             f"{', '.join(sorted(local & {c.rule for c in costs}))}, which run on the submitting host."]
    wide = planner.workflow.multi_node()
    if wide:
        shown = [f"{key.removesuffix('.nodes')}: {nodes} nodes x {gpus} GPUs" for key, (nodes, gpus) in wide.items()]
        lines.append("Several nodes: " + "; ".join(shown) + ".")
    return lines


def ablation_lines(planner: Planner) -> list[str]:
    """The dictionaries besides the teachers' own, and each grid's students with their pre-training cost."""
    from . import ablation

    lines = []
    codings = planner.workflow.codings
    if any(ablation.coding_parts(c)[1] for c in codings):
        shown = [f"{c} (K {planner.workflow.coding(c)[1]['atoms']}, lambda {planner.workflow.coding(c)[1]['lambda']})"
                 for c in codings]
        lines += ["", f"Dictionaries, each with its own fit_dictionary and targets jobs: {', '.join(shown)}."]
    for name, grid in (planner.config.get("grids") or {}).items():
        students = ablation.grid_students(name, grid)
        seconds = {s: RULES["pretrain_student"].cost(planner, SimpleNamespace(student=s))[0] for s in students}
        shape = " x ".join(f"{k} {len(v)}" for k, v in grid["sweep"].items())
        total = human_seconds(sum(seconds.values()))
        each = ", ".join(f"{s} ({human_seconds(t)})" for s, t in seconds.items())
        lines += ["", f"Grid {name}: {len(students)} students ({shape}), pre-training {total} in all: {each}."]
    return lines


def render_check(costs: list[Cost], actual: dict[str, Cost]) -> str:
    """Predicted against actual: wall time (what the benchmark files record, slowed by whatever else the
    machine ran), CPU time over the job's threads (what a quiet machine would take) and disk."""
    lines = ["", "## Predicted / actual", "",
             "| rule | predicted | actual wall | ratio | actual CPU time / threads | ratio | predicted disk | "
             "actual disk | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals = [Cost("total", 0, sum(c.seconds for c in costs), 0, sum(c.disk for c in costs))]
    actual = {**actual, "total": Cost("total", 0, sum(a.seconds for a in actual.values()), 0,
                                      sum(a.disk for a in actual.values()),
                                      sum(a.cpu_seconds for a in actual.values()))}
    for c in [*costs, *totals]:
        real = actual[c.rule]
        lines.append(f"| {c.rule} | {human_seconds(c.seconds)} | {human_seconds(real.seconds)} | "
                     f"{_ratio(c.seconds, real.seconds)} | {human_seconds(real.cpu_seconds)} | "
                     f"{_ratio(c.seconds, real.cpu_seconds)} | {human_bytes(c.disk)} | {human_bytes(real.disk)} | "
                     f"{_ratio(c.disk, real.disk)} |")
    untimed = [f"{a.rule} ({a.jobs - a.timed} of {a.jobs})" for a in actual.values() if a.timed < a.jobs]
    if untimed:  # not run, or run by a version that named its benchmark files otherwise
        lines += ["", "Jobs without a benchmark file, so missing from the actual time: " + ", ".join(untimed) + "."]
    total = actual["total"]
    if total.seconds > 0:
        lines += ["", f"The run's jobs were on a CPU {total.cpu_seconds / total.seconds:.0%} of their wall time (CPU "
                  "time over threads): what is left they waited for other processes, so a wall-time ratio below "
                  "the CPU-time ratio by that much is the machine's load, not the plan."]
    return "\n".join(lines)


def _ratio(predicted: float, actual: float) -> str:
    return f"{predicted / actual:.2f}" if actual > 0 else "–"


def quiet() -> None:
    """Loading the models the plan measures with prints nothing."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("pipeline").setLevel(logging.WARNING)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.splitlines()[0])
    p.add_argument("--configfile", required=True, help="the config (relative paths in it: from this directory)")
    p.add_argument("--hardware", default="auto", choices=["auto", "cpu", "cuda", *plan_rates.GPU_CLASSES],
                   help="auto: this machine's GPU if torch sees one, else its CPU (both measured); a GPU class: "
                        "recorded benchmark rates (--bench) or the printed assumptions")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores the run gets")
    p.add_argument("--bench", help="the JSON of a benchmark run on that GPU class (make bench)")
    p.add_argument("--corpus-tokens", type=float, help="the corpus' tokens, where its inputs cannot be sized")
    p.add_argument("--check", type=Path, help="the results directory of a finished run of this config")
    args = p.parse_args(argv)
    quiet()
    try:
        config = cfg.validate(cfg.load_yaml(args.configfile))
        hardware = args.hardware
        if hardware == "auto":
            import torch

            hardware = "cuda" if torch.cuda.is_available() and config["device"] != "cpu" else "cpu"
        planner = Planner(config, plan_rates.rates_for(hardware, args.bench), args.cores, args.corpus_tokens)
        costs = planner.costs()
        text = render(args.configfile, planner, costs)
        if args.check:
            text += "\n" + render_check(costs, actual_costs(config, args.check, args.cores))
    except (cfg.ConfigError, StageError) as err:
        raise SystemExit(f"error: {err}") from None
    print(text)


if __name__ == "__main__":
    main()
