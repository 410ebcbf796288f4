"""Resumable state: parts and whole-state checkpoints, stale and unreadable state discarded."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from pipeline import resume
from pipeline.common import StageError
from pipeline.resume import Resume


def events(directory):
    return [json.loads(line)["event"] for line in (directory / "journal.jsonl").read_text().splitlines()]


def test_parts_are_resumed_and_finish_keeps_only_the_journal(tmp_path):
    first = Resume(tmp_path, {"params": 1}, interval=0)
    assert first.load_parts() == {}
    first.add_part(0, {"x": np.arange(3, dtype=np.float16)})
    first.add_part(1, {"x": np.arange(2, dtype=np.float16)})
    again = Resume(tmp_path, {"params": 1}, interval=0)
    done = again.load_parts()
    assert sorted(done) == [0, 1] and done[1]["x"].tolist() == [0, 1]
    again.finish()
    assert [p.name for p in tmp_path.iterdir()] == ["journal.jsonl"]
    assert events(tmp_path) == ["start", "checkpoint", "checkpoint", "resume", "done"]


def test_other_params_discard_the_state(tmp_path):
    Resume(tmp_path, {"params": 1}, interval=0).save_state(3, {"a": 1}, {"w": torch.ones(2)})
    assert Resume(tmp_path, {"params": 2}, interval=0).load_state() is None
    assert "discard" in events(tmp_path)


def test_an_unreadable_checkpoint_means_starting_over(tmp_path):
    resume = Resume(tmp_path, {"params": 1}, interval=0)
    shared = torch.ones(4)
    resume.save_state(2, {"a": 1}, {"w": shared, "tied": shared})  # tied tensors are saved twice
    meta, tensors = Resume(tmp_path, {"params": 1}, interval=0).load_state()
    assert meta == {"a": 1, "unit": 2} and torch.equal(tensors["tied"], shared)
    state = tmp_path / "state.safetensors"
    state.write_bytes(state.read_bytes()[:20])
    assert Resume(tmp_path, {"params": 1}, interval=0).load_state() is None
    assert events(tmp_path)[-2:] == ["discard", "start"] and not state.exists()


def test_no_directory_means_no_state(tmp_path):
    resume = Resume(None, {"params": 1})
    assert resume.load_state() is None and resume.load_parts() == {} and not resume.due()
    resume.add_part(0, {"x": np.zeros(1)})
    resume.finish()


def test_sigterm_makes_the_next_unit_a_checkpoint_and_then_stops_the_stage(tmp_path, monkeypatch):
    """Issue #33: every resumable stage saves on the scheduler's signal, not only pre-training. After SIGTERM the
    next unit boundary is due (whatever the interval), the state is written, and the stage stops with a transient
    error (Snakemake retries it, SLURM's requeue reruns it) that a rerun resumes from."""
    monkeypatch.setattr(resume, "_STOP", type(resume._STOP)())  # this test's own flag
    previous = signal.signal(signal.SIGTERM, resume.request_stop)  # as pipeline/cli.py installs it
    try:
        parts = Resume(tmp_path / "parts", {"params": 1}, interval=1e9)
        parts.add_part(0, {"x": np.zeros(2)})
        assert not parts.due()
        os.kill(os.getpid(), signal.SIGTERM)
        assert parts.due()
        with pytest.raises(StageError, match="stopped by SIGTERM after unit 1") as stopped:
            parts.add_part(1, {"x": np.ones(2)})
        assert stopped.value.transient
        assert sorted(Resume(tmp_path / "parts", {"params": 1}).load_parts()) == [0, 1]
        state = Resume(tmp_path / "state", {"params": 1}, interval=1e9)
        with pytest.raises(StageError, match="after unit 7"):
            state.save_state(7, {"a": 1}, {"w": torch.ones(2)})
        assert Resume(tmp_path / "state", {"params": 1}).load_state()[0]["unit"] == 7
        progress = Resume(tmp_path / "progress", {"params": 1}, interval=1e9)
        (tmp_path / "data").mkdir()
        with pytest.raises(StageError, match="after unit 3"):
            progress.save_progress(3, {}, tmp_path / "data")
        trainer = Resume(tmp_path / "trainer", {"params": 1}, interval=1e9, stops=False)  # it decides across ranks
        assert trainer.due()
        trainer.save_state(2, {}, {"w": torch.ones(1)})
    finally:
        signal.signal(signal.SIGTERM, previous)
