"""Stage 2: activations of the chosen layer in a zarr store."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common import StageError
from pipeline.data.formats import read_store
from pipeline.data.integrity import read_verified
from pipeline.models import load_encoder
from pipeline.stages import call

from conftest import MINILM, save_tiny_teacher


def extract(shards, manifest, out, record, params, resume_dir=None, token_counts_path=None, **settings):
    return call("teacher", params, corpus_shards=shards, corpus_manifest=manifest, store=out, manifest=record,
                resume_dir=resume_dir, token_counts=token_counts_path, **settings)


def params(source, **over):
    base = {"teacher": "t", "source": str(source), "layer": -1, "batch_size": 8, "sample_tokens": 500,
            "sample_seed": 0, "tokenizer": MINILM, "device": "cpu", "trust_remote_code": False,
            "subsample": "none", "subsample_threshold": 1e-4, "positions_per_sequence": 0}
    return {**base, **over}


def test_store_holds_the_chosen_layer_of_sampled_tokens(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    out = tmp_path / "a.zarr"
    extract(shards, manifest, str(out), str(tmp_path / "a.json"), params(encoder_teacher, layer=-2))
    read_verified(tmp_path / "a.json", [out])
    attrs, arrays = read_store(out)
    assert arrays["states"].shape == (500, 32) and arrays["states"].dtype == np.float16
    assert attrs["layer"] == -2 and attrs["hidden_layer_index"] == 2 and attrs["source"] == str(encoder_teacher)

    # Each stored state equals the full teacher's hidden state at that layer, sequence and position.
    import pyarrow.parquet as pq
    from transformers import AutoModel

    rows = {s: (ids, types) for t in map(pq.read_table, shards)
            for s, ids, types in zip(t["seq_id"].to_pylist(), t["input_ids"].to_pylist(),
                                     t["token_type_ids"].to_pylist())}
    full = AutoModel.from_pretrained(encoder_teacher).eval()
    for row in (0, 123, 499):
        seq, pos = int(arrays["seq_ids"][row]), int(arrays["positions"][row])
        ids, types = rows[seq]
        assert ids[pos] == arrays["token_ids"][row]
        with torch.no_grad():
            hidden = full(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]),
                          output_hidden_states=True).hidden_states
        np.testing.assert_allclose(arrays["states"][row].astype(np.float32), hidden[2][0, pos].numpy(), atol=2e-2,
                                   rtol=1e-2)
    assert not np.isin(arrays["token_ids"], [0, 100, 101, 102, 103]).any()  # no special tokens sampled
    assert np.all(np.diff(arrays["seq_ids"]) >= 0)  # stored in corpus order


def test_only_layers_up_to_the_chosen_one_are_built(encoder_teacher):
    encoder = load_encoder(str(encoder_teacher), -3, torch.device("cpu"))
    assert len(encoder.model.encoder.layer) == 1


def test_layer_out_of_range_is_a_clear_error(encoder_teacher):
    with pytest.raises(StageError, match="layer -4 is out of range"):
        load_encoder(str(encoder_teacher), -4, torch.device("cpu"))


def test_missing_teacher_path_is_named(tmp_path):
    with pytest.raises(StageError, match="no such directory"):
        load_encoder(str(tmp_path / "missing"), -1, torch.device("cpu"))


def test_vocabulary_mismatch_is_refused(tmp_path, sharded_corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = save_tiny_teacher(tmp_path / "other", with_mlm_head=False)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(other)
    import json
    manifest = json.loads(open(sharded_corpus[1]).read())
    with pytest.raises(StageError, match="different vocabulary"):
        load_encoder(str(other), -1, torch.device("cpu"), manifest)


def test_real_minilm_teacher_loads_offline():
    encoder = load_encoder(MINILM, -1, torch.device("cpu"))
    assert encoder.hidden_size == 384 and len(encoder.model.encoder.layer) == 6


def test_an_interrupted_extraction_resumes_to_the_same_store(tmp_path, sharded_corpus, encoder_teacher, monkeypatch):
    from pipeline import teacher

    shards, manifest = sharded_corpus
    p = params(encoder_teacher, batch_size=2, sample_tokens=800, positions_per_sequence=5)
    extract(shards, manifest, str(tmp_path / "ref.zarr"), str(tmp_path / "ref.json"), p)

    real, calls = teacher.extract_batch, []

    def dies_on_the_fourth_unit(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a kill would, between the 3rd checkpoint and the 4th
        return real(*args)
    monkeypatch.setattr(teacher, "extract_batch", dies_on_the_fourth_unit)
    out, state = tmp_path / "a.zarr", tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        extract(shards, manifest, str(out), str(tmp_path / "a.json"), p, str(state), checkpoint_seconds=0)
    assert not out.exists() and (state / "work" / "activations.zarr").is_dir()
    monkeypatch.setattr(teacher, "extract_batch", real)
    extract(shards, manifest, str(out), str(tmp_path / "a.json"), p, str(state), checkpoint_seconds=0)

    events = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    assert [e.get("completed") for e in events if e["event"] == "resume"] == [3]  # not from the start
    assert events[-1]["event"] == "done"
    _, ref = read_store(tmp_path / "ref.zarr")
    _, got = read_store(out)
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name
    assert not (state / "work").exists()


def test_frequency_subsampling_and_the_per_sequence_cap(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    counts = str(Path(manifest).parent / "token_counts.npy")
    frequency = np.load(counts) / np.load(counts).sum()
    stores = {}
    for rule in ("none", "w2v", "drop"):
        out = tmp_path / f"{rule}.zarr"
        extract(shards, manifest, str(out), str(tmp_path / f"{rule}.json"),
                params(encoder_teacher, subsample=rule, subsample_threshold=1e-3), token_counts_path=counts)
        stores[rule] = read_store(out)[1]["token_ids"]
    share = {rule: (frequency[ids] > 1e-3).mean() for rule, ids in stores.items()}
    assert share["drop"] == 0 and 0 < share["w2v"] < share["none"]  # frequent subwords sampled less
    capped = tmp_path / "capped.zarr"
    extract(shards, manifest, str(capped), str(tmp_path / "capped.json"),
            params(encoder_teacher, positions_per_sequence=3))
    attrs, arrays = read_store(capped)
    _, per_sequence = np.unique(arrays["seq_ids"], return_counts=True)
    assert per_sequence.max() <= 3 and len(per_sequence) >= 500 / 3
    assert attrs["sampling"]["positions_per_sequence"] == 3 and attrs["model_fingerprint"]
    with pytest.raises(StageError, match="needs the corpus token counts"):
        extract(shards, manifest, str(tmp_path / "x.zarr"), str(tmp_path / "x.json"),
                params(encoder_teacher, subsample="w2v"))


def test_an_altered_auxiliary_teacher_is_refused(tmp_path):
    """The pipeline's own teacher (teachers/<t>/auxiliary/model) is verified against its record."""
    from pipeline.data.integrity import file_entries, write_record
    from pipeline.models import verify_model

    from conftest import save_tiny_teacher

    model = save_tiny_teacher(tmp_path / "auxiliary" / "model", with_mlm_head=True)
    record = tmp_path / "auxiliary" / "summary.json"
    write_record(record, {"files": file_entries(tmp_path / "auxiliary", [model])})
    verify_model(str(model), str(record))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(StageError, match="model.safetensors"):
        verify_model(str(model), str(record))
