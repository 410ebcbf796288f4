"""Resumable state: parts and whole-state checkpoints, stale and unreadable state discarded."""

import json

import numpy as np
import torch

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
