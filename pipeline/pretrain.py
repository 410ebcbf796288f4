"""Stage 5, pretrain_student: a BERT-style student from scratch with one of four objectives.

- mlsm: the student gets K extra output units; loss = KL(target || softmax(units)) on the masked
  positions, averaged over masked positions that have a target (the reference's batchmean).
- mlm: cross-entropy over the vocabulary on the masked positions.
- kd: KL(softmax(teacher MLM logits / T) || softmax(student logits / T)) * T^2 on the masked positions;
  the teacher sees the same masked input and must have an MLM head.
- mlsm+mlm: mlsm + mlm_weight * mlm.
MLSM targets come from the precomputed target shards (targets: precomputed) or, to reproduce and time
the reference recipe, are made in the step (targets: online: teacher forward + lasso, see OnlineTargets).
Heads compute logits only for the masked positions. Losses are means over each global micro-batch
(batch_size x processes sequences); an update averages grad_accumulation of them.

Data: the corpus shards and their aligned target shards are read as flat arrays, two shards in memory
at most; micro-batch m is a pure function of m (the BatchStream's seeded order; masks drawn from
(seed, m)), built a few ahead in a background thread. So a resumed run needs only its update count,
and every process of a torchrun job builds the same global batch and trains on its own rows of it:
a run on N processes follows the same loss curve as one process with N times the batch (dropout aside).

Outputs: the final model (save_pretrained: loads with AutoModel; with AutoModelForMaskedLM too when it
has an MLM head; the MLSM head beside it as mlsm_head.safetensors), the models saved after
checkpoint_fractions of the updates (checkpoints/step{N}/, kept in the resume directory until the end
so that a killed run keeps them), and the record. The training log (losses, lr, grad norm, masked
tokens, tokens/s, MFU on known GPUs, validation MLSM and MLM losses at each save) goes to the record's history,
a CSV, TensorBoard if installed, and the log (a progress bar on a terminal). A non-finite loss stops
the run; the state before that update is saved. SIGTERM (a SLURM preemption or time limit) saves the
state at the end of the update in progress and stops; a rerun resumes from it.

    python -m pipeline.pretrain --corpus-shards s0.parquet ... [--target-shards t0.parquet ...] \
        --corpus-manifest m.json [--validation validation.parquet] --out-model model/ \
        [--out-checkpoints checkpoints/] --summary summary.json [--metrics-csv log.csv] \
        [--tensorboard-dir tb/] [--resume-dir state/] --params '{...}'
(the target shards' manifest.json is read from beside them)
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contract
from .config import checkpoint_steps
from .common import (StageError, load_tokenizer, log, parser, pick_device, resolve_model_source, run_stage,
                     seed_everything, set_cpu_threads)
from .corpus import flat_list, pad_rows, read_shard
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
LOG_EVERY = int(os.environ.get("MLSM_LOG_EVERY", "10"))  # updates between history entries (not a param: no rerun)
VALIDATION_MASKS = 1  # the held-out sequences' masks come from (seed, VALIDATION_MASKS, row)


# ---- data --------------------------------------------------------------------------------------

class Shard:
    """One corpus shard (and its aligned target shard) as flat arrays: sequence i is
    tokens[offsets[i]:offsets[i+1]], and token t's target is atoms[t], weights[t] ([k] each)."""

    def __init__(self, corpus_path: str, target_path: str | None = None):
        table = read_shard(corpus_path)
        offsets, tokens = flat_list(table, "input_ids")
        _, types = flat_list(table, "token_type_ids")
        # A sliced list array keeps its parent's values: index from its first row.
        self.tokens, self.types = tokens[offsets[0]:offsets[-1]], types[offsets[0]:offsets[-1]]
        self.offsets = offsets - offsets[0]
        self.atoms = self.weights = None
        if target_path is not None:
            self._add_targets(target_path, table["seq_id"].to_numpy(), corpus_path)

    def _add_targets(self, target_path: str, seq_ids: np.ndarray, corpus_path: str) -> None:
        targets = read_targets(target_path)
        if not np.array_equal(seq_ids, targets["seq_id"].to_numpy()):
            raise StageError(f"target shard {target_path} is not aligned with corpus shard {corpus_path} "
                             "(seq_id mismatch)")
        offsets, atoms = flat_list(targets, "atom_ids")
        _, weights = flat_list(targets, "weights")
        if len(self.tokens) == 0:  # an empty validation split
            self.atoms, self.weights = np.zeros((0, 1), atoms.dtype), np.zeros((0, 1), weights.dtype)
            return
        k = (offsets[-1] - offsets[0]) // len(self.tokens)
        if k < 1 or not np.array_equal(offsets - offsets[0], self.offsets * k):
            raise StageError(f"target shard {target_path} does not hold top-k targets for every position "
                             f"of corpus shard {corpus_path}")
        self.atoms = atoms[offsets[0]:offsets[-1]].reshape(-1, k)
        self.weights = weights[offsets[0]:offsets[-1]].reshape(-1, k)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded(self, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat token index [b, width], -1 in padding), and the ids and type ids at those indices."""
        index, ids = pad_rows(self.offsets, self.tokens, rows, 0, width)
        return index, ids, pad_rows(self.offsets, self.types, rows, 0, width)[1]


class BatchStream:
    """The run's global micro-batches, each a pure function of its index.

    Epoch e visits the shards in an order drawn from (seed, e) and each shard's rows in an order drawn
    from (seed, e, shard); micro-batch m holds rows m*G .. (m+1)*G - 1 of that endless stream (G, the
    global batch: batch_size x processes) and its masks are drawn from (seed, m). So a resumed run needs
    only the index of its next micro-batch, and every process builds the same global batch (and takes its
    own rows of it), whatever their number. Three shards at most are in memory: two in use, and the
    next one, read in the background."""

    def __init__(self, corpus_shards: list[str], target_shards: list[str] | None, sizes: list[int], seed: int):
        if target_shards and len(target_shards) != len(corpus_shards):
            raise StageError(f"{len(target_shards)} target shards for {len(corpus_shards)} corpus shards")
        self.corpus_shards, self.target_shards = corpus_shards, target_shards or None
        self.sizes, self.seed, self.total = np.asarray(sizes), seed, int(np.sum(sizes))
        self._cache: dict[int, Shard] = {}
        self._loading: dict[int, Future] = {}
        self._reader = ThreadPoolExecutor(1)  # reads the next shard while batches come from this one
        self._orders: dict[tuple, np.ndarray] = {}

    def shard(self, index: int) -> Shard:
        if index not in self._cache:
            future = self._loading.pop(index, None) or self._reader.submit(self._read, index)
            while len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = future.result()
        return self._cache[index]

    def _read(self, index: int) -> Shard:
        shard = Shard(self.corpus_shards[index], self.target_shards[index] if self.target_shards else None)
        if len(shard) != self.sizes[index]:
            raise StageError(f"corpus shard {self.corpus_shards[index]} has {len(shard)} sequences, its "
                             f"manifest says {self.sizes[index]}")
        return shard

    def _read_ahead(self, start: int) -> None:
        """Start reading the shard that holds row `start` of the stream, unless it is at hand."""
        index = self._locate(start)[0]
        if index not in self._cache and index not in self._loading:
            self._loading[index] = self._reader.submit(self._read, index)

    def _order(self, *key) -> np.ndarray:
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            n = len(self.sizes) if len(key) == 1 else self.sizes[key[1]]
            self._orders[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._orders[key]

    def _locate(self, start: int) -> tuple[int, int, int]:
        """(shard index, its row order's position, epoch) of row `start` of the stream."""
        epoch, offset = divmod(start, self.total)
        shard_order = self._order(epoch)
        ends = np.cumsum(self.sizes[shard_order])
        slot = int(np.searchsorted(ends, offset, side="right"))
        shard = int(shard_order[slot])
        return shard, int(offset - (ends[slot] - self.sizes[shard])), epoch

    def rows(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Rows start .. start+count-1 of the stream, as (shard index, row indices) pieces."""
        pieces = []
        while count > 0:
            shard, first, epoch = self._locate(start)
            take = min(count, int(self.sizes[shard] - first))
            pieces.append((shard, self._order(epoch, shard)[first:first + take]))
            start, count = start + take, count - take
        self._read_ahead(start)
        return pieces


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, params: dict, vocab_size: int, mask_id: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input, chosen positions): mask_fraction of the ordinary tokens, all replaced by [MASK]
    (the reference) or BERT's 80 % [MASK] / 10 % random token / 10 % unchanged."""
    chosen = (torch.rand(ids.shape, generator=generator) < params["mask_fraction"]) & ~special
    if not chosen.any():  # a batch must predict something
        candidates = torch.nonzero(~special)
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)][0]
        chosen[pick[0], pick[1]] = True
    masked = ids.clone()
    if params["mask_strategy"] == "all_mask":
        masked[chosen] = mask_id
    else:
        roll = torch.rand(ids.shape, generator=generator)
        masked[chosen & (roll < 0.8)] = mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return masked, chosen


