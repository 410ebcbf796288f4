"""Benchmark of pretrain_student: the stage's MLSM training speed against the same step fed from memory
and against the reference's online recipe; MLM for comparison.

Real inputs: the first `--text-mb` MB of `--corpus` (../shared/data/corpus/train.txt.gz) sharded by the
pipeline (MiniLM's vocabulary, sentence pairs up to 128 tokens), and MLSM targets precomputed by the
pipeline's own target stage with the real all-MiniLM-L6-v2 teacher (last layer) and the real SPAMS
dictionary of ../shared/data/dictionaries (K=3000, lambda 0.05), cut to top-k (--top-k).

Figures, one student shape (--size, the paper's `medium` by default), bf16 autocast on a GPU, steady
state (the median of the stage's 10-update windows after the first):
- stage: `mlsm` through the whole stage (shard reading, batch building and target decoding in the
  background thread, step); the ratio to `in-memory`: the same model's step cycling over batches built
  beforehand from the same stream and kept on the device (goal >= 0.9: the loader costs < 10 %);
- online: the reference recipe through the stage's `targets: online` mode with a BERT-base-shaped
  teacher (12 x 768, random weights) and a d=768, K=3000 dictionary (random unit-norm atoms; the solve
  costs the same): teacher forward + FISTA-100 fp32 on the masked tokens + student step (goal: stage
  >= 5 x online);
- mlm: the same student with the MLM objective through the stage.

    python bench/pretrain.py                          # on the device machine
    python bench/pretrain.py --size tiny --batch-size 4 --steps 20 --text-mb 0.1 --shards 2 --atoms 64 --device cpu
                                              # the CPU smoke run (make bench), ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    CORPUS,
    MINILM,
    SPAMS_DICTIONARY,
    emit,
    random_dictionary,
    random_teacher,
    real_shards,
    save_dictionary,
)
from pipeline.common import pick_device  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.pretrain.data import BatchStream, micro_batch  # noqa: E402
from pipeline.pretrain.losses import loss_parts, total_loss  # noqa: E402
from pipeline.pretrain.model import PRESETS, Student, build_config  # noqa: E402
from pipeline.stages import call  # noqa: E402
from pipeline.target_summary import summarize  # noqa: E402
from pipeline.training import autocast  # noqa: E402

LOG_EVERY = 10


def real_inputs(work: Path, args, device: str) -> tuple[list[str], str, list[str]]:
    """Corpus shards of real text and their real MLSM targets, made by the pipeline's stages."""
    shards, manifest = real_shards(work, Path(args.corpus), args.text_mb, args.shards)
    started = time.perf_counter()
    dictionary = random_dictionary(384, args.atoms) if args.atoms else np.load(args.dictionary)
    dictionary_path, metrics = save_dictionary(work, dictionary)
    params = {"source": MINILM, "layer": -1, "batch_size": 256, "lambda": 0.05, "top_k": args.top_k,
              "solver": "fast", "max_iterations": 500, "tolerance": 1e-2, "device": device, "trust_remote_code": False}
    (work / "targets").mkdir()
    targets = [str(work / "targets" / f"shard-{i:03d}.parquet") for i in range(args.shards)]
    for corpus_shard, out in zip(shards, targets):
        call("targets", params, corpus_part=corpus_shard, corpus_manifest=manifest, dictionary=dictionary_path,
             dictionary_metrics=metrics, targets=out)
    summary = summarize(targets, str(work / "targets" / "manifest.json"), params)
    tokens = summary["tokens"]
    target_bytes = sum(Path(t).stat().st_size for t in targets)
    print(f"inputs: {tokens:,} tokens in {args.shards} shards; targets precomputed at "
          f"{tokens / (time.perf_counter() - started):,.0f} tokens/s (top-{args.top_k}, mass lost "
          f"{100 * summary['mean_mass_lost_to_top_k']:.1f} %, {target_bytes / tokens:.1f} bytes/token)")
    return shards, manifest, targets


def student_params(args, objective: str, device: str, **extra) -> dict:
    return {"size": args.size, "max_steps": args.steps, "batch_size": args.batch_size, "grad_accumulation": 1,
            "learning_rate": 1e-4, "weight_decay": 0.01, "warmup_fraction": 0.06, "max_grad_norm": 1.0,
            "mask_fraction": 0.15, "mask_strategy": "all_mask", "mlm_weight": 1.0, "kd_temperature": 1.0,
            "targets": "precomputed", "dropout": 0.1, "compile": args.compile, "checkpoint_fractions": [],
            "seed": 0, "device": device, "objective": objective, "student": objective, "atoms": 3000,
            "teacher_source": None, "teacher_trust_remote_code": False, **extra}


