"""Models the stages load: model sources, tokenizers and their vocabulary, and a teacher cut after its layer.

A model source is a local directory, a Hugging Face hub id (offline unless HF_HUB_OFFLINE=0), or
`package:<module>` for a model shipped inside an installed Python package: a module that an installed
distribution's own file list (its RECORD) holds, found there and never through sys.path, so a .py file in the
working directory, on PYTHONPATH or in a results folder is never imported. Its `model/` directory is read
without running any of its code; only a package without one has its `get_model_path()` called. A teacher the
pipeline
pre-trained itself (an auxiliary teacher) is a local directory whose record the stage is given and
verifies (`verify_model`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import StageError, fingerprint
from .data.integrity import read_verified, sha256_file
from .training import autocast


def resolve_model_source(source: str) -> str:
    """Map a config model source to what from_pretrained takes.

    `package:<module>`: a model shipped in an installed Python package (its get_model_path(), or
    its `model/` folder); an existing path: a local directory; anything else: a hub id, which
    transformers resolves from its cache (offline when HF_HUB_OFFLINE=1)."""
    if source.startswith("package:"):
        path = packaged_model(source.removeprefix("package:"))
        if not (path / "config.json").exists():
            raise StageError(f"model source {source!r}: no config.json under {path}")
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        if not any((path / name).exists() for name in ("config.json", "tokenizer_config.json")):
            raise StageError(f"model source {source!r}: directory has no config.json (nor tokenizer_config.json)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise StageError(f"model source {source!r}: no such directory")
    return source


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@functools.cache
def packaged_model(module: str) -> Path:
    """The model directory a `package:<module>` source names (module docstring): from the installed files of the
    distribution that provides the module, never from sys.path."""
    if not MODULE_NAME.fullmatch(module):
        raise StageError(f"model source 'package:{module}': not a Python module name")
    top, *inner = module.split(".")
    providers = importlib.metadata.packages_distributions().get(top, [])
    for name in dict.fromkeys(providers):
        distribution = importlib.metadata.distribution(name)
        installed = {str(f).replace("\\", "/") for f in distribution.files or ()}
        stem = "/".join([top, *inner])
        for relative in (f"{stem}/__init__.py", f"{stem}.py"):
            if relative in installed:
                file = Path(distribution.locate_file(relative)).resolve()
                if (file.parent / "model" / "config.json").is_file() and relative.endswith("__init__.py"):
                    return file.parent / "model"  # read as data: none of the package's code runs
                return _model_path_of(module, file)
    where = f"distribution {', '.join(providers)} did not install it" if providers else "no installed distribution " \
        "provides it"
    raise StageError(f"model source 'package:{module}': {where} (package: reads models only from packages pip "
                     f"installed, never from the working directory, PYTHONPATH or an editable checkout; give the "
                     f"model's directory as the source instead)")


def _model_path_of(module: str, file: Path) -> Path:
    """The package's own get_model_path(), its module loaded from its installed file."""
    spec = importlib.util.spec_from_file_location(
        module, file, submodule_search_locations=[str(file.parent)] if file.name == "__init__.py" else None)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(module, loaded)
    spec.loader.exec_module(loaded)
    getter = getattr(loaded, "get_model_path", None)
    if getter is None:
        raise StageError(f"model source 'package:{module}': the package has neither a model/ directory nor "
                         f"get_model_path()")
    return Path(getter())


@contextlib.contextmanager
def loading(what: str):
    """Loading a model, its config or tokenizer: what transformers and safetensors raise for a bad model (a
    corrupt weight file, a model type it does not know, a malformed config) becomes one line naming `what`."""
    try:
        yield
    except StageError:
        raise
    except OSError as err:  # a missing or unreadable file; an I/O error may not repeat
        raise StageError(f"{what} could not be read: {err}", transient=isinstance(err, (TimeoutError,
                                                                                       ConnectionError))) from None
    except Exception as err:  # transformers and safetensors raise many types for a bad model
        raise StageError(f"{what} could not be loaded: {_cause(err)}") from None