def micro_batch(stream: BatchStream, index: int, global_rows: int, tokenizer, params: dict) -> dict:
    """Global micro-batch `index` of the stream (its masks drawn from (seed, index))."""
    pieces = [(stream.shard(s), rows) for s, rows in stream.rows(index * global_rows, global_rows)]
    return make_batch(pieces, tokenizer, params, mask_seed=(params["seed"], index))


def make_batch(pieces: list[tuple[Shard, np.ndarray]], tokenizer, params: dict, mask_seed: tuple) -> dict:
    """Padded inputs, masks and, per masked position, its label and target, for rows of shards.

    Also holds the global counts the losses divide by (masked positions; those with a target), so that
    every process's share of the loss adds up to the mean over the whole global batch."""
    width = max(int((shard.offsets[rows + 1] - shard.offsets[rows]).max()) for shard, rows in pieces)
    padded = [shard.padded(rows, width) for shard, rows in pieces]
    flat_index = np.concatenate([p[0] for p in padded])
    ids = torch.from_numpy(np.concatenate([p[1] for p in padded]).astype(np.int64))
    types = torch.from_numpy(np.concatenate([p[2] for p in padded]).astype(np.int64))
    attention = torch.from_numpy(flat_index >= 0)
    ids[~attention] = tokenizer.pad_token_id
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | ~attention
    generator = torch.Generator().manual_seed(int(np.random.default_rng(mask_seed).integers(2**62)))
    masked, chosen = mask_tokens(ids, special, params, len(tokenizer), tokenizer.mask_token_id, generator)
    batch = {"input_ids": masked, "token_type_ids": types, "attention_mask": attention.long(), "masked": chosen,
             "labels": ids[chosen], "lengths": attention.sum(1), "masked_count": chosen.sum()}
    if pieces[0][0].atoms is not None:
        atoms, weights, row = [], [], 0
        for (shard, rows), (piece_index, _, _) in zip(pieces, padded):
            where = piece_index[chosen[row:row + len(rows)].numpy()]
            atoms.append(shard.atoms[where])
            weights.append(shard.weights[where])
            row += len(rows)
        batch["target_atoms"] = torch.from_numpy(np.concatenate(atoms).astype(np.int64))
        batch["target_weights"] = torch.from_numpy(np.concatenate(weights).astype(np.float32))
        batch["with_target"] = (batch["target_weights"].sum(1) > 0).sum()
    return batch


