"""Stage 5, pretrain_student: a BERT-style student from scratch with one of four objectives.

- mlsm: the student gets K extra output units; loss = KL(target || softmax(units)) on the masked
  positions, averaged over masked positions that have a target (the reference's batchmean).
- mlm: cross-entropy over the vocabulary on the masked positions.
- kd: KL(softmax(teacher MLM logits / T) || softmax(student logits / T)) * T^2 on the masked positions;
  the teacher sees the same masked input and must have an MLM head.
- mlsm+mlm: mlsm + mlm_weight * mlm.
Heads compute logits only for the masked positions. The model is saved with save_pretrained (it
loads with AutoModel; with AutoModelForMaskedLM too when it has an MLM head); the MLSM head is
saved beside it as mlsm_head.safetensors. Started by torchrun (the rule does so when a student has
gpus > 1, see pipeline/launch.py), it trains data-parallel: every rank takes its own batch_size rows
of each global batch, gradients are averaged across ranks, rank 0 saves.

    python -m pipeline.pretrain --corpus-shards s0.parquet ... [--target-shards t0.parquet ...] \
        --corpus-manifest m.json --out-model model/ --summary summary.json [--resume-dir state/] --params '{...}'
(the target shards' manifest.json is read from beside them)
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contract
from .common import (StageError, load_tokenizer, log, parser, pick_device, resolve_model_source, run_stage,
                     seed_everything, set_cpu_threads)
from .corpus import read_shard
from .integrity import CHECKSUM_KEY, atomic_output, file_entries, read_verified, write_json, write_record
from .resume import Resume, load_model_and_optimizer, model_and_optimizer_tensors
from .targets import read_targets

PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
USES_MLSM = {"mlsm", "mlsm+mlm"}
USES_MLM_HEAD = {"mlm", "kd", "mlsm+mlm"}
LOG_EVERY = 10


# ---- data --------------------------------------------------------------------------------------

class PretrainData:
    """Sequences (and, for MLSM, their per-position targets) held in memory."""

    def __init__(self, corpus_shards: list[str], target_shards: list[str] | None, target_manifest: str | None):
        tables = [read_shard(p) for p in corpus_shards]
        self.input_ids = [np.asarray(s, np.int64) for t in tables for s in t["input_ids"].to_pylist()]
        self.type_ids = [np.asarray(s, np.int64) for t in tables for s in t["token_type_ids"].to_pylist()]
        self.atom_ids = self.weights = self.target_record = None
        if target_shards:
            self.target_record = read_verified(target_manifest, target_shards)
            targets = [read_targets(p) for p in target_shards]
            corpus_ids = np.concatenate([t["seq_id"].to_numpy() for t in tables])
            target_ids = np.concatenate([t["seq_id"].to_numpy() for t in targets])
            if not np.array_equal(corpus_ids, target_ids):
                raise StageError("target shards are not aligned with the corpus shards (seq_id mismatch)")
            self.atom_ids = [np.asarray(a, np.int64) for t in targets for a in t["atom_ids"].to_pylist()]
            self.weights = [np.asarray(w, np.float32) for t in targets for w in t["weights"].to_pylist()]
            for i, seq in enumerate(self.input_ids):
                if len(self.atom_ids[i]) % len(seq):
                    raise StageError(f"target row {i} does not match its sequence length")
            self.top_k = len(self.atom_ids[0]) // len(self.input_ids[0])

    def __len__(self) -> int:
        return len(self.input_ids)


def mask_batch(data: PretrainData, rows: np.ndarray, tokenizer, params: dict, generator: torch.Generator) -> dict:
    """Pad a batch and choose masked positions; return model inputs and per-masked-position labels."""
    width = max(len(data.input_ids[r]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    attention = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        n = len(data.input_ids[r])
        ids[b, :n] = torch.from_numpy(data.input_ids[r])
        types[b, :n] = torch.from_numpy(data.type_ids[r])
        attention[b, :n] = 1
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (attention == 0)
    chosen = (torch.rand(ids.shape, generator=generator) < params["mask_fraction"]) & ~special
    if not chosen.any():  # a batch must predict something
        candidates = torch.nonzero(~special)
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)][0]
        chosen[pick[0], pick[1]] = True
    labels = ids[chosen].clone()
    masked = ids.clone()
    if params["mask_strategy"] == "all_mask":
        masked[chosen] = tokenizer.mask_token_id
    else:  # BERT: 80 % [MASK], 10 % random token, 10 % unchanged
        roll = torch.rand(ids.shape, generator=generator)
        masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
        random_tokens = torch.randint(len(tokenizer), ids.shape, generator=generator)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = random_tokens[swap]
    batch = {"input_ids": masked, "token_type_ids": types, "attention_mask": attention,
             "masked": chosen, "labels": labels}
    if data.atom_ids is not None:
        k = data.top_k
        atom_rows, weight_rows = [], []
        for b, r in enumerate(rows):
            positions = torch.nonzero(chosen[b]).flatten().numpy()
            atom_rows.append(data.atom_ids[r].reshape(-1, k)[positions])
            weight_rows.append(data.weights[r].reshape(-1, k)[positions])
        batch["target_atoms"] = torch.from_numpy(np.concatenate(atom_rows))
        batch["target_weights"] = torch.from_numpy(np.concatenate(weight_rows))
    return batch


# ---- model -------------------------------------------------------------------------------------

class MlsmHead(torch.nn.Module):
    """Transform + K output units, shaped like BERT's MLM head."""

    def __init__(self, hidden: int, atoms: int, eps: float = 1e-12):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden, eps=eps)
        self.decoder = torch.nn.Linear(hidden, atoms)
        for linear in (self.dense, self.decoder):
            torch.nn.init.normal_(linear.weight, std=0.02)
            torch.nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class Student(torch.nn.Module):
    def __init__(self, config, objective: str, atoms: int | None):
        from transformers import BertForMaskedLM, BertModel

        super().__init__()
        self.objective = objective
        self.backbone = BertForMaskedLM(config) if objective in USES_MLM_HEAD else BertModel(config, add_pooling_layer=False)
        self.mlsm_head = MlsmHead(config.hidden_size, atoms, config.layer_norm_eps) if objective in USES_MLSM else None

    @property
    def encoder(self):
        return self.backbone.bert if hasattr(self.backbone, "bert") else self.backbone

    def forward(self, batch: dict) -> dict:
        hidden = self.encoder(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = hidden[batch["masked"]]  # heads run on masked positions only
        out = {}
        if self.objective in USES_MLM_HEAD:
            out["mlm_logits"] = self.backbone.cls(hidden)
        if self.mlsm_head is not None:
            out["mlsm_logits"] = self.mlsm_head(hidden)
        return out

    def save(self, directory: Path, tokenizer, metadata: dict) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if self.mlsm_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.mlsm_head.state_dict().items()}
            save_file(state, str(directory / "mlsm_head.safetensors"), metadata={"atoms": str(state["decoder.bias"].numel())})
        write_json(directory / "pretraining.json", metadata)


