"""Resumable state of the long stages, kept outside their declared outputs.

Snakemake deletes the outputs of a failed or killed job, but not this directory (contract.RESUME_DIR,
passed as --resume-dir). A long stage works in units (a batch of sequences, a mini-batch, an update)
and saves a checkpoint at a unit boundary at most every `interval` seconds (the stage's setting
--checkpoint-seconds, which the workflow takes from the config's `checkpoint_seconds`; 0 saves after every
unit); restarted, it continues from the last checkpoint and its output equals that of an uninterrupted
run. Three kinds of state:

- parts (targets): each unit's results, appended in part files; a rerun skips those units.
- state (dictionary, pre-training, fine-tuning): the whole training state, replaced at each checkpoint.
- progress (extraction): the output grows in a work directory here; a small record says how much of
  it is final (at each checkpoint), and a rerun cuts anything written beyond that and goes on.

SIGTERM (SLURM's preemption, requeue or `--signal` before a time limit; pipeline/cli.py installs the handler)
makes the next unit boundary a checkpoint, after which the stage stops with a transient error: Snakemake's retry,
or SLURM's requeue of the job, resumes from it. The state is tied to a key (the stage's params and its inputs'
checksums): other params or inputs discard it. journal.jsonl logs start, resume, checkpoint, discard and done
events, and outlives the checkpoints, which are deleted when the stage has written its outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .common import StageError, fingerprint, log
from .data.integrity import atomic_output, fsync_tree

DEFAULT_INTERVAL_SECONDS = 300.0
_STOP = threading.Event()  # SIGTERM received: save at the next unit boundary, then stop


def request_stop(signum=None, frame=None) -> None:
    """The handler of SIGTERM in a stage with a resume directory (pipeline/cli.py)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