def rank_share(batch: dict, rank: int, world: int) -> dict:
    """This process's rows of a global micro-batch (padding cut to their longest sequence)."""
    if world == 1:
        return batch
    rows = len(batch["input_ids"]) // world
    first, last = rank * rows, (rank + 1) * rows
    per_row = batch["masked"].sum(1)
    positions = slice(int(per_row[:first].sum()), int(per_row[:last].sum()))
    width = int(batch["lengths"][first:last].max())
    share = {k: batch[k][first:last, :width] for k in ("input_ids", "token_type_ids", "attention_mask", "masked")}
    share["labels"], share["lengths"] = batch["labels"][positions], batch["lengths"][first:last]
    for k in ("target_atoms", "target_weights"):
        if k in batch:
            share[k] = batch[k][positions]
    for k in ("with_target", "masked_count"):  # global counts, the same on every process
        if k in batch:
            share[k] = batch[k]
    return share


class Prefetcher:
    """Builds micro-batches start, start+1, ... in a background thread, a few ahead of training."""

    def __init__(self, build, start: int, pin: bool, depth: int = 4):
        import queue

        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(build, start, pin), daemon=True)
        self.thread.start()

    def _run(self, build, index: int, pin: bool) -> None:
        import queue

        while not self.stop.is_set():
            try:
                batch = build(index)
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
            except BaseException as err:  # handed to the training thread, which raises it
                batch = err
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(batch, BaseException):
                return
            index += 1

    def next(self) -> dict:
        batch = self.queue.get()
        if isinstance(batch, BaseException):
            raise batch
        return batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


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

    def compile_encoder(self) -> None:
        """torch.compile the encoder only: the heads see a varying number of masked positions."""
        # Not a submodule: the compiled wrapper must not add its own names to the state dict.
        object.__setattr__(self, "_encode", torch.compile(self.encoder, dynamic=True))

    def hidden(self, batch: dict) -> torch.Tensor:
        """The last layer's states at the masked positions (the only ones the heads need)."""
        encode = getattr(self, "_encode", self.encoder)
        hidden = encode(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                        attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden[batch["masked"]]

    def forward(self, batch: dict) -> dict:
        hidden = self.hidden(batch)
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
                      pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
                      hidden_dropout_prob=params["dropout"], attention_probs_dropout_prob=params["dropout"],
                      **PRESETS[params["size"]])


# ---- losses ------------------------------------------------------------------------------------
# Each returns its sum over this process's masked positions divided by a count over the global batch,
# so that the processes' shares add up to the mean over the whole global micro-batch.

