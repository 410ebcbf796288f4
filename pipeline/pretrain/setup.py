"""Everything a pre-training run needs before its first update, built in small steps: verified inputs,
the data stream, the model, the KD teacher or online targets, the optimizer and schedule, the resumable
state. The order of the steps is the order in which they draw from the seeded random generators."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..common import StageError
from ..integrity import CHECKSUM_KEY, read_verified
from ..models import load_tokenizer, verify_model
from ..objectives import objective
from ..resume import Resume
from ..training import adamw, warmup_then_decay
from . import card
from .data import BatchStream
from .model import Student, build_config
from .teachers import KdTeacher, OnlineTargets


@dataclass
class Setup:
    rank: int
    world: int
    device: torch.device
    paths: SimpleNamespace
    params: dict
    manifest: dict            # the corpus record
    tokenizer: object
    online: OnlineTargets | None
    target_record: dict | None
    stream: BatchStream
    model: Student
    forward: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    teacher: KdTeacher | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume: Resume
    card: dict                # what the model cards state besides the training so far (pretrain/card.py)

    @property
    def uses_targets(self) -> bool:
        """MLSM targets read from the target shards (not made online)."""
        return self.target_record is not None


def build(rank: int, world: int, device: torch.device, paths: SimpleNamespace, params: dict) -> Setup:
    manifest = read_verified(paths.corpus_manifest, [*paths.corpus_shards, *filter(None, [paths.validation])])
    verify_model(paths.teacher_model, paths.teacher_summary)
    tokenizer = load_tokenizer(manifest["tokenizer"])
    online = build_online_targets(paths, params, device, manifest)
    target_record = read_target_record(paths, params) if online is None else None
    stream = build_stream(paths, params, manifest, world, target_record is not None)
    model, forward = build_model(params, tokenizer, manifest, device, world)
    teacher = build_kd_teacher(params, device, manifest)
    optimizer = adamw(model, params["learning_rate"], params["weight_decay"], exempt_biases_and_norms=True,
                      fused=device.type == "cuda")
    scheduler = warmup_then_decay(optimizer, params["max_steps"], params["warmup_fraction"])
    resume = Resume(paths.resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY], "world_size": world,
                                       "targets": target_record[CHECKSUM_KEY] if target_record else None,
                                       "dictionary": online.record[CHECKSUM_KEY] if online else None},
                    writer=rank == 0, interval=paths.checkpoint_seconds)
    facts = card.facts(paths, params, manifest, target_record, world)
    return Setup(rank, world, device, paths, params, manifest, tokenizer, online, target_record, stream, model,
                 forward, teacher, optimizer, scheduler, resume, facts)


def build_online_targets(paths, params: dict, device, manifest: dict) -> OnlineTargets | None:
    if not (objective(params["objective"]).targets and params["targets"] == "online"):
        return None
    if not (paths.dictionary and paths.dictionary_metrics):
        raise StageError(f"objective {params['objective']} with targets online needs --dictionary and "
                         "--dictionary-metrics")
    return OnlineTargets(params["online"], device, manifest, paths.dictionary, paths.dictionary_metrics)


def read_target_record(paths, params: dict) -> dict | None:
    """The target stage's record, verifying the target shards (and validation targets) it lists."""
    if not objective(params["objective"]).targets:
        return None
    if not (paths.target_shards and paths.target_manifest):
        raise StageError(f"objective {params['objective']} needs --target-shards and --target-manifest")
    return read_verified(paths.target_manifest, [*paths.target_shards, *filter(None, [paths.validation_targets])])


def build_stream(paths, params: dict, manifest: dict, world: int, with_targets: bool) -> BatchStream:
    sizes = {Path(s["path"]).name: s["sequences"] for s in manifest["shards"]}
    stream = BatchStream(paths.corpus_shards, paths.target_shards if with_targets else None,
                         [sizes[Path(p).name] for p in paths.corpus_shards], params["seed"])
    if stream.total < params["batch_size"] * world:
        raise StageError(f"the corpus has {stream.total} sequences, fewer than one batch of "
                         f"{params['batch_size']} x {world} processes; lower batch_size")
    return stream


def build_model(params: dict, tokenizer, manifest: dict, device, world: int) -> tuple[Student, torch.nn.Module]:
    """The student (the same seed on every rank gives the same weights) and what runs its forward pass."""
    atoms = params.get("atoms") if objective(params["objective"]).mlsm_head else None
    model = Student(build_config(params, tokenizer, manifest["params"]["max_seq_len"]), params["objective"],
                    atoms).to(device)
    if params["compile"]:
        model.compile_encoder()
    if world == 1:
        return model, model
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)


def build_kd_teacher(params: dict, device, manifest: dict) -> KdTeacher | None:
    if "kd" not in objective(params["objective"]).losses:
        return None
    return KdTeacher(params["teacher_source"], device, manifest, params["teacher_trust_remote_code"])