def stage_speed(work: Path, name: str, shards, manifest, targets, params, **paths) -> float:
    """Steady tokens/s of the stage itself: the median of its logged windows after the first."""
    record = {"target_manifest": str(work / "targets" / "manifest.json")} if targets else {}
    summary = call("pretrain", params, corpus_shards=shards, corpus_manifest=manifest, model=work / name,
                   summary=work / f"{name}.json", target_shards=targets or [], log_every=LOG_EVERY, **record, **paths)
    windows = [e["tokens_per_second"] for e in summary["history"][1:] if e["step"] % LOG_EVERY == 0]
    speed = statistics.median(windows) if windows else summary["tokens_per_second"]
    mfu = summary["history"][-1].get("mfu")
    print(f"{name:>10}: {speed:>12,.0f} tokens/s" + (f"  (MFU {100 * mfu:.1f} %)" if mfu else ""))
    return speed


def in_memory_speed(shards, manifest, targets, params, device: torch.device) -> float:
    """The same model's step cycling over batches built beforehand and kept on the device."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MINILM)
    sizes = [s["sequences"] for s in json.loads(Path(manifest).read_text())["shards"]]
    stream = BatchStream(shards, targets, sizes, params["seed"])
    batches = [{k: v.to(device) for k, v in micro_batch(stream, m, params["batch_size"], tokenizer, params).items()}
               for m in range(LOG_EVERY)]
    tokens = [int(b["lengths"].sum()) for b in batches]
    model = Student(build_config(params, tokenizer, 128), "mlsm", params["atoms"]).to(device)
    if params["compile"]:
        model.compile_encoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def window() -> float:
        started = time.perf_counter()
        for batch in batches:
            with autocast(device):
                loss = total_loss(loss_parts(model(batch), batch, params, None), params)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(grad_norm)  # the stage reads its losses and grad norm back every update too
        return sum(tokens) / (time.perf_counter() - started)

    window()  # warm-up
    speed = statistics.median(window() for _ in range(max(1, params["max_steps"] // LOG_EVERY - 1)))
    print(f"{'in-memory':>10}: {speed:>12,.0f} tokens/s")
    return speed


def online_inputs(work: Path, atoms: int) -> tuple[str, str, str]:
    """A BERT-base-shaped teacher (random weights) and a d=768 dictionary of `atoms` atoms, with its record."""
    teacher = random_teacher(work / "online-teacher", "base")
    dictionary, metrics = save_dictionary(work / "online-dictionary", random_dictionary(768, atoms, seed=1))
    return teacher, dictionary, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--text-mb", type=float, default=12.0, help="MB of raw text to shard and target")
    p.add_argument("--dictionary", default=str(SPAMS_DICTIONARY), help="MiniLM-L6 last-layer dictionary [384, K]")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--size", default="medium", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="updates per measured run")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--atoms", type=int, default=0,
                   help="random dictionaries of this size instead of SPAMS's and K=3000 (CPU smoke runs)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; student {args.size}, "
          f"batch {args.batch_size} x 128, {args.steps} updates per run, torch.compile {args.compile}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards, manifest, targets = real_inputs(work, args, device.type)
        atoms = args.atoms or 3000
        mlsm = student_params(args, "mlsm", device.type, atoms=atoms)
        stage = stage_speed(work, "mlsm", shards, manifest, targets, mlsm)
        memory = in_memory_speed(shards, manifest, targets, mlsm, device)
        teacher, dictionary, metrics = online_inputs(work, atoms)
        online_settings = {"source": teacher, "layer": -1, "lambda": 0.05, "max_iterations": 100,
                           "tolerance": 0.0, "solver": "fista", "trust_remote_code": False}
        online = stage_speed(work, "online", shards, manifest, None,
                             {**mlsm, "targets": "online",
                              "online": online_settings}, dictionary=dictionary, dictionary_metrics=metrics)
        mlm = stage_speed(work, "mlm", shards, manifest, None, student_params(args, "mlm", device.type))
    print(f"stage / in-memory: {stage / memory:.3f} (goal >= 0.9)")
    print(f"stage / online reference: {stage / online:.2f} (goal >= 5)")
    print(f"mlm / mlsm: {mlm / stage:.3f}")
    emit({"stage": stage, "in_memory": memory, "online": online, "mlm": mlm}, args.json)


if __name__ == "__main__":
    main()