def mlsm_loss(logits: torch.Tensor, atoms: torch.Tensor, weights: torch.Tensor,
              count: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || softmax(logits)) with sparse targets, summed over positions with a target / count
    (by default, their number: the reference's batchmean over masked tokens that have a target)."""
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, atoms)
    entropy_term = torch.where(weights > 0, weights * weights.clamp_min(1e-30).log(), torch.zeros_like(weights))
    total = (entropy_term - weights * log_probs).sum()  # positions without a target have zero weights
    count = (weights.sum(1) > 0).sum() if count is None else count
    return total / count.clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            count: torch.Tensor | None = None) -> torch.Tensor:
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    total = F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2
    return total / (len(student_logits) if count is None else count.clamp_min(1))


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


class OnlineTargets:
    """MLSM targets made inside the step, as the reference trainer does: the teacher's state of every
    masked token (in the unmasked input), L2-normalised, coded with the lasso solver interface that
    precompute_targets uses (settings `online`: source, layer, lambda, solver, max_iterations, tolerance,
    precision), normalised to sum 1, with no top-k cut. It costs a teacher forward and a solve per step:
    for comparison runs."""

    def __init__(self, settings: dict, device: torch.device, corpus_manifest: dict, dictionary: str, metrics: str):
        from .dictionary import load_dictionary
        from .targets import make_solver
        from .teacher import load_encoder

        self.record = read_verified(metrics, [dictionary])
        self.encoder = load_encoder(settings["source"], settings["layer"], device, corpus_manifest,
                                    settings["trust_remote_code"])
        atoms = torch.from_numpy(load_dictionary(dictionary)).float().to(device)
        if atoms.shape[0] != self.encoder.hidden_size:
            raise StageError(f"dictionary {dictionary} has atoms of size {atoms.shape[0]} but teacher "
                             f"{settings['source']!r} has hidden size {self.encoder.hidden_size}")
        self.solver = make_solver(atoms, settings)

    @torch.no_grad()
    def add_to(self, batch: dict, world: int) -> None:
        from .lasso import l2_normalise

        original = batch["input_ids"].clone()
        original[batch["masked"]] = batch["labels"]
        with self.encoder.autocast():
            hidden = self.encoder.model(input_ids=original, token_type_ids=batch["token_type_ids"],
                                        attention_mask=batch["attention_mask"]).last_hidden_state
        codes = self.solver(l2_normalise(hidden[batch["masked"]].float())).codes
        total = codes.sum(1, keepdim=True)
        batch["target_weights"] = torch.where(total > 0, codes / total.clamp_min(1e-30), codes)
        batch["target_atoms"] = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)
        count = (total.squeeze(1) > 0).sum().double()  # the losses divide by the global count
        batch["with_target"] = all_ranks_sum(count, world)


def loss_parts(out: dict, batch: dict, params: dict, teacher: KdTeacher | None) -> dict[str, torch.Tensor]:
    """This process's share of each loss the objective uses (see the note above mlsm_loss)."""
    objective, parts = params["objective"], {}
    if objective in USES_MLSM:
        parts["mlsm"] = mlsm_loss(out["mlsm_logits"], batch["target_atoms"], batch["target_weights"],
                                  batch["with_target"])
    if objective in ("mlm", "mlsm+mlm"):
        parts["mlm"] = F.cross_entropy(out["mlm_logits"].float(), batch["labels"], reduction="sum") \
            / batch["masked_count"].clamp_min(1)
    if objective == "kd":
        parts["kd"] = kd_loss(out["mlm_logits"], teacher.logits(batch), params["kd_temperature"], batch["masked_count"])
    return parts


def total_loss(parts: dict[str, torch.Tensor], params: dict) -> torch.Tensor:
    if params["objective"] == "mlsm+mlm":
        return parts["mlsm"] + params["mlm_weight"] * parts["mlm"]
    return parts[params["objective"]]


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


def all_ranks_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


def _check_ranks_agree(model: torch.nn.Module, world: int) -> None:
    """Data parallelism keeps every rank's weights equal; a checkpoint must not hide it if they drift."""
    checksum = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    mean = float(all_ranks_sum(torch.tensor([checksum], dtype=torch.float64), world)) / world
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
    out_checkpoints: str | None = None  # the models saved at checkpoint_fractions, as step{N}/
    metrics_csv: str | None = None      # the training log, rewritten at every logged step
    tensorboard_dir: str | None = None  # the same, for TensorBoard (if installed)
    validation: str | None = None       # corpus/validation.parquet: validation losses at each save
    validation_targets: str | None = None  # their targets (targets/{teacher}/validation.parquet)
    dictionary: str | None = None       # with targets: online, the dictionary and its record
    dictionary_metrics: str | None = None

    @property
    def target_manifest(self) -> str | None:
        """The target stage's record lies beside its shards (contract.TARGET_MANIFEST)."""
        if not self.target_shards:
            return None
        return str(Path(self.target_shards[0]).parent / Path(contract.TARGET_MANIFEST).name)