def build_config(params: dict, tokenizer, max_len: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, max_len),
                      pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **PRESETS[params["size"]])


# ---- losses ------------------------------------------------------------------------------------

def mlsm_loss(logits: torch.Tensor, atoms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) with sparse targets, mean over positions that have a target."""
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, atoms)
    entropy_term = torch.where(weights > 0, weights * weights.clamp_min(1e-30).log(), torch.zeros_like(weights))
    per_position = (entropy_term - weights * log_probs).sum(1)
    has_target = weights.sum(1) > 0
    return per_position[has_target].sum() / has_target.sum().clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


class KdTeacher:
    def __init__(self, source: str, device: torch.device, corpus_manifest: dict, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        from .teacher import _check_vocabulary

        path = resolve_model_source(source)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _check_vocabulary(source, path, config, corpus_manifest, AutoTokenizer, trust_remote_code)
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
        missing_head = [k for k in info["missing_keys"] if k.startswith("cls.")]
        if missing_head:
            raise StageError(f"objective kd needs a teacher with an MLM head, but {source!r} has none "
                             f"(missing {missing_head[0]}, ...); use a teacher saved with BertForMaskedLM")
        self.model = model.eval().to(device)

    @torch.inference_mode()
    def logits(self, batch: dict) -> torch.Tensor:
        hidden = self.model.bert(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
        return self.model.cls(hidden[batch["masked"]])


def compute_loss(out: dict, batch: dict, params: dict, teacher: KdTeacher | None) -> tuple[torch.Tensor, dict]:
    objective, parts = params["objective"], {}
    if objective in USES_MLSM:
        parts["mlsm"] = mlsm_loss(out["mlsm_logits"], batch["target_atoms"], batch["target_weights"])
    if objective in ("mlm", "mlsm+mlm"):
        parts["mlm"] = F.cross_entropy(out["mlm_logits"].float(), batch["labels"])
    if objective == "kd":
        parts["kd"] = kd_loss(out["mlm_logits"], teacher.logits(batch), params["kd_temperature"])
    if objective == "mlsm+mlm":
        total = parts["mlsm"] + params["mlm_weight"] * parts["mlm"]
    else:
        total = parts[objective]
    return total, {k: v.item() for k, v in parts.items()}


# ---- training ----------------------------------------------------------------------------------

def linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_ranks_sum(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(total)
    return {k: float(v) for k, v in zip(values, total)}


def all_ranks_mean(values: dict[str, float], world: int) -> dict[str, float]:
    return {k: v / world for k, v in all_ranks_sum(values, world).items()}


def _check_ranks_agree(model: torch.nn.Module, world: int) -> None:
    """Data parallelism keeps every rank's weights equal; a checkpoint must not hide it if they drift."""
    checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    mean = all_ranks_mean({"checksum": checksum}, world)["checksum"]
    if abs(mean - checksum) > 1e-6 * abs(checksum):
        raise StageError(f"data-parallel ranks hold different weights (checksum {checksum} vs mean {mean})")


