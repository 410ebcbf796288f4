"""Small helpers every stage uses: command line, logging, errors, model sources, devices.

Writing outputs safely and verifying inputs lives in pipeline.integrity."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A clear, user-facing failure of a stage (bad input, missing model, ...)."""


# ---- command line ------------------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", required=True, type=_json_arg,
                   help="the stage's config slice as JSON, or @file.json")
    return p


def _json_arg(text: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {err}") from None


def run_stage(main, argv=None) -> None:
    """Run a stage's main with logging; turn StageError into one clear line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(argv)
    except StageError as err:
        log.error("%s", err)
        raise SystemExit(1) from None


# ---- reproducibility ---------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto"):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device: cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def set_cpu_threads() -> None:
    """Use the cores Snakemake granted (it sets OMP_NUM_THREADS from `threads:`)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


# ---- hashing -----------------------------------------------------------------------------------

def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---- model sources -----------------------------------------------------------------------------

def resolve_model_source(source: str) -> str:
    """Map a config model source to what from_pretrained takes.

    `package:<module>`: a model shipped in an installed Python package (its get_model_path(), or
    its `model/` folder); an existing path: a local directory; anything else: a hub id, which
    transformers resolves from its cache (offline when HF_HUB_OFFLINE=1)."""
    if source.startswith("package:"):
        module_name = source.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise StageError(f"model source {source!r}: Python package {module_name!r} is not installed "
                             f"(pip install the project's demo extra)") from None
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if getter else Path(module.__file__).parent / "model"
        if not (path / "config.json").exists():
            raise StageError(f"model source {source!r}: no config.json under {path}")
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        if not any((path / name).exists() for name in ("config.json", "tokenizer_config.json")):
            raise StageError(f"model source {source!r}: directory has no config.json (nor tokenizer_config.json)")
        _verify_auxiliary_teacher(path)
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise StageError(f"model source {source!r}: no such directory")
    return source


_VERIFIED: set[tuple] = set()


def _verify_auxiliary_teacher(path: Path) -> None:
    """An auxiliary teacher the pipeline pre-trained (contract.AUXILIARY_TEACHER, .../auxiliary/model) is
    checked against its record (summary.json beside it), once per process, like any stage's output."""
    record = path.parent / "summary.json"
    if path.name != "model" or path.parent.name != "auxiliary" or not record.exists():
        return
    files = sorted(p for p in path.rglob("*") if p.is_file())
    key = (str(path.resolve()), record.stat().st_mtime_ns, *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _VERIFIED:
        from .integrity import read_verified

        read_verified(record, [path])
        _VERIFIED.add(key)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_source(source), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise StageError(f"tokenizer {source!r} could not be loaded: {err}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return fingerprint(sorted(vocab.items(), key=lambda kv: kv[1]))
