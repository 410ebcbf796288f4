"""Pre-training data: the corpus shards and their aligned target shards as flat arrays, and the run's
micro-batches, each a pure function of its index.

Two shards are in memory at most (and the next, read in the background); micro-batch m is drawn from
the BatchStream's seeded order and its masks from (seed, m), and built a few ahead in a background
thread. So a resumed run needs only its update count, and every process of a torchrun job builds the
same global batch and trains on its own rows of it: a run on N processes follows the same loss curve as
one process with N times the batch (dropout aside).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..common import StageError
from ..data.formats import gather_entries, pad_rows, read_targets, shard_tokens, target_entries
from ..models import attention_mask_for


class Shard:
    """One corpus shard (and its aligned target shard) as flat arrays: sequence i is
    tokens[offsets[i]:offsets[i+1]], and token t's target is atoms[e], weights[e] for e in
    target_offsets[t]:target_offsets[t+1] (no entries: no target)."""

    def __init__(self, corpus_path: str, target_path: str | None = None):
        self.offsets, self.tokens, self.types, table = shard_tokens(corpus_path)
        self.target_offsets = self.atoms = self.weights = None
        if target_path is not None:
            self._add_targets(target_path, table["seq_id"].to_numpy(), corpus_path)

    def _add_targets(self, target_path: str, seq_ids: np.ndarray, corpus_path: str) -> None:
        targets = read_targets(target_path)
        if not np.array_equal(seq_ids, targets["seq_id"].to_numpy()):
            raise StageError(f"target shard {target_path} is not aligned with corpus shard {corpus_path} "
                             "(seq_id mismatch)")
        try:
            self.target_offsets, self.atoms, self.weights = target_entries(targets)
        except StageError as err:
            raise StageError(f"{err} ({target_path})") from None
        if len(self.target_offsets) != len(self.tokens) + 1:
            raise StageError(f"target shard {target_path} does not hold a target for every position of corpus "
                             f"shard {corpus_path}")

    def targets(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The targets of some tokens (flat indices) as [n, widest] atom ids and weights, zero-padded."""
        return gather_entries(self.target_offsets, self.atoms, self.weights, tokens)

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

    def __init__(self, corpus_shards: list[str], target_shards: list[str] | None, sizes: list[int],
                 seed: int | tuple[int, ...]):
        if target_shards and len(target_shards) != len(corpus_shards):
            raise StageError(f"{len(target_shards)} target shards for {len(corpus_shards)} corpus shards")
        self.corpus_shards, self.target_shards = corpus_shards, target_shards or None
        self.seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
        self.sizes, self.total = np.asarray(sizes), int(np.sum(sizes))
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
            self._orders[key] = np.random.default_rng([*self.seed, *key]).permutation(n)
        return self._orders[key]

    def _locate(self, start: int) -> tuple[int, int, int]:
        """(shard index, its row order's position, epoch) of row `start` of the stream."""
        epoch, offset = divmod(start, self.total)
        shard_order = self._order(epoch)
        ends = np.cumsum(self.sizes[shard_order])
        slot = int(np.searchsorted(ends, offset, side="right"))
        shard = int(shard_order[slot])
        return shard, int(offset - (ends[slot] - self.sizes[shard])), epoch

    def release(self) -> None:
        """Drop the shards in memory (a phase of the schedule is over; a later one reads them again)."""
        self._cache.clear()
        self._loading.clear()

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


def unmaskable_ids(tokenizer, params: dict) -> list[int]:
    """The ids masking leaves out: every special token, or (mask_unknown, the reference) all but [UNK]."""
    ids = tokenizer.all_special_ids
    if params.get("mask_unknown"):
        ids = [i for i in ids if i != tokenizer.unk_token_id]
    return ids


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
    if params["mask_strategy"] == "unmasked":  # the reference's --not_use_masking: chosen, but left visible
        return masked, chosen
    if params["mask_strategy"] == "all_mask":
        masked[chosen] = mask_id
    else:
        roll = torch.rand(ids.shape, generator=generator)
        masked[chosen & (roll < 0.8)] = mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return masked, chosen


def micro_batch(stream: BatchStream, index: int, global_rows: int, tokenizer, params: dict,
                mask_index: int | None = None) -> dict:
    """Global micro-batch `index` of the stream (its masks drawn from (seed, mask_index), by default index)."""
    pieces = [(stream.shard(s), rows) for s, rows in stream.rows(index * global_rows, global_rows)]
    mask_index = index if mask_index is None else mask_index
    return make_batch(pieces, tokenizer, params, mask_seed=(params["seed"], mask_index))