@dataclass
class Paths:
    corpus_shards: list[str]
    corpus_manifest: str
    out_model: str
    summary: str
    target_shards: list[str] = field(default_factory=list)
    resume_dir: str | None = None

    @property
    def target_manifest(self) -> str | None:
        """The target stage's record lies beside its shards (contract.TARGET_MANIFEST)."""
        if not self.target_shards:
            return None
        return str(Path(self.target_shards[0]).parent / Path(contract.TARGET_MANIFEST).name)


def train(paths: Paths, params: dict) -> dict:
    """Pre-train one student; under torchrun, data-parallel (each rank takes its slice of every batch)."""
    set_cpu_threads()
    seed_everything(params["seed"])
    rank, world, device = init_distributed(params.get("device", "auto"))
    try:
        return _train(rank, world, device, paths, params)
    finally:
        if world > 1:
            dist.destroy_process_group()


class TrainingState:
    """Everything an update depends on, so that a resumed run continues exactly where a killed one stopped."""

    def __init__(self, model, optimizer, scheduler, generator, rng, order, rank, world):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.generator, self.rng, self.order, self.rank, self.world = generator, rng, order, rank, world
        self.step, self.cursor, self.tokens_seen, self.seconds, self.history = 0, 0, 0, 0.0, []

    def _rank_rngs(self) -> dict[str, torch.Tensor]:
        rngs = {"mask": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rngs["cuda"] = torch.cuda.get_rng_state()
        return rngs

    def save(self, resume: Resume) -> None:
        """Collective under torchrun: every rank sends its random states, rank 0 writes."""
        mine = {"rngs": self._rank_rngs(), "tokens_seen": self.tokens_seen}
        everyone = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if self.rank != 0:
            return
        tensors, groups = model_and_optimizer_tensors(self.model, self.optimizer)
        for r, theirs in enumerate(everyone):
            tensors.update({f"rng.{r}.{k}": v for k, v in theirs["rngs"].items()})
        tensors["order"] = torch.from_numpy(self.order)
        meta = {"optimizer_groups": groups, "scheduler": self.scheduler.state_dict(),
                "numpy_rng": self.rng.bit_generator.state, "cursor": self.cursor, "seconds": self.seconds,
                "history": self.history, "tokens_seen": [theirs["tokens_seen"] for theirs in everyone]}
        resume.save_state(self.step, meta, tensors)

    def load(self, saved: tuple[dict, dict]) -> None:
        meta, tensors = saved
        load_model_and_optimizer(self.model, self.optimizer, tensors, meta["optimizer_groups"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.generator.set_state(tensors[f"rng.{self.rank}.mask"])
        torch.set_rng_state(tensors[f"rng.{self.rank}.torch"])
        if f"rng.{self.rank}.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.{self.rank}.cuda"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.order = tensors["order"].numpy()
        self.step, self.cursor, self.seconds = meta["unit"], meta["cursor"], meta["seconds"]
        self.history, self.tokens_seen = meta["history"], meta["tokens_seen"][self.rank]


def _checkpoint_due(resume: Resume, world: int) -> bool:
    """Rank 0's clock decides, so that every rank joins the collective save."""
    due = torch.tensor([resume.due()], dtype=torch.uint8)
    if world > 1:
        dist.broadcast(due, src=0)
    return bool(due.item())


def _train(rank, world, device, paths: Paths, params):
    manifest = read_verified(paths.corpus_manifest, paths.corpus_shards)
    tokenizer = load_tokenizer(manifest["tokenizer"])
    objective = params["objective"]
    uses_targets = objective in USES_MLSM
    data = PretrainData(paths.corpus_shards, paths.target_shards if uses_targets else None, paths.target_manifest)
    batch_size, accumulation = params["batch_size"], params["grad_accumulation"]
    if len(data) < batch_size * world:
        raise StageError(f"the corpus has {len(data)} sequences, fewer than one batch of {batch_size} x {world} "
                         f"processes; lower batch_size")
    atoms = params.get("atoms") if uses_targets else None
    config = build_config(params, tokenizer, manifest["params"]["max_seq_len"])
    model = Student(config, objective, atoms).to(device)  # same seed on every rank: same initial weights
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    teacher = None
    if objective == "kd":
        teacher = KdTeacher(params["teacher_source"], device, manifest, params["teacher_trust_remote_code"])

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": params["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=params["learning_rate"], fused=device.type == "cuda")
    total, warmup = params["max_steps"], max(1, int(params["warmup_fraction"] * params["max_steps"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    generator = torch.Generator().manual_seed(params["seed"] + 1_000_003 * rank)  # masks differ across ranks
    rng = np.random.default_rng(params["seed"])  # the batch order is the same on every rank
    state = TrainingState(model, optimizer, scheduler, generator, rng, rng.permutation(len(data)), rank, world)

    key = {"params": params, "corpus": manifest[CHECKSUM_KEY], "world_size": world,
           "targets": data.target_record[CHECKSUM_KEY] if uses_targets else None}
    resume = Resume(paths.resume_dir, key, writer=rank == 0)
    if world > 1:
        dist.barrier()  # rank 0 has discarded stale state before anyone reads it
    saved = resume.load_state()
    if saved is not None:
        state.load(saved)

    global_batch, started = batch_size * world, time.perf_counter() - state.seconds
    model.train()
    while state.step < total:
        step, step_parts = state.step, {}
        for micro in range(accumulation):
            if state.cursor + global_batch > len(state.order):  # a new epoch: new order, new masks
                state.order, state.cursor = rng.permutation(len(data)), 0
            rows = state.order[state.cursor + rank * batch_size : state.cursor + (rank + 1) * batch_size]
            state.cursor += global_batch
            batch = {k: v.to(device) for k, v in mask_batch(data, rows, tokenizer, params, generator).items()}
            # Gradients are averaged across ranks once per update, on its last micro-batch.
            sync = world == 1 or micro == accumulation - 1
            with (nullcontext() if sync else trained.no_sync()), autocast:
                loss, parts = compute_loss(trained(batch), batch, params, teacher)
            (loss / accumulation).backward()
            state.tokens_seen += int(batch["attention_mask"].sum())
            for k, v in parts.items():
                step_parts[k] = step_parts.get(k, 0.0) + v / accumulation
        if not all(math.isfinite(v) for v in step_parts.values()):
            raise StageError(f"loss became non-finite at step {step} on rank {rank}: {step_parts}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), params["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0 or step == total - 1:
            step_parts = all_ranks_mean(step_parts, world)
            state.history.append({"step": step + 1, **step_parts, "lr": scheduler.get_last_lr()[0]})
            if rank == 0:
                log.info("step %d/%d %s", step + 1, total, " ".join(f"{k}={v:.4f}" for k, v in step_parts.items()))
        state.step, state.seconds = step + 1, time.perf_counter() - started
        if state.step < total and _checkpoint_due(resume, world):
            state.save(resume)
    seconds = time.perf_counter() - started
    tokens_seen = int(all_ranks_sum({"tokens": float(state.tokens_seen)}, world)["tokens"])
    if world > 1:
        _check_ranks_agree(model, world)

    metadata = {"format_version": contract.FORMAT_VERSION["pretrain"], "params": params, "steps": total,
                "objective": objective, "atoms": atoms, "tokens_seen": tokens_seen, "world_size": world}
    summary = {**metadata, "seconds": seconds, "tokens_per_second": tokens_seen / seconds,
               "parameters": sum(p.numel() for p in model.parameters()), "final": state.history[-1],
               "history": state.history}
    if rank == 0:
        with atomic_output(paths.out_model) as tmp:
            tmp.mkdir()
            model.save(tmp, tokenizer, metadata)
        summary["files"] = file_entries(Path(paths.summary).parent, [paths.out_model])
        write_record(paths.summary, summary)
        resume.finish()
    if world > 1:
        dist.barrier()  # no rank exits (and lets torchrun end the job) before rank 0 has saved
    return summary


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--corpus-shards", nargs="+", required=True)
    p.add_argument("--target-shards", nargs="*", default=[])
    p.add_argument("--corpus-manifest", required=True)
    p.add_argument("--out-model", required=True)
    p.add_argument("--summary", required=True, help="the run's record, with the checksums of the model's files")
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    args = p.parse_args(argv)
    if args.params["objective"] in USES_MLSM and not args.target_shards:
        raise StageError(f"objective {args.params['objective']} needs --target-shards")
    train(Paths(args.corpus_shards, args.corpus_manifest, args.out_model, args.summary, args.target_shards,
                args.resume_dir), args.params)


if __name__ == "__main__":
    run_stage(main)