class Resume:
    """Checkpoints of one job in `directory`, at most every `interval` seconds; with directory None, a
    no-op (nothing saved or resumed).

    Under torchrun only rank 0 is the writer; the other ranks read the state it saved."""

    def __init__(self, directory: str | Path | None, key: object, writer: bool = True,
                 interval: float = DEFAULT_INTERVAL_SECONDS, stops: bool = True):
        self.directory = Path(directory) if directory else None
        self.writer = writer
        self.stops = stops  # stop after the checkpoint a SIGTERM asked for (pre-training decides across ranks)
        self.key = fingerprint(key)
        self.interval = interval
        self.last_save = time.monotonic()
        self.pending: dict[int, dict[str, np.ndarray]] = {}
        self.parts_written = 0
        if self.directory is None or not writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key"
        if key_file.exists() and key_file.read_text() != self.key:
            self._clear()
            self.journal("discard", reason="params or inputs changed")
        if not key_file.exists():
            with atomic_output(key_file) as tmp:
                tmp.write_text(self.key)

    # ---- journal ----

    def journal(self, event: str, **fields) -> None:
        if self.directory is None or not self.writer:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
        with open(self.directory / "journal.jsonl", "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def due(self) -> bool:
        return self.directory is not None and (stop_requested() or time.monotonic() - self.last_save >= self.interval)

    def _saved(self, unit: object) -> None:
        """After a checkpoint: the clock restarts; asked to stop by SIGTERM, the stage stops here."""
        self.last_save = time.monotonic()
        if self.stops and stop_requested():
            raise StageError(f"stopped by SIGTERM after unit {unit}; the state is saved in {self.directory}, and a "
                             "retry or a rerun (SLURM's requeue too) resumes from it", transient=True)

    # ---- parts: results per unit ----

    def load_parts(self) -> dict[int, dict[str, np.ndarray]]:
        """Results of the units completed by earlier attempts, by unit index."""
        from safetensors.numpy import load_file

        units: dict[int, dict[str, np.ndarray]] = {}
        if self.directory is None:
            return units
        try:
            for path in sorted(self.directory.glob("part-*.safetensors")):
                for name, array in load_file(path).items():
                    unit, field = name.split("/", 1)
                    units.setdefault(int(unit), {})[field] = array
                self.parts_written += 1
        except Exception as err:  # unreadable state is only lost work, never a wrong result
            self._discard(err)
            units, self.parts_written = {}, 0
        if units:
            self.journal("resume", completed=len(units))
            log.info("resuming: %d units done by an earlier attempt (%s)", len(units), self.directory)
        else:
            self.journal("start")
        return units

    def add_part(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep a unit's results; write the kept ones to a new part file when a checkpoint is due."""
        if self.directory is None:
            return
        self.pending[unit] = arrays
        if self.due():
            from safetensors.numpy import save_file

            tensors = {f"{u}/{k}": np.ascontiguousarray(v) for u, a in self.pending.items() for k, v in a.items()}
            with atomic_output(self.directory / f"part-{self.parts_written:06d}.safetensors") as tmp:
                save_file(tensors, str(tmp))
            self.parts_written += 1
            self.journal("checkpoint", units=sorted(self.pending))
            done, self.pending = max(self.pending), {}
            self._saved(done)

    # ---- state: the whole training state ----

    def load_state(self) -> tuple[dict, dict] | None:
        """(meta, torch tensors) of the last checkpoint, or None."""
        from safetensors import safe_open

        path = None if self.directory is None else self.directory / "state.safetensors"
        if path is None or not path.exists():
            self.journal("start")
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["meta"])
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as err:  # unreadable state is only lost work, never a wrong result
            self._discard(err)
            self.journal("start")
            return None
        self.journal("resume", completed=meta["unit"])
        log.info("resuming after unit %d from %s", meta["unit"], path)
        return meta, tensors

    def save_state(self, unit: int, meta: dict, tensors: dict) -> None:
        """Checkpoint after `unit` units (meta: JSON-able; tensors: name -> torch tensor)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        seen = set()
        for name, tensor in tensors.items():  # tied weights share memory, which safetensors refuses
            if tensor.untyped_storage().data_ptr() in seen:
                tensors[name] = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        with atomic_output(self.directory / "state.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps({**meta, "unit": unit})})
        self.journal("checkpoint", unit=unit)
        self._saved(unit)

    # ---- progress: an output growing in the work directory ----

    @contextlib.contextmanager
    def work_directory(self, fallback_parent: Path) -> Iterator[Path]:
        """Where the growing output lives: kept here across attempts, or a temporary directory without state."""
        if self.directory is None:
            fallback_parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".work.", dir=fallback_parent) as tmp:
                yield Path(tmp)
            return
        work = self.directory / "work"
        work.mkdir(exist_ok=True)
        yield work

    def load_progress(self) -> dict | None:
        path = None if self.directory is None else self.directory / "progress.json"
        if path is None or not path.exists():
            self.journal("start")
            return None
        try:
            meta = json.loads(path.read_text())
            unit = meta["unit"]
        except (ValueError, KeyError) as err:  # unreadable state is only lost work, never a wrong result
            self._discard(err)
            self.journal("start")
            return None
        self.journal("resume", completed=unit)
        log.info("resuming after unit %d from %s", unit, self.directory)
        return meta

    def save_progress(self, unit: int, meta: dict, data: Path) -> None:
        """Record that `unit` units of the growing output under `data` are final (after flushing it to disk)."""
        if self.directory is None:
            return
        fsync_tree(data)
        with atomic_output(self.directory / "progress.json") as tmp:
            tmp.write_text(json.dumps({**meta, "unit": unit}))
        self.journal("checkpoint", unit=unit)
        self._saved(unit)

    # ---- end ----

    def finish(self) -> None:
        """The outputs are written: drop the checkpoints, keep the journal."""
        if self.directory is None or not self.writer:
            return
        self._clear()
        self.journal("done")

    def _discard(self, err: Exception) -> None:
        log.warning("resumable state in %s is unreadable (%s); starting over", self.directory, err)
        if self.writer:
            self._clear()
            self.journal("discard", reason=f"unreadable: {err}"[:300])

    def _clear(self) -> None:
        for item in self.directory.iterdir():
            if item.name == "journal.jsonl":
                continue
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def save_training(resume: Resume, unit: int, model, optimizer, scheduler, meta: dict, tensors: dict) -> None:
    """Checkpoint a training run: the model, the optimizer, the schedule, and the caller's meta and tensors."""
    state, groups = model_and_optimizer_tensors(model, optimizer)
    resume.save_state(unit, {"optimizer_groups": groups, "scheduler": scheduler.state_dict(), **meta},
                      {**state, **tensors})


def load_training(resume: Resume, model, optimizer, scheduler) -> tuple[dict, dict] | None:
    """Restore the model, optimizer and schedule of the last checkpoint; (meta, tensors), or None."""
    saved = resume.load_state()
    if saved is None:
        return None
    meta, tensors = saved
    load_model_and_optimizer(model, optimizer, tensors, meta["optimizer_groups"])
    scheduler.load_state_dict(meta["scheduler"])
    return meta, tensors


def model_and_optimizer_tensors(model, optimizer) -> tuple[dict, list]:
    """A model's and its optimizer's tensors under flat names, and the optimizer's (JSON) param groups."""
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{pid}.{k}": v for pid, values in state["state"].items() for k, v in values.items()})
    return tensors, state["param_groups"]


def load_model_and_optimizer(model, optimizer, tensors: dict, groups: list) -> None:
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