class PhasedStream:
    """The run's micro-batches under a seq_len_schedule: the updates of each phase draw from the stream of the
    corpus packed at its length, continuing where that length's earlier phases stopped. Micro-batch m is
    still a pure function of m (its masks drawn from (seed, m)), so a run resumes across a phase boundary as
    anywhere else. Without a schedule: one phase, one stream, exactly the BatchStream's micro-batches."""

    def __init__(self, streams: dict[int, BatchStream], plan: list[tuple[int, int, int]], accumulation: int):
        self.streams, self.accumulation = streams, accumulation
        self.phases, used = [], {}  # (first micro-batch, end micro-batch, length, its stream's first micro-batch)
        for start, end, length in plan:
            first, last = start * accumulation, end * accumulation
            self.phases.append((first, last, length, used.get(length, 0)))
            used[length] = used.get(length, 0) + last - first
        self._current: int | None = None

    def locate(self, index: int) -> tuple[int, int]:
        """(length, micro-batch of that length's stream) of the run's micro-batch `index`."""
        for first, last, length, offset in self.phases:
            if index < last:
                return length, offset + max(0, index - first)
        first, last, length, offset = self.phases[-1]  # prefetching past the end: the last phase goes on
        return length, offset + index - first

    def micro_batch(self, index: int, global_rows: int, tokenizer, params: dict) -> dict:
        length, local = self.locate(index)
        if self._current is not None and self._current != length:
            self.streams[self._current].release()
        self._current = length
        return micro_batch(self.streams[length], local, global_rows, tokenizer, params, mask_index=index)


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
    special = torch.isin(ids, torch.tensor(unmaskable_ids(tokenizer, params))) | ~attention
    generator = torch.Generator().manual_seed(int(np.random.default_rng(mask_seed).integers(2**62)))
    masked, chosen = mask_tokens(ids, special, params, len(tokenizer), tokenizer.mask_token_id, generator)
    batch = {"input_ids": masked, "token_type_ids": types, "attention_mask": attention.long(), "masked": chosen,
             "masked_positions": masked_positions(chosen), "labels": ids[chosen], "lengths": attention.sum(1),
             "masked_count": chosen.sum()}
    if pieces[0][0].atoms is not None:
        atoms, weights, row = [], [], 0
        for (shard, rows), (piece_index, _, _) in zip(pieces, padded):
            piece_atoms, piece_weights = shard.targets(piece_index[chosen[row:row + len(rows)].numpy()])
            atoms.append(piece_atoms)
            weights.append(piece_weights)
            row += len(rows)
        width = max(a.shape[1] for a in atoms)
        batch["target_atoms"] = torch.from_numpy(np.concatenate([_widen(a, width) for a in atoms]).astype(np.int64))
        batch["target_weights"] = torch.from_numpy(
            np.concatenate([_widen(w, width) for w in weights]).astype(np.float32))
        batch["with_target"] = (batch["target_weights"].sum(1) > 0).sum()
    return batch


def masked_positions(masked: torch.Tensor) -> torch.Tensor:
    """The masked positions as indices into the flattened [rows x width] batch, found here on the CPU: a
    boolean mask indexing a GPU tensor waits for the GPU to count its entries (a host sync per micro-batch),
    a gather by these indices does not."""
    return torch.nonzero(masked.flatten()).flatten()


def gather_masked(states: torch.Tensor, batch: dict) -> torch.Tensor:
    """states[batch["masked"]] ([rows, width, ...] -> [masked, ...]) without a host sync."""
    return states.flatten(0, 1).index_select(0, batch["masked_positions"])


def with_labels(ids: torch.Tensor, batch: dict) -> torch.Tensor:
    """The input ids with every masked position given back its label: the input before masking."""
    return ids.flatten().index_copy(0, batch["masked_positions"], batch["labels"]).view_as(ids)


def encoder_mask(model, batch: dict) -> torch.Tensor | None:
    """The attention mask for `model` (pipeline.models.attention_mask_for), from the host's flag `padded`
    that the training loop sets; a batch without it (a test's, the diagnostics') is asked."""
    padded = batch["padded"] if "padded" in batch else bool((batch["attention_mask"] == 0).any())
    return attention_mask_for(model, batch["attention_mask"], padded)


def _widen(array: np.ndarray, width: int) -> np.ndarray:
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))


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
    share["masked_positions"] = masked_positions(share["masked"])
    for k in ("target_atoms", "target_weights"):
        if k in batch:
            share[k] = batch[k][positions]
    for k in ("with_target", "masked_count"):  # global counts, the same on every process
        if k in batch:
            share[k] = batch[k]
    return share


class Prefetcher:
    """Builds micro-batches start, start+1, ... in a background thread, a few ahead of training. `build(index)`
    returns a tuple whose first item is a dict of tensors (pinned when `pin`), the rest what the host needs."""

    def __init__(self, build, start: int, pin: bool, depth: int = 4):
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(build, start, pin), daemon=True)
        self.thread.start()

    def _run(self, build, index: int, pin: bool) -> None:
        while not self.stop.is_set():
            try:
                batch = build(index)
                if pin:
                    tensors, *extras = batch
                    batch = ({k: v.pin_memory() for k, v in tensors.items()}, *extras)
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
