"""The training loop of one pre-training run, read top to bottom in `Trainer.run`; its state, saved and
resumed; and the run's outputs.

Losses are means over each global micro-batch (batch_size x processes sequences); an update averages
grad_accumulation of them. A non-finite loss stops the run with the state before that update saved.
SIGTERM (a SLURM preemption or time limit) saves the state at the end of the update in progress and stops;
a rerun resumes from it. Models saved after checkpoint_fractions of the updates wait in the resume
directory (so that a killed run keeps them) until the final model is written.

A run whose updates do not depend on max_steps (ablation.budget_independent) keeps its final state in
checkpoints/state/; the same student with a longer budget (a grid sweeping max_steps) continues from it
(--continue-from) instead of repeating those updates, and ends with the weights of a run from scratch.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..ablation import budget_independent
from ..common import StageError, log, seed_everything, set_cpu_threads
from ..config import checkpoint_steps
from ..data import contract
from ..data.integrity import atomic_output, file_entries, read_verified, write_record
from ..objectives import objective
from ..resume import Resume, load_training, save_training, stop_requested
from ..training import autocast, grad_scaler, rng_states, set_rng_states, training_precision
from . import card
from .data import Prefetcher, Shard, rank_share
from .diagnostics import measure
from .distributed import all_ranks_sum, check_ranks_agree, first_ranks, init_distributed
from .history import TrainingLog, Window
from .losses import loss_parts, total_loss
from .model import flops_per_token, peak_flops
from .setup import Setup, build

VALIDATION_LOSSES = ("validation_mlm", "validation_mlsm")  # of the diagnostics, logged in the history
FINAL_STATE = "state"  # in the checkpoints directory: the final state a longer budget continues from
# What may differ between a student and the same student with another budget.
BUDGET_KEYS = ("max_steps", "student")


def train(paths, params: dict) -> dict:
    """Pre-train one model; under torchrun, data-parallel (each rank takes its rows of every batch)."""
    set_cpu_threads()
    seed_everything(params["seed"])
    rank, world, device = init_distributed(params.get("device", "auto"))
    training_precision(device)
    try:
        return Trainer(build(rank, world, device, paths, params)).run()
    finally:
        if world > 1:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, setup: Setup):
        self.s, self.params = setup, setup.params
        self.step, self.tokens_seen, self.seconds, self.history = 0, 0, 0.0, []
        self.diagnostics: list[dict] = []  # at initialisation and at each save (pretrain/diagnostics.py)
        self.stop_requested = False
        self.final_rngs: dict[str, torch.Tensor] | None = None
        self.validation: Shard | None = None
        paths = setup.paths
        self.saved_models = Path(paths.resume_dir or f"{paths.model}.checkpoints.tmp") / "models"
        longest = max(length for _, _, length, _ in setup.stream.phases) if setup.stream else 0  # 0: the control
        self.flops_per_token = flops_per_token(setup.model, self.params, longest)
        self.precision = self.params.get("precision", "bf16")  # on a GPU; the CPU trains in fp32
        self.scaler = grad_scaler(setup.device, self.precision)
        self.peak_flops = peak_flops(setup.device)

    def run(self) -> dict:
        """Diagnostics at initialisation, the updates (none for the control), the outputs."""
        self.load_state()
        if not self.diagnostics:  # a fresh run (a resumed one has them in its state)
            self._diagnose()
        if self.params["max_steps"]:
            self._train()
        return self._finish()

    def _train(self) -> None:
        s, params = self.s, self.params
        total, accumulation, saves = params["max_steps"], params["grad_accumulation"], checkpoint_steps(params)

        def build(index: int) -> tuple[dict, int, int, bool]:
            """This rank's share of micro-batch `index`, its tokens, the global masked count and whether a row
            is padded: counted here, in the loader's thread on the host's copy, so that no step asks the GPU."""
            batch = s.stream.micro_batch(index, params["batch_size"] * s.world, s.tokenizer, params)
            share = rank_share(batch, s.rank, s.world)
            lengths = share["lengths"]
            return share, int(lengths.sum()), int(batch["masked_count"]), bool((lengths < lengths.max()).any())

        prefetch = Prefetcher(build, self.step * accumulation, pin=s.device.type == "cuda")
        logger = TrainingLog(s.paths, total, s.rank == 0)
        started, window = time.perf_counter() - self.seconds, Window(self.step, self.tokens_seen)
        in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop) if in_main_thread else None
        self.stop_requested = self.stop_requested or stop_requested()  # a SIGTERM before the loop began
        s.model.train()
        try:
            while self.step < total:
                before = rng_states(), self.tokens_seen
                values, masked = self._update(prefetch, accumulation)
                if self._non_finite(values):
                    self._stop_on_non_finite(values, *before)
                self.step, self.seconds = self.step + 1, time.perf_counter() - started
                if self.step == total:  # before the final measurement: what a longer run has at this update
                    self.final_rngs = rng_states()
                if self.step % s.paths.log_every == 0 or self.step == total or self.step in saves:
                    self._log(logger, window, values, masked)
                if self.step in saves:
                    self._save_model(self.saved_models / f"step{self.step}")
                save, stop = self._checkpoint_due() if self.step < total else (False, False)
                if save:
                    self.save_state()
                if stop:
                    raise StageError(f"stopped by SIGTERM after update {self.step} of {total}; the state is "
                                     f"saved in {s.paths.resume_dir}, and a retry or a rerun (SLURM's requeue too) "
                                     "resumes from it", transient=True)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_handler)
            prefetch.close()
            logger.close()

    def _update(self, prefetch: Prefetcher, accumulation: int) -> tuple[dict[str, float], int]:
        """One optimizer update over `accumulation` micro-batches; its global mean losses and grad norm."""
        s, sums, masked = self.s, {}, 0
        for micro in range(accumulation):
            cpu, tokens, global_masked, padded = prefetch.next()
            self.tokens_seen, masked = self.tokens_seen + tokens, masked + global_masked
            batch = {k: v.to(s.device, non_blocking=True) for k, v in cpu.items()}
            batch["padded"] = padded
            if s.online is not None:
                s.online.add_to(batch, s.world)
            # Gradients are averaged across ranks once per update, on its last micro-batch.
            sync = s.world == 1 or micro == accumulation - 1
            with (nullcontext() if sync else s.forward.no_sync()), autocast(s.device, self.precision):
                parts = loss_parts(s.forward(batch), batch, self.params, s.teacher)
            # DDP averages gradients over ranks; the shares are already parts of the global mean.
            self.scaler.scale(total_loss(parts, self.params) * (s.world / accumulation)).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / accumulation
        self.scaler.unscale_(s.optimizer)  # the norm and its clipping on the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.params["max_grad_norm"])
        global_means = all_ranks_sum(torch.stack([*sums.values()]).float(), s.world)
        # One wait for the GPU an update: whether to apply it depends on these values being finite.
        read = torch.cat([global_means, grad_norm.detach().float().reshape(1).to(global_means.device)]).tolist()
        values = dict(zip([*sums, "grad_norm"], read))
        if self.scaler.is_enabled():  # fp16: an overflow skips the update (its norm is logged as null)
            values["loss_scale"] = self.scaler.get_scale()
            values["grad_norm"] = values["grad_norm"] if math.isfinite(values["grad_norm"]) else None
        if not self._non_finite(values):
            self.scaler.step(s.optimizer)  # fp16: skipped where the gradients overflowed, as the reference's
            self.scaler.update()
            s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return values, masked

    @staticmethod
    def _non_finite(values: dict[str, float | None]) -> list[str]:
        """The values that stop the run: a non-finite loss or gradient norm (under fp16's scaler an overflowing
        norm is None: the scaler skips that update and lowers its scale, as routine at a high scale)."""
        return [k for k, v in values.items() if v is not None and not math.isfinite(v)]

    # ---- state ----

    def save_state(self, rngs: dict[str, torch.Tensor] | None = None, into: Resume | None = None) -> None:
        """Collective under torchrun: every rank sends its random states, rank 0 writes (into the job's
        resumable state, or `into`)."""
        s = self.s
        mine = {"rngs": rngs or rng_states(), "tokens_seen": self.tokens_seen}
        everyone = [mine]
        if s.world > 1:
            everyone = [None] * s.world
            dist.all_gather_object(everyone, mine)
        if s.rank != 0:
            return
        rngs = {f"rng.{r}.{k}": v for r, theirs in enumerate(everyone) for k, v in theirs["rngs"].items()}
        meta = {"seconds": self.seconds, "history": self.history, "diagnostics": self.diagnostics,
                "tokens_seen": [theirs["tokens_seen"] for theirs in everyone], "grad_scaler": self.scaler.state_dict()}
        save_training(into or s.resume, self.step, s.model, s.optimizer, s.scheduler, meta, rngs)

    def load_state(self) -> None:
        """The job's own resumable state; else, given one, the final state of a shorter budget."""
        s = self.s
        if s.world > 1:
            dist.barrier()  # rank 0 has discarded stale state before anyone reads it
        saved = load_training(s.resume, s.model, s.optimizer, s.scheduler)
        if saved is None and s.paths.continue_from:
            saved = load_training(self._shorter_budget(), s.model, s.optimizer, s.scheduler)
            if saved is None:
                raise StageError(f"{s.paths.continue_from} holds no training state to continue from")
            self._restore(*saved)
            self._as_if_from_scratch(saved[0]["unit"])
        elif saved is not None:
            self._restore(*saved)

    def _shorter_budget(self) -> Resume:
        """The final state of the same student with a shorter budget, checked against its record."""
        state = Path(self.s.paths.continue_from) / FINAL_STATE / "state.safetensors"
        record = read_verified(self.s.paths.continue_summary, [str(state)])
        theirs, mine = ({k: v for k, v in p.items() if k not in BUDGET_KEYS} for p in (record["params"], self.params))
        if theirs != mine or not budget_independent(self.params):
            raise StageError(f"{self.s.paths.continue_from}: a run that differs from this one in more than its "
                             "budget, or a schedule that depends on max_steps; it cannot be continued")
        return Resume(state.parent, None, writer=False, stops=False)

    def _as_if_from_scratch(self, step: int) -> None:
        """Drop what the shorter run recorded only because it ended at `step`: its diagnostics there, and its
        log entry unless this run logs that update too (then without the validation losses)."""
        if step in checkpoint_steps(self.params):
            return
        self.diagnostics = [d for d in self.diagnostics if d["step"] != step]
        kept = []
        for entry in self.history:
            if entry["step"] == step and step % self.s.paths.log_every:
                continue
            kept.append({k: v for k, v in entry.items() if entry["step"] != step or k not in VALIDATION_LOSSES})
        self.history = kept

    def _restore(self, meta: dict, tensors: dict) -> None:
        s = self.s
        set_rng_states({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{s.rank}.")})
        self.step, self.seconds, self.history = meta["unit"], meta["seconds"], meta["history"]
        self.diagnostics = meta["diagnostics"]
        self.tokens_seen = meta["tokens_seen"][s.rank]
        if meta.get("grad_scaler"):  # its scale and growth count: an fp16 run resumes exactly
            self.scaler.load_state_dict(meta["grad_scaler"])
        if s.rank == 0:
            log.info("resuming at update %d of %d", self.step, self.params["max_steps"])

    def _checkpoint_due(self) -> tuple[bool, bool]:
        """(save now, stop after saving): rank 0's clock and stop request decide, so that every rank joins
        the collective save and stops with it."""
        decision = torch.tensor([self.s.resume.due() or self.stop_requested, self.stop_requested], dtype=torch.uint8)
        decision = first_ranks(decision, self.s.world)
        return bool(decision[0]), bool(decision[1])

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM (SLURM's preemption or time limit, a kill): save at the end of this update, then stop."""
        if self.s.paths.resume_dir is None:
            raise StageError(f"stopped by signal {signum}; no resume directory was given, so no state was saved")
        self.stop_requested = True

    def _stop_on_non_finite(self, values: dict[str, float], rngs: dict[str, torch.Tensor], tokens_seen: int) -> None:
        """Save the state as it was before this update (the update was not applied), then stop."""
        where = self.s.paths.resume_dir
        if where:
            self.tokens_seen = tokens_seen
            self.save_state(rngs)
        shown = " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=skipped" for k, v in values.items())
        raise StageError(f"the loss became non-finite at update {self.step + 1} ({shown}); training stopped. "
                         + (f"The state before this update is saved in {where}: a rerun with the same params "
                            "repeats it, other params (e.g. a lower learning_rate or more warm-up) start over."
                            if where else "No resume directory was given, so no state was saved."))

    # ---- log ----

    def _log(self, logger: TrainingLog, window: Window, values: dict[str, float], masked: int) -> None:
        s = self.s
        seconds, tokens = window.advance(self.step, self.tokens_seen)
        tokens_all = float(all_ranks_sum(torch.tensor([float(tokens)], dtype=torch.float64), s.world))
        speed = tokens_all / max(seconds, 1e-9)
        entry = {"step": self.step, **values, "lr": s.scheduler.get_last_lr()[0],
                 "masked_tokens": masked, "tokens_per_second": speed,
                 "mfu": speed * self.flops_per_token / (self.peak_flops * s.world) if self.peak_flops else None,
                 "seconds": round(self.seconds, 3)}
        if self.step in checkpoint_steps(self.params) or self.step == self.params["max_steps"]:
            measured = self._diagnose()
            entry.update({k: measured[k] for k in VALIDATION_LOSSES if measured.get(k) is not None})
        self.history.append(entry)
        logger.write(self.history, self.seconds)

    def _diagnose(self) -> dict:
        """Rank 0 measures the model on the held-out sequences (fixed masks; pretrain/diagnostics.py):
        validation losses against their baselines, collapse statistics. Kept in the record by update."""
        s = self.s
        if s.rank != 0 or not s.paths.validation:
            return {}
        targets = s.paths.validation_targets if s.uses_targets else None
        if self.validation is None:  # read once, at the first measurement
            self.validation = Shard(s.paths.validation, targets)
        measured = {"step": self.step}
        if len(self.validation):
            measured.update(measure(s.model, self.validation, s.tokenizer, self.params, s.device,
                                    autocast(s.device, self.precision),
                                    s.baselines, objective(self.params["objective"]).mlm_head, bool(targets)))
        self.diagnostics.append(measured)
        return measured

    # ---- outputs ----

    def metadata(self) -> dict:
        atoms = self.params.get("atoms") if objective(self.params["objective"]).mlsm_head else None
        return {"format_version": contract.FORMAT_VERSION["pretrain"], "params": self.params,
                "steps": self.params["max_steps"], "objective": self.params["objective"], "atoms": atoms,
                "world_size": self.s.world, "heads_at_prior": self.s.heads_at_prior}

    def _save_model(self, directory: Path) -> None:
        if self.s.rank != 0:
            return
        with atomic_output(directory) as tmp:
            tmp.mkdir(parents=True)
            self.s.model.save(tmp, self.s.tokenizer, {**self.metadata(), "steps": self.step})
            # Tokens are counted per rank: exact here only for one process (the final card sums them).
            card.write(tmp, self.s.card, self.step, self.history, self.tokens_seen if self.s.world == 1 else None)

    def _finish(self) -> dict:
        s = self.s
        tokens_seen = int(all_ranks_sum(torch.tensor([float(self.tokens_seen)], dtype=torch.float64), s.world))
        if s.world > 1:
            check_ranks_agree(s.model, s.world)
        summary = {**self.metadata(), "tokens_seen": tokens_seen, "seconds": self.seconds,
                   "tokens_per_second": tokens_seen / max(self.seconds, 1e-9),
                   "parameters": sum(p.numel() for p in s.model.parameters()),
                   "checkpoints": [f"step{step}" for step in checkpoint_steps(self.params)],
                   "final": self.history[-1] if self.history else {"step": 0}, "history": self.history,
                   "baselines": self.s.baselines.record(), "diagnostics": self.diagnostics, "card": s.card}
        if budget_independent(self.params):  # collective: every rank's random states
            (self.saved_models / FINAL_STATE).mkdir(parents=True, exist_ok=True)
            final = Resume(self.saved_models / FINAL_STATE, None, writer=False, stops=False)
            self.save_state(self.final_rngs, into=final)
        if s.rank == 0:
            self._publish(summary)
        if s.world > 1:
            dist.barrier()  # no rank exits (and lets torchrun end the job) before rank 0 has saved
        return summary

    def _publish(self, summary: dict) -> None:
        """Write the final model and the saved checkpoints into the outputs, then the record."""
        s, paths = self.s, self.s.paths
        with atomic_output(paths.model) as tmp:
            tmp.mkdir()
            s.model.save(tmp, s.tokenizer, {**self.metadata(), "tokens_seen": summary["tokens_seen"]})
            card.write(tmp, s.card, self.step, self.history, summary["tokens_seen"])
        outputs = [paths.model]
        if paths.checkpoints:
            with atomic_output(paths.checkpoints) as tmp:
                tmp.mkdir()
                for name in summary["checkpoints"]:
                    saved = self.saved_models / name
                    if not saved.is_dir():
                        raise StageError(f"the model saved at {name} is missing from {self.saved_models}")
                    shutil.copytree(saved, tmp / name)
                if budget_independent(self.params):  # a longer budget continues from here
                    shutil.copytree(self.saved_models / FINAL_STATE, tmp / FINAL_STATE)
            outputs.append(paths.checkpoints)
        summary["files"] = file_entries(Path(paths.summary).parent, outputs)
        write_record(paths.summary, summary)
        s.resume.finish()
        if not paths.resume_dir:
            shutil.rmtree(self.saved_models.parent, ignore_errors=True)