def train(paths: Paths, params: dict) -> dict:
    """Pre-train one student; under torchrun, data-parallel (each rank takes its rows of every batch)."""
    set_cpu_threads()
    seed_everything(params["seed"])
    rank, world, device = init_distributed(params.get("device", "auto"))
    try:
        return Trainer(rank, world, device, paths, params).run()
    finally:
        if world > 1:
            dist.destroy_process_group()


def _rng_states() -> dict[str, torch.Tensor]:
    rngs = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rngs["cuda"] = torch.cuda.get_rng_state()
    return rngs


def _set_rng_states(rngs: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rngs["torch"])
    if "cuda" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state(rngs["cuda"])


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: "Student", params: dict, seq_len: int) -> float:
    """Training FLOPs per input token: 6 x the encoder's weights, attention, and the heads, which run on
    masked positions only (the MLM decoder shares the embedding matrix, so it is counted apart)."""
    config = model.encoder.config
    encoder = sum(p.numel() for p in model.encoder.parameters()) \
        - sum(p.numel() for p in model.encoder.embeddings.parameters())
    heads = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.encoder.parameters())
    if params["objective"] in USES_MLM_HEAD:
        heads += config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * encoder + attention + 6 * heads * params["mask_fraction"]


class Trainer:
    """One student's training: model, optimizer, data position, logs, checkpoints, resume."""

    def __init__(self, rank: int, world: int, device: torch.device, paths: Paths, params: dict):
        self.rank, self.world, self.device, self.paths, self.params = rank, world, device, paths, params
        self.manifest = read_verified(paths.corpus_manifest, [*paths.corpus_shards, *filter(None, [paths.validation])])
        self.tokenizer = load_tokenizer(self.manifest["tokenizer"])
        objective = params["objective"]
        self.online = None
        if objective in USES_MLSM and params["targets"] == "online":
            self.online = OnlineTargets(params["online"], device, self.manifest, paths.dictionary,
                                        paths.dictionary_metrics)
        self.uses_targets = objective in USES_MLSM and self.online is None  # targets read from the shards
        self.target_record = None
        if self.uses_targets:
            self.target_record = read_verified(paths.target_manifest,
                                               [*paths.target_shards, *filter(None, [paths.validation_targets])])
        sizes = {Path(s["path"]).name: s["sequences"] for s in self.manifest["shards"]}
        self.stream = BatchStream(paths.corpus_shards, paths.target_shards if self.uses_targets else None,
                                  [sizes[Path(p).name] for p in paths.corpus_shards], params["seed"])
        self.global_rows = params["batch_size"] * world
        if self.stream.total < self.global_rows:
            raise StageError(f"the corpus has {self.stream.total} sequences, fewer than one batch of "
                             f"{params['batch_size']} x {world} processes; lower batch_size")
        self.atoms = params.get("atoms") if objective in USES_MLSM else None
        self.model = Student(build_config(params, self.tokenizer, self.manifest["params"]["max_seq_len"]),
                             objective, self.atoms).to(device)  # same seed on every rank: same weights
        self.forward = self.model
        if params["compile"]:
            self.model.compile_encoder()
        if world > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None)
        self.teacher = None
        if objective == "kd":
            self.teacher = KdTeacher(params["teacher_source"], device, self.manifest, params["teacher_trust_remote_code"])
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": params["weight_decay"]},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=params["learning_rate"], fused=device.type == "cuda")
        total, warmup = params["max_steps"], max(1, int(params["warmup_fraction"] * params["max_steps"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: linear_schedule(s, total, warmup))
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.step, self.tokens_seen, self.seconds, self.history = 0, 0, 0.0, []
        self.stop_requested = False
        self._validation: Shard | None = None
        self.resume = Resume(paths.resume_dir, {"params": params, "corpus": self.manifest[CHECKSUM_KEY],
                                                "world_size": world,
                                                "targets": self.target_record[CHECKSUM_KEY] if self.uses_targets else None,
                                                "dictionary": self.online.record[CHECKSUM_KEY] if self.online else None},
                             writer=rank == 0)
        # Models saved at checkpoint_fractions wait here (outside the outputs, so a killed run keeps them).
        self.saved_models = Path(paths.resume_dir or f"{paths.out_model}.checkpoints.tmp") / "models"
        self.flops_per_token = flops_per_token(self.model, params, self.manifest["params"]["max_seq_len"])
        self.peak_flops = peak_flops(device)

    # ---- state ----

    def save_state(self, rngs: dict[str, torch.Tensor] | None = None) -> None:
        """Collective under torchrun: every rank sends its random states, rank 0 writes."""
        mine = {"rngs": rngs or _rng_states(), "tokens_seen": self.tokens_seen}
        everyone = [mine]
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return
        tensors, groups = model_and_optimizer_tensors(self.model, self.optimizer)
        for r, theirs in enumerate(everyone):
            tensors.update({f"rng.{r}.{k}": v for k, v in theirs["rngs"].items()})
        meta = {"optimizer_groups": groups, "scheduler": self.scheduler.state_dict(), "seconds": self.seconds,
                "history": self.history, "tokens_seen": [theirs["tokens_seen"] for theirs in everyone]}
        self.resume.save_state(self.step, meta, tensors)

    def load_state(self) -> None:
        if self.world > 1:
            dist.barrier()  # rank 0 has discarded stale state before anyone reads it
        saved = self.resume.load_state()
        if saved is None:
            return
        meta, tensors = saved
        load_model_and_optimizer(self.model, self.optimizer, tensors, meta["optimizer_groups"])
        self.scheduler.load_state_dict(meta["scheduler"])
        _set_rng_states({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{self.rank}.")})
        self.step, self.seconds, self.history = meta["unit"], meta["seconds"], meta["history"]
        self.tokens_seen = meta["tokens_seen"][self.rank]
        if self.rank == 0:
            log.info("resuming at update %d of %d", self.step, self.params["max_steps"])

    def _checkpoint_due(self) -> tuple[bool, bool]:
        """(save now, stop after saving): rank 0's clock and stop request decide, so that every rank joins
        the collective save and stops with it."""
        decision = torch.tensor([self.resume.due() or self.stop_requested, self.stop_requested], dtype=torch.uint8)
        if self.world > 1:
            dist.broadcast(decision, src=0)
        return bool(decision[0]), bool(decision[1])

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM (SLURM's preemption or time limit, a kill): save at the end of this update, then stop."""
        if self.paths.resume_dir is None:
            raise StageError(f"stopped by signal {signum}; no resume directory was given, so no state was saved")
        self.stop_requested = True

    # ---- training ----

    def run(self) -> dict:
        self.load_state()
        params, total, accumulation = self.params, self.params["max_steps"], self.params["grad_accumulation"]
        saves = checkpoint_steps(params)
        build = lambda m: rank_share(micro_batch(self.stream, m, self.global_rows, self.tokenizer, params),
                                     self.rank, self.world)
        prefetch = Prefetcher(build, self.step * accumulation, pin=self.device.type == "cuda")
        logger = TrainingLog(self.paths, total, self.rank == 0)
        started, window = time.perf_counter() - self.seconds, Window(self.step, self.tokens_seen)
        in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop) if in_main_thread else None
        self.model.train()
        try:
            while self.step < total:
                before = _rng_states(), self.tokens_seen
                values, masked = self._update(prefetch, accumulation)
                if not all(math.isfinite(v) for v in values.values()):
                    self._stop_on_non_finite(values, *before)
                self.step, self.seconds = self.step + 1, time.perf_counter() - started
                if self.step % LOG_EVERY == 0 or self.step == total or self.step in saves:
                    self._log(logger, window, values, masked)
                if self.step in saves:
                    self._save_model(self.saved_models / f"step{self.step}")
                save, stop = self._checkpoint_due() if self.step < total else (False, False)
                if save:
                    self.save_state()
                if stop:
                    raise StageError(f"stopped by SIGTERM after update {self.step} of {total}; the state is "
                                     f"saved in {self.paths.resume_dir}, and a rerun resumes from it")
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_handler)
            prefetch.close()
            logger.close()
        return self._finish()

    def _update(self, prefetch: Prefetcher, accumulation: int) -> tuple[dict[str, float], int]:
        """One optimizer update over `accumulation` micro-batches; its global mean losses and grad norm."""
        sums, masked = {}, 0
        for micro in range(accumulation):
            cpu = prefetch.next()
            self.tokens_seen += int(cpu["lengths"].sum())
            masked += int(cpu["masked_count"])  # a global count: the same on every rank
            batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu.items()}
            if self.online is not None:
                self.online.add_to(batch, self.world)
            # Gradients are averaged across ranks once per update, on its last micro-batch.
            sync = self.world == 1 or micro == accumulation - 1
            with (nullcontext() if sync else self.forward.no_sync()), self.autocast:
                parts = loss_parts(self.forward(batch), batch, self.params, self.teacher)
            # DDP averages gradients over ranks; the shares are already parts of the global mean.
            (total_loss(parts, self.params) * (self.world / accumulation)).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params["max_grad_norm"])
        global_means = all_ranks_sum(torch.stack([*sums.values()]).float(), self.world)
        values = dict(zip(sums, global_means.tolist()))
        values["grad_norm"] = float(grad_norm)
        if all(math.isfinite(v) for v in values.values()):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return values, masked

    def _stop_on_non_finite(self, values: dict[str, float], rngs: dict[str, torch.Tensor], tokens_seen: int) -> None:
        """Save the state as it was before this update (the update was not applied), then stop."""
        where = self.paths.resume_dir
        if where:
            self.tokens_seen = tokens_seen
            self.save_state(rngs)
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise StageError(f"the loss became non-finite at update {self.step + 1} ({shown}); training stopped. "
                         + (f"The state before this update is saved in {where}: a rerun with the same params "
                            "repeats it, other params (e.g. a lower learning_rate or more warm-up) start over."
                            if where else "No resume directory was given, so no state was saved."))

    def _log(self, logger: "TrainingLog", window: "Window", values: dict[str, float], masked: int) -> None:
        seconds, tokens = window.advance(self.step, self.tokens_seen)
        tokens_all = float(all_ranks_sum(torch.tensor([float(tokens)], dtype=torch.float64), self.world))
        speed = tokens_all / max(seconds, 1e-9)
        entry = {"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0],
                 "masked_tokens": masked, "tokens_per_second": speed,
                 "mfu": speed * self.flops_per_token / (self.peak_flops * self.world) if self.peak_flops else None,
                 "seconds": round(self.seconds, 3)}
        if self.step in checkpoint_steps(self.params) or self.step == self.params["max_steps"]:
            entry.update(self._validation_losses())
        self.history.append(entry)
        logger.write(self.history, self.seconds)

    def _validation_losses(self) -> dict[str, float]:
        """Rank 0's mean losses on the held-out sequences (fixed masks): MLM for students with an MLM head,
        MLSM where the held-out sequences have precomputed targets."""
        with_mlm = self.params["objective"] in USES_MLM_HEAD
        targets = self.paths.validation_targets if self.uses_targets else None
        if not self.paths.validation or not (with_mlm or targets):
            return {}
        sums = np.zeros(4)  # mlm sum, masked tokens, mlsm sum, masked tokens with a target
        if self.rank == 0 and self._validation is None:  # read once, at the first save
            self._validation = Shard(self.paths.validation, targets)
        shard = self._validation if self.rank == 0 else None
        if shard is not None and len(shard):
            self.model.eval()
            size = self.params["batch_size"]
            with torch.no_grad(), self.autocast:
                for start in range(0, len(shard), size):
                    rows = np.arange(start, min(len(shard), start + size))
                    batch = make_batch([(shard, rows)], self.tokenizer, self.params,
                                       mask_seed=(self.params["seed"], VALIDATION_MASKS, start))
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    hidden = self.model.hidden(batch)
                    if with_mlm:
                        logits = self.model.backbone.cls(hidden).float()
                        sums[0] += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                        sums[1] += float(batch["masked_count"])
                    if targets:
                        count = batch["with_target"]
                        sums[2] += float(mlsm_loss(self.model.mlsm_head(hidden), batch["target_atoms"],
                                                   batch["target_weights"], count) * count)
                        sums[3] += float(count)
            self.model.train()
        sums = all_ranks_sum(torch.from_numpy(sums), self.world).tolist()
        losses = {}
        if sums[1]:
            losses["validation_mlm"] = sums[0] / sums[1]
        if sums[3]:
            losses["validation_mlsm"] = sums[2] / sums[3]
        return losses

    def _save_model(self, directory: Path) -> None:
        if self.rank != 0:
            return
        with atomic_output(directory) as tmp:
            tmp.mkdir(parents=True)
            self.model.save(tmp, self.tokenizer, {**self.metadata(), "steps": self.step})

    def metadata(self) -> dict:
        return {"format_version": contract.FORMAT_VERSION["pretrain"], "params": self.params,
                "steps": self.params["max_steps"], "objective": self.params["objective"], "atoms": self.atoms,
                "world_size": self.world}

    def _finish(self) -> dict:
        tokens_seen = int(all_ranks_sum(torch.tensor([float(self.tokens_seen)], dtype=torch.float64), self.world))
        if self.world > 1:
            _check_ranks_agree(self.model, self.world)
        summary = {**self.metadata(), "tokens_seen": tokens_seen, "seconds": self.seconds,
                   "tokens_per_second": tokens_seen / max(self.seconds, 1e-9),
                   "parameters": sum(p.numel() for p in self.model.parameters()),
                   "checkpoints": [f"step{s}" for s in checkpoint_steps(self.params)],
                   "final": self.history[-1], "history": self.history}
        if self.rank == 0:
            self._publish(summary)
        if self.world > 1:
            dist.barrier()  # no rank exits (and lets torchrun end the job) before rank 0 has saved
        return summary

    def _publish(self, summary: dict) -> None:
        """Write the final model and the saved checkpoints into the outputs, then the record."""
        with atomic_output(self.paths.out_model) as tmp:
            tmp.mkdir()
            self.model.save(tmp, self.tokenizer, {**self.metadata(), "tokens_seen": summary["tokens_seen"]})
        outputs = [self.paths.out_model]
        if self.paths.out_checkpoints:
            with atomic_output(self.paths.out_checkpoints) as tmp:
                tmp.mkdir()
                for name in summary["checkpoints"]:
                    saved = self.saved_models / name
                    if not saved.is_dir():
                        raise StageError(f"the model saved at {name} is missing from {self.saved_models}")
                    shutil.copytree(saved, tmp / name)
            outputs.append(self.paths.out_checkpoints)
        summary["files"] = file_entries(Path(self.paths.summary).parent, outputs)
        write_record(self.paths.summary, summary)
        self.resume.finish()
        if not self.paths.resume_dir:
            shutil.rmtree(self.saved_models.parent, ignore_errors=True)


class Window:
    """Tokens and seconds since the last logged update."""

    def __init__(self, step: int, tokens: int):
        self.step, self.tokens, self.time = step, tokens, time.perf_counter()

    def advance(self, step: int, tokens: int) -> tuple[float, int]:
        now = time.perf_counter()
        seconds, count = now - self.time, tokens - self.tokens
        self.step, self.tokens, self.time = step, tokens, now
        return seconds, count


class TrainingLog:
    """The history as CSV (rewritten at each logged update, so a resumed run's file is whole), a log line
    with the ETA (a progress bar on a terminal) and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, paths: Paths, total: int, active: bool):
        self.csv, self.total, self.active = paths.metrics_csv, total, active
        self.tensorboard = self.bar = None
        if not active:
            return
        if paths.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; the training log goes to the CSV only")
            else:
                self.tensorboard = SummaryWriter(paths.tensorboard_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="update", dynamic_ncols=True)

    def write(self, history: list[dict], seconds: float) -> None:
        if not self.active:
            return
        entry = history[-1]
        if self.csv:
            columns = list(dict.fromkeys(k for e in history for k in e))
            with atomic_output(self.csv) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns)
                writer.writeheader()
                writer.writerows(history)
        if self.tensorboard is not None:
            for key, value in entry.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(f"pretrain/{key}", value, entry["step"])
            self.tensorboard.flush()
        eta = seconds / entry["step"] * (self.total - entry["step"])
        shown = " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                         if k not in ("step", "seconds") and isinstance(v, (int, float)))
        if self.bar is not None:
            self.bar.update(entry["step"] - self.bar.n)
            self.bar.set_postfix_str(shown)
        else:
            log.info("update %d/%d %s eta %s", entry["step"], self.total, shown, _duration(eta))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--corpus-shards", nargs="+", required=True)
    p.add_argument("--target-shards", nargs="*", default=[])
    # The rule passes these three with no value where the job has no such input.
    p.add_argument("--validation-targets", nargs="?", help="the targets of --validation, for the validation MLSM loss")
    p.add_argument("--corpus-manifest", required=True)
    p.add_argument("--validation", help="held-out sequences (corpus/validation.parquet) for validation losses")
    p.add_argument("--out-model", required=True)
    p.add_argument("--out-checkpoints", help="directory for the models saved at checkpoint_fractions")
    p.add_argument("--summary", required=True, help="the run's record, with the checksums of the model's files")
    p.add_argument("--metrics-csv", help="the training log as CSV (not an output: it grows while training)")
    p.add_argument("--tensorboard-dir", help="TensorBoard event files (if tensorboard is installed)")
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    p.add_argument("--dictionary", nargs="?", help="with targets: online, the dictionary (dictionary.npy)")
    p.add_argument("--dictionary-metrics", nargs="?", help="its record (metrics.json), to verify it")
    args = p.parse_args(argv)
    args.target_shards = [t for t in args.target_shards if t]
    if args.params["objective"] in USES_MLSM:
        online = args.params["targets"] == "online"
        if not (args.dictionary and args.dictionary_metrics if online else args.target_shards):
            raise StageError(f"objective {args.params['objective']} needs "
                             + ("--dictionary and --dictionary-metrics" if online else "--target-shards"))
    train(Paths(args.corpus_shards, args.corpus_manifest, args.out_model, args.summary, args.target_shards,
                args.resume_dir, args.out_checkpoints, args.metrics_csv, args.tensorboard_dir, args.validation,
                args.validation_targets, args.dictionary, args.dictionary_metrics), args.params)


if __name__ == "__main__":
    run_stage(main)
