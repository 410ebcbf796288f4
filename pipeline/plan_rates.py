"""How fast each kind of work runs on a hardware class, for pipeline/plan.py.

- `Measured`: on this machine (its CPU, or the GPU torch sees), each kind of work is timed for a moment
  with the pipeline's own code at the config's shapes and the threads the rule gets: a process start
  with the stage's imports, the teacher's forward pass up to its layer, the lasso solver, a
  dictionary-learning mini-batch, a student's training step (model, heads and losses of its objective)
  and a fine-tuning step.
- `Assumed`: a GPU class this machine does not have (h100, h200, a100, l40s, a10): FLOPs of the config's
  shapes at an assumed fraction of the GPU's dense bf16 peak (ASSUMPTIONS, printed with the plan), or
  at the rates a recorded benchmark run measured on that class (`bench`: the JSON of `make bench`, one
  object per benchmark script: pretrain.stage, extraction.large_corpus.stage_tokens_per_s and
  targets.stage_fast tokens/s at those scripts' default shapes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

from .objectives import objective as objective_named

# Assumptions for a GPU class that is not measured (fractions of the dense bf16 peak, seconds).
ASSUMPTIONS = {
    "training_mfu": {"tiny": 0.02, "small": 0.06, "medium": 0.2, "base": 0.3},  # small shapes cannot fill a GPU
    "inference_mfu": 0.35,
    "lasso_fraction_of_peak": 0.05,  # fp32 products of the solver, batched per token
    "lasso_iterations": {"fast": 40, "fista": None},  # fista: its max_iterations
    "startup_seconds": 25.0,  # interpreter, imports, CUDA context, model load
    "tokenize_mb_per_s": 1.5,  # per process, on the host CPU
}
GPU_CLASSES = {"h100": "H100", "h200": "H200", "a100": "A100", "l40s": "L40S", "a10": "A10"}
MEASURE_SECONDS = 1.0  # per measured kind of work (after a warm-up)
PARALLEL_EFFICIENCY = 0.8  # speed-up each thread after the first adds to a job's work on a CPU (assumed)
# Lasso iterations a mini-batch of dictionary learning takes on average (the demo's fit: about 12 to its
# 5e-2 duality gap; its first mini-batches take more).
DICTIONARY_CODE_ITERATIONS = 12


def bert_forward_flops(layers: int, hidden: int, intermediate: int, seq_len: float) -> float:
    """Forward FLOPs per token of a BERT encoder (weights and attention)."""
    return layers * (2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * hidden * seq_len)


class Clock:
    """Seconds of work. On a CPU: the process' CPU time on one thread, divided by the speed-up of the job's
    threads (PARALLEL_EFFICIENCY each after the first). CPU time is what a quiet machine would take: other
    processes on a shared machine do not inflate it, as they inflate wall time and the CPU time of several
    threads (which spin while they wait for each other). On a GPU: wall time."""

    def __init__(self, threads: int, gpu: bool):
        self.gpu = gpu
        self.speedup = 1.0 if gpu else 1.0 + PARALLEL_EFFICIENCY * (max(1, threads) - 1)

    def now(self) -> float:
        return time.perf_counter() if self.gpu else time.process_time() / self.speedup

    def per_call(self, step) -> float:
        """Seconds per call of `step`, after one warm-up call (calls for about MEASURE_SECONDS)."""
        step()
        calls, started, wall = 0, self.now(), time.perf_counter()
        while True:
            step()
            calls += 1
            if time.perf_counter() - wall >= MEASURE_SECONDS or calls >= 50:
                return (self.now() - started) / calls


class Measured:
    """Rates measured on this machine."""

    def __init__(self, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.basis = f"measured on this machine ({self.name}, {os.cpu_count()} CPUs; CPU time over threads)"
        self.figures: dict[str, str] = {}  # what was measured, for the plan's reader

    def _threads(self, threads: int) -> Clock:
        import torch

        torch.set_num_threads(1)  # timed on one thread, scaled to the job's threads by the clock
        return Clock(threads, self.device.type == "cuda")

    @cache  # noqa: B019 (one measurement per plan)
    def startup(self, heavy: bool) -> float:
        """Seconds a job's process takes to start: the interpreter and the stage's imports."""
        # What the torch stages import between them (metrics, parquet, models) or what the light ones do.
        imports = ("import torch, transformers, scipy.stats, sklearn.metrics, pyarrow.parquet, pipeline.models"
                   if heavy else "import pyarrow, pipeline.cli")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", imports], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        seconds = min(time.perf_counter() - started, cpu)  # CPU time: what a quiet machine would take
        self.figures[f"start-up{' with torch' if heavy else ''}"] = f"{seconds:.1f} s"
        return seconds

    def tokenize_bytes_per_second(self, measured: float) -> float:
        return measured  # the corpus sample was packed by the stage's code (plan_inputs)

    @cache  # noqa: B019
    def teacher(self, source: str, layer: int, batch: int, length: int, threads: int, trust: bool) -> tuple:
        """(seconds to load, forward tokens/s) of a teacher cut after its layer."""
        import torch

        from .models import load_encoder
        from .training import autocast

        clock = self._threads(threads)
        started = clock.now()
        encoder = load_encoder(source, layer, self.device, None, trust)
        load = clock.now() - started
        ids = torch.randint(1000, 2000, (batch, length), device=self.device)
        mask = torch.ones_like(ids)

        def forward():
            with torch.no_grad(), autocast(self.device):
                encoder.model(input_ids=ids, attention_mask=mask)
            self._sync()

        rate = batch * length / clock.per_call(forward)
        self.figures[f"teacher {source} to layer {layer}"] = f"{rate:,.0f} tokens/s with {threads} thread(s)"
        return load, rate

    @cache  # noqa: B019
    def lasso(self, hidden: int, atoms: int, solver: tuple, threads: int) -> float:
        """Tokens/s of the targets' solver (solver: the targets section's solver settings and lambda)."""
        from .solvers.lasso import make_solver

        clock = self._threads(threads)
        dictionary, x = _sparse_problem(hidden, atoms, 2048, self.device)
        solve = make_solver(dictionary, dict(solver))

        def step():
            solve(x)
            self._sync()

        rate = len(x) / clock.per_call(step)
        self.figures[f"lasso {dict(solver)['solver']} d={hidden} K={atoms}"] = f"{rate:,.0f} tokens/s"
        return rate

    @cache  # noqa: B019
    def dictionary_batch(self, hidden: int, options: tuple, threads: int) -> float:
        """Seconds per mini-batch of the torch dictionary learner: its products (dictionary_flops) at the speed
        of a product of the mini-batch's shape here. (Timing the learner itself on made-up states measures its
        first, unconverged mini-batches, which cost many times what most of a fit does.)"""
        import torch

        clock = self._threads(threads)
        o = dict(options)
        states = torch.randn(o["batch_size"], hidden, device=self.device)
        atoms = torch.randn(hidden, o["atoms"], device=self.device)

        def product():
            states @ atoms
            self._sync()

        rate = 2 * o["batch_size"] * hidden * o["atoms"] / clock.per_call(product)
        seconds = dictionary_flops(hidden, o) / rate
        self.figures[f"dictionary K={o['atoms']}"] = f"{seconds:.3f} s a mini-batch of {o['batch_size']}"
        return seconds

    @cache  # noqa: B019
    def training(self, options: tuple, objective: str, atoms: int, length: int, vocab: int, threads: int) -> float:
        """Tokens/s of a student's training step (forward, its objective's heads and losses, backward, AdamW)."""
        import torch

        from .pretrain.losses import loss_parts, total_loss
        from .pretrain.model import Student, build_config
        from .training import autocast

        clock = self._threads(threads)
        objective = objective_named(objective).rate_as or objective  # the same heads; a teacher is counted apart
        o = {**dict(options), "objective": objective}
        model = Student(build_config(o, _Vocabulary(vocab), length), objective, atoms).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = _student_batch(min(o["batch_size"], 32), length, vocab, o["mask_fraction"], atoms, self.device)

        def step():
            with autocast(self.device):
                parts = loss_parts(model(batch), batch, {**o, "kd_temperature": 1.0}, None)
            total_loss(parts, o).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._sync()

        rate = len(batch["input_ids"]) * length / clock.per_call(step)
        self.figures[f"{o['size']} {objective} training"] = f"{rate:,.0f} tokens/s"
        return rate

    @cache  # noqa: B019
    def finetuning(self, size: str, batch: int, length: int, vocab: int, threads: int) -> float:
        """Tokens/s of a fine-tuning step of a student of this size (sequence classification)."""
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        from .pretrain.model import PRESETS
        from .training import autocast

        clock = self._threads(threads)
        model = BertForSequenceClassification(BertConfig(vocab_size=vocab, num_labels=4, attn_implementation="sdpa",
                                                         **PRESETS[size])).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(1000, 2000, (batch, length), device=self.device)
        labels = torch.randint(0, 4, (batch,), device=self.device)

        def step():
            with autocast(self.device):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._sync()

        rate = batch * length / clock.per_call(step)
        self.figures[f"{size} fine-tuning at {length} tokens"] = f"{rate:,.0f} tokens/s"
        return rate

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()


class _Vocabulary:
    """What build_config reads of a tokenizer."""

    def __init__(self, size: int):
        self.size, self.pad_token_id = size, 0

    def __len__(self) -> int:
        return self.size


def _sparse_problem(hidden: int, atoms: int, rows: int, device):
    """A unit-norm dictionary and states that are sparse non-negative combinations of its atoms plus noise."""
    import torch

    from .solvers.lasso import l2_normalise

    generator = torch.Generator().manual_seed(0)
    dictionary = l2_normalise(torch.randn(atoms, hidden, generator=generator)).T.contiguous()
    codes = torch.rand(rows, atoms, generator=generator) * (torch.rand(rows, atoms, generator=generator) < 0.03)
    x = l2_normalise(codes @ dictionary.T + 0.3 * torch.randn(rows, hidden, generator=generator) / hidden ** 0.5)
    return dictionary.to(device), x.to(device)


def _student_batch(rows: int, length: int, vocab: int, mask_fraction: float, atoms: int | None, device) -> dict:
    import torch

    from .pretrain.data import masked_positions

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (rows, length), generator=generator)
    masked = torch.rand(rows, length, generator=generator) < mask_fraction
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
             "masked": masked, "masked_positions": masked_positions(masked), "labels": ids[masked],
             "masked_count": masked.sum()}
    if atoms:
        k = min(32, atoms)
        weights = torch.rand(int(masked.sum()), k, generator=generator)
        batch.update(target_atoms=torch.randint(0, atoms, (int(masked.sum()), k), generator=generator),
                     target_weights=weights / weights.sum(1, keepdim=True), with_target=masked.sum())
    return {**{k: v.to(device) for k, v in batch.items()}, "padded": False}


class Assumed:
    """Rates of a GPU class this machine does not have: FLOPs at assumed fractions of its peak, or the
    rates a recorded benchmark run measured on it."""

    def __init__(self, hardware: str, bench: dict | None = None):
        from .pretrain.model import PEAK_BF16_FLOPS

        self.name = GPU_CLASSES[hardware]
        self.peak = PEAK_BF16_FLOPS[self.name]
        self.bench = bench or {}
        used = "recorded benchmark rates where present, else " if self.bench else ""
        self.basis = f"{self.name}: {used}assumed fractions of its {self.peak / 1e12:.0f} TFLOP/s bf16 peak " \
                     f"({json.dumps(ASSUMPTIONS)})"
        self.figures: dict[str, str] = {}

    def startup(self, heavy: bool) -> float:
        return ASSUMPTIONS["startup_seconds"] if heavy else 2.0

    def tokenize_bytes_per_second(self, measured: float) -> float:
        return measured

    def teacher(self, source, layer, batch, length, threads, trust) -> tuple:
        rate = self.peak * ASSUMPTIONS["inference_mfu"] / teacher_flops(source, layer, length, trust)
        recorded = _get(self.bench, "extraction", "large_corpus", "stage_tokens_per_s")
        if recorded:  # the bench's BERT-base-shaped teacher at layer 11 of 12, 128-token sequences
            rate = recorded * bert_forward_flops(11, 768, 3072, 128) / teacher_flops(source, layer, length, trust)
        return 0.0, rate

    def lasso(self, hidden: int, atoms: int, solver: tuple, threads: int) -> float:
        settings = dict(solver)
        iterations = ASSUMPTIONS["lasso_iterations"][settings["solver"]] or settings["max_iterations"]
        return self.peak * ASSUMPTIONS["lasso_fraction_of_peak"] / (iterations * 4 * hidden * atoms)

    def dictionary_batch(self, hidden: int, options: tuple, threads: int) -> float:
        return dictionary_flops(hidden, dict(options)) / (self.peak * ASSUMPTIONS["lasso_fraction_of_peak"])

    def training(self, options: tuple, objective: str, atoms: int, length: int, vocab: int, threads: int) -> float:
        o = dict(options)
        flops = student_training_flops(o, objective, atoms, length, vocab)
        recorded = _get(self.bench, "pretrain", "stage")
        if recorded and o["size"] in ("medium", "base"):  # the bench's medium mlsm student, K=3000, 128 tokens
            return recorded * student_training_flops({**o, "size": "medium"}, "mlsm", 3000, 128, vocab) / flops
        return self.peak * ASSUMPTIONS["training_mfu"][o["size"]] / flops

    def finetuning(self, size: str, batch: int, length: int, vocab: int, threads: int) -> float:
        from .pretrain.model import PRESETS

        shape = PRESETS[size]
        flops = 3 * bert_forward_flops(shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"],
                                       length)
        return self.peak * ASSUMPTIONS["training_mfu"][size] / flops


def dictionary_flops(hidden: int, options: dict) -> float:
    """Products of one mini-batch of the dictionary learner: coding (two products with the dictionary an
    iteration, DICTIONARY_CODE_ITERATIONS of them) and the block atom update (a K x K by K x d product a sweep)."""
    iterations = min(options["code_iterations"], DICTIONARY_CODE_ITERATIONS)
    coding = iterations * 4 * options["batch_size"] * hidden * options["atoms"]
    return coding + options["atom_sweeps"] * 2 * options["atoms"] ** 2 * hidden


def student_training_flops(options: dict, objective: str, atoms: int | None, length: int, vocab: int) -> float:
    from .objectives import objective as objective_named
    from .pretrain.model import PRESETS

    shape = PRESETS[options["size"]]
    hidden = shape["hidden_size"]
    needs = objective_named(objective)
    heads = (hidden * vocab if needs.mlm_head else 0) + (hidden * (atoms or 0) if needs.mlsm_head else 0)
    encoder = bert_forward_flops(shape["num_hidden_layers"], hidden, shape["intermediate_size"], length)
    return 3 * (encoder + 2 * heads * options["mask_fraction"])


@cache
def teacher_flops(source: str, layer: int, length: int, trust: bool) -> float:
    from transformers import AutoConfig

    from .models import resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(source), trust_remote_code=trust)
    layers = config.num_hidden_layers + 1 + layer
    return bert_forward_flops(layers, config.hidden_size, config.intermediate_size, length)


def _get(tree: dict, *keys):
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def read_bench(path: str | Path | None) -> dict:
    return json.loads(Path(path).read_text()) if path else {}


def rates_for(hardware: str, bench: str | None = None):
    """Measured rates for `cpu` (or `cuda`: the GPU here), assumed ones for a GPU class."""
    if hardware in ("cpu", "cuda"):
        return Measured(hardware)
    return Assumed(hardware, read_bench(bench))