def _cause(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if type(err).__name__ == "SafetensorError":
        return f"a .safetensors weight file is corrupt or truncated ({text}); copy the model again"
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return (f"{text.split('. ')[0]}. A custom architecture is not supported (the pipeline's students and "
                f"teachers are BERT-like encoders that transformers knows)")
    return f"{type(err).__name__}: {text}"


def verify_model(model_dir: str | None, record: str | None) -> None:
    """A model the pipeline wrote (an auxiliary teacher) is checked against the record that lists its files."""
    if model_dir and record:
        read_verified(record, [model_dir])


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_source(source)
    with loading(f"tokenizer {source!r}"):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return fingerprint(sorted(vocab.items(), key=lambda kv: kv[1]))


def check_vocabulary(source: str, path: str, config, corpus_manifest: dict, trust_remote_code: bool = False,
                     role: str = "teacher") -> None:
    """A teacher (or a checkpoint a student continues) must use the corpus tokenizer's vocabulary (and have an
    embedding for every id)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != corpus_manifest["tokenizer_fingerprint"]:
        raise StageError(f"{role} {source!r} uses a different vocabulary than the corpus tokenizer "
                         f"{corpus_manifest['tokenizer']!r}; tokenize the corpus with the teacher's tokenizer")
    if config.vocab_size < corpus_manifest["vocab_size"]:
        raise StageError(f"{role} {source!r} has {config.vocab_size} embeddings but the corpus "
                         f"tokenizer has {corpus_manifest['vocab_size']} tokens")


def model_identity(source: str, revision: str | None) -> dict:
    """A model's hub revision (if any) and a fingerprint of its weight files."""
    path = Path(resolve_model_source(source))
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin") or p.name == "config.json") \
        if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + sha256_file(file).encode())
    return {"revision": revision, "model_fingerprint": digest.hexdigest()[:16] if files else revision}


def model_hidden_size(source: str, trust_remote_code: bool = False) -> int:
    """A model's hidden size, from its config alone."""
    from transformers import AutoConfig

    path = resolve_model_source(source)
    with loading(f"model {source!r}"):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).hidden_size


@dataclass
class TeacherEncoder:
    """A teacher cut after its chosen layer."""

    model: torch.nn.Module
    device: torch.device
    hidden_size: int
    layer_index: int  # index into hidden_states: 1 = first transformer layer
    pad_id: int
    precision: str = "bf16"  # of the forward pass on a GPU (pipeline.training.autocast)

    def autocast(self):
        return autocast(self.device, self.precision)

    @torch.inference_mode()
    def hidden(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """The chosen layer's states [batch, width, d] (on the device) of right-padded id arrays."""
        lengths = np.asarray(lengths)
        mask = attention_mask_for(self.model, self._to_device(np.arange(ids.shape[1]) < lengths[:, None]),
                                  bool((lengths < ids.shape[1]).any()))
        with self.autocast():
            return self.model(input_ids=self._to_device(ids), token_type_ids=self._to_device(types),
                              attention_mask=mask).last_hidden_state

    @torch.inference_mode()
    def launch_gather(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
                      positions: np.ndarray) -> tuple[torch.Tensor, object]:
        """Start computing the states float16 [n, d] at (rows, positions) of a padded batch; only those leave
        the device. On a GPU this returns at once, the copy to the host under way: the caller prepares the
        next batch meanwhile and then reads this one with `collect`."""
        out = self.hidden(ids, types, lengths)
        picked = out[self._to_device(rows), self._to_device(positions)].to(torch.float16)
        if self.device.type != "cuda":
            return picked, None
        host = torch.empty(picked.shape, dtype=torch.float16, pin_memory=True)
        host.copy_(picked, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    @staticmethod
    def collect(pending: tuple[torch.Tensor, object]) -> np.ndarray:
        host, done = pending
        if done is not None:
            done.synchronize()
        return host.numpy()

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


def attention_mask_for(model, attention_mask: torch.Tensor, padded: bool) -> torch.Tensor | None:
    """The mask to give a transformers encoder, where the host knows whether any row is padded. Given a [batch,
    width] mask, transformers' SDPA path asks the device whether every entry is 1 (a host sync each forward)
    and then passes no mask or a [batch, 1, width, width] boolean one; this builds the same without asking."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return attention_mask
    if not padded:
        return None
    keep = attention_mask.bool()
    rows, width = keep.shape
    return keep[:, None, None, :].expand(rows, 1, width, width).contiguous()


def load_encoder(source: str, layer: int, device: torch.device, corpus_manifest: dict | None = None,
                 trust_remote_code: bool = False, precision: str = "bf16") -> TeacherEncoder:
    """The teacher's layers up to `layer` (counted from the last, as in the MLSM reference: -1 is the
    last), in eval mode with SDPA attention; checked against the corpus vocabulary when given its manifest."""
    from transformers import AutoConfig, AutoModel

    path = resolve_model_source(source)
    with loading(f"teacher {source!r}"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    n_layers = config.num_hidden_layers
    if not -n_layers <= layer <= -1:
        raise StageError(f"teacher {source!r} has {n_layers} layers; layer {layer} is out of range "
                         f"(-{n_layers}..-1, counted from the last)")
    keep = n_layers + 1 + layer
    if corpus_manifest is not None:
        check_vocabulary(source, path, config, corpus_manifest, trust_remote_code)
    config.num_hidden_layers = keep  # layers above the chosen one are never built nor run
    with loading(f"teacher {source!r}"):
        model = AutoModel.from_pretrained(path, config=config, attn_implementation="sdpa", add_pooling_layer=False,
                                          trust_remote_code=trust_remote_code)
    model.eval().to(device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    return TeacherEncoder(model, device, config.hidden_size, keep, pad_id, precision)


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped by similar length, so little compute goes to padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def saved_json(model_dir: str | Path, name: str) -> dict | None:
    """A JSON file a model directory holds (e.g. the pipeline's pretraining.json), or None."""
    path = Path(model_dir) / name
    return json.loads(path.read_text()) if path.exists() else None
