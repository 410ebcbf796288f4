"""Everything a pre-training run needs before its first update, built in small steps: verified inputs,
the data stream, the model, the KD teacher or online targets, the optimizer and schedule, the resumable
state. The order of the steps is the order in which they draw from the seeded random generators."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..common import StageError, log
from ..config import model_max_length, option_defaults, phase_lengths, phase_plan
from ..data.integrity import CHECKSUM_KEY, read_verified
from ..models import load_tokenizer, resolve_model_source, verify_model
from ..objectives import LOSS_PARTS, objective
from ..resume import Resume
from ..training import adamw, warmup_then_decay
from . import card
from .data import BatchStream, PhasedStream, unmaskable_ids
from .diagnostics import Baselines, baselines
from .model import Student, build_config, load_backbone
from .teachers import KdTeacher, OnlineTargets

PHASE_STREAM = 2**31 - 1  # marks the seeds of a schedule's other lengths apart from the (seed, epoch) keys


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
    stream: PhasedStream | None  # None for the control (objective none), which has no updates
    model: Student
    forward: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    teacher: KdTeacher | None
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    resume: Resume
    baselines: Baselines  # what the validation diagnostics compare with
    card: dict  # what the model cards state besides the training so far (pretrain/card.py)
    heads_at_prior: list[str]  # the heads whose output bias started at their prior (head_bias_init)

    @property
    def uses_targets(self) -> bool:
        """MLSM targets read from the target shards (not made online)."""
        return self.target_record is not None


def build(rank: int, world: int, device: torch.device, paths: SimpleNamespace, params: dict) -> Setup:
    params = {**option_defaults("pretrain_options"), **params}  # for keys a caller outside the workflow left out
    manifest = read_verified(paths.corpus_manifest, [*paths.corpus_shards, *filter(None, [paths.validation])])
    verify_model(paths.teacher_model, paths.teacher_summary)
    tokenizer = load_tokenizer(manifest["tokenizer"])
    trains = objective(params["objective"]).trains
    online = build_online_targets(paths, params, device, manifest)
    target_record = read_target_record(paths, params) if online is None else None
    phases = read_phase_records(paths, params, manifest, target_record is not None) if trains else {}
    stream = build_stream(paths, params, manifest, world, target_record is not None, phases) if trains else None
    model, forward = build_model(params, tokenizer, manifest, device, world)
    teacher = build_kd_teacher(params, device, manifest)
    optimizer = scheduler = None
    if trains:
        optimizer = adamw(model, params["learning_rate"], params["weight_decay"],
                          exempt_biases_and_norms=not params["decay_biases_and_norms"], fused=device.type == "cuda")
        scheduler = warmup_then_decay(optimizer, params["max_steps"], params["warmup_fraction"], params["lr_schedule"],
                                      params.get("warmup_steps"))
    # The tokens that are never a label (the special ones masking leaves out) have no share of the prior.
    base = baselines(paths.token_counts, unmaskable_ids(tokenizer, params), (target_record or {}).get("atom_usage"))
    heads_at_prior = start_heads(model, base, params)
    resume = Resume(paths.resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY], "world_size": world,
                                       "targets": target_record[CHECKSUM_KEY] if target_record else None,
                                       "phases": [[p[1][CHECKSUM_KEY], p[3] and p[3][CHECKSUM_KEY]]
                                                  for p in phases.values()],
                                       "dictionary": online.record[CHECKSUM_KEY] if online else None},
                    writer=rank == 0, interval=paths.checkpoint_seconds, stops=False)
    facts = card.facts(paths, params, manifest, target_record, world)
    return Setup(rank, world, device, paths, params, manifest, tokenizer, online, target_record, stream, model,
                 forward, teacher, optimizer, scheduler, resume, base, facts, heads_at_prior)


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


def read_phase_records(paths, params: dict, manifest: dict, with_targets: bool) -> dict[int, tuple]:
    """For each other length of the seq_len_schedule: (its corpus shards, its corpus record, its target shards,
    their record), verified. The workflow passes them length after length in the order of phase_lengths."""
    lengths = phase_lengths(params, manifest["params"]["max_seq_len"])
    shards, manifests = paths.phase_shards or [], paths.phase_manifests or []
    targets, target_manifests = paths.phase_target_shards or [], paths.phase_target_manifests or []
    per_length = len(paths.corpus_shards)
    if len(manifests) != len(lengths) or len(shards) != per_length * len(lengths) or (
            with_targets and (len(target_manifests) != len(lengths) or len(targets) != len(shards))):
        raise StageError(f"seq_len_schedule lengths {lengths} need the corpus shards (--phase-shards, "
                         f"--phase-manifests){' and their targets' if with_targets else ''} at each length: got "
                         f"{len(shards)} shards, {len(manifests)} records")
    phases = {}
    for number, length in enumerate(lengths):
        group = slice(number * per_length, (number + 1) * per_length)
        record = read_verified(manifests[number], shards[group])
        if record["params"]["max_seq_len"] != length or record["tokenizer_fingerprint"] != \
                manifest["tokenizer_fingerprint"]:
            raise StageError(f"{manifests[number]} is not the corpus packed at length {length} with the corpus "
                             f"tokenizer (it has max_seq_len {record['params']['max_seq_len']})")
        target_record = read_verified(target_manifests[number], targets[group]) if with_targets else None
        phases[length] = (shards[group], record, targets[group] if with_targets else None, target_record)
    return phases


def build_stream(paths, params: dict, manifest: dict, world: int, with_targets: bool,
                 phases: dict[int, tuple]) -> PhasedStream:
    main = manifest["params"]["max_seq_len"]
    corpora = {main: (paths.corpus_shards, manifest, paths.target_shards if with_targets else None), **{
        length: (shards, record, targets) for length, (shards, record, targets, _) in phases.items()}}
    streams = {}
    for length, (shards, record, targets) in corpora.items():
        sizes = {Path(s["path"]).name: s["sequences"] for s in record["shards"]}
        # The corpus's own length keeps the plain seed: a run without a schedule draws what it always drew.
        seed = params["seed"] if length == main else (params["seed"], PHASE_STREAM, length)
        stream = BatchStream(shards, targets, [sizes[Path(p).name] for p in shards], seed)
        if stream.total < params["batch_size"] * world:
            raise StageError(f"the corpus at length {length} has {stream.total} sequences, fewer than one batch of "
                             f"{params['batch_size']} x {world} processes; lower batch_size")
        streams[length] = stream
    return PhasedStream(streams, phase_plan(params, main), params["grad_accumulation"])


def build_model(params: dict, tokenizer, manifest: dict, device, world: int) -> tuple[Student, torch.nn.Module]:
    """The student and what runs its forward pass: fresh weights of a preset or a model source's config, or
    (`init`) a checkpoint's, to continue pre-training it. Fresh weights depend on the seed and shape only: the
    same on every rank, and the same encoder for every objective (the control `none` included), whatever was
    drawn before (an online student's teacher, say)."""
    atoms = params.get("atoms") if objective(params["objective"]).mlsm_head else None
    max_len = model_max_length(params, manifest["params"]["max_seq_len"])
    if params["init"]:
        tied = objective(params["objective"]).mlsm_head and params["mlsm_head"] == "tied"
        backbone = load_backbone(params, max_len, objective(params["objective"]).mlm_head or tied, manifest)
        model = Student(backbone.config, params["objective"], atoms, params["mlsm_head"], backbone)
        if model.mlsm_head is not None and not model.load_mlsm_head(resolve_model_source(params["init"])):
            log.info("init %s has no %s MLSM head of %s atoms: the student's starts fresh", params["init"],
                     params["mlsm_head"], atoms)
    else:
        torch.manual_seed(params["seed"])
        model = Student(build_config(params, tokenizer, max_len), params["objective"], atoms, params["mlsm_head"])
    model.to(device)
    if params.get("compile"):  # a control's params leave it out: it runs no update
        model.compile_encoder()
    if world == 1:
        return model, model
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)


def start_heads(model: Student, base: Baselines, params: dict) -> list[str]:
    """head_bias_init prior: a fresh student's heads start at their priors (Student.start_heads_at_priors).
    Returns the heads that did."""
    if params["head_bias_init"] != "prior" or params["init"]:
        return []
    wanted = {"mlm": model.objective.mlm_head, "mlsm": model.mlsm_head is not None}
    done = model.start_heads_at_priors(base.unigram_log_probs, base.mean_target_log_probs)
    missing = [head for head, has in wanted.items() if has and head not in done]
    if missing:  # no token counts (a caller outside the workflow), or online targets (no target record)
        log.info("head_bias_init prior: no prior known for the %s head, which starts at zero", " and ".join(missing))
    return done


def build_kd_teacher(params: dict, device, manifest: dict) -> KdTeacher | None:
    """The teacher whose logits a loss part reads in every step (kd), if the objective has one."""
    if not any(LOSS_PARTS[part].teacher for part in objective(params["objective"]).losses):
        return None
    return KdTeacher(params["teacher_source"], device, manifest, params["teacher_trust_remote_code"])
