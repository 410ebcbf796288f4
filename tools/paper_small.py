"""config/paper.yaml scaled down to a CPU, with the paper's whole evaluation: every GLUE task, NER and the
sample-efficiency curve, run through snakemake to its report.

    python tools/paper_small.py --work DIR [--tasks CoLA MNLI NER ...] [--cores 2]

Every reference option of the preset is kept except the sizes: a tiny local teacher in place of bert-base-cased,
the demo's BBC text as corpus, tiny students of 4 updates (checkpoints at 50 %), fine-tuning on at most 64
examples per task for one epoch and one seed, and the dictionary learnt by the pipeline's own backend where SPAMS
is not installed. The tasks are the real GLUE ones of ../shared/data/glue, fixtures in the official layout for
MNLI, QQP and QNLI (tests/glue_fixtures.py) and the real CoNLL-2002 task for NER. The scores of such a run say
nothing about MLSM; the run shows the whole evaluation working end to end. tests/test_presets.py runs three of
the tasks; this tool runs all ten.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
ALL_TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI", "NER"]


def scaled_down(config: dict, model: str) -> dict:
    """A preset shaped like the paper's (its teacher bert_base_cased), every reference option kept, at a size a CPU
    runs in minutes on the demo data, `model` in place of the hub's teacher; its tasks as they were."""
    config = copy.deepcopy(config)
    config["corpus"]["tokenizer"] = config["teachers"]["bert_base_cased"]["source"] = model
    config.update({"results": "results", "device": "cpu"})
    config["demo_data"] = {"bbc_news": {"enabled": True, "dev_fraction": 0.1, "pretrain_articles": 30, "seed": 13}}
    config["corpus"].update({"inputs": ["resources/bbc_news/pretrain.txt.gz"], "max_seq_len": 32, "shards": 2,
                             "threads": 2})
    config["teachers"]["bert_base_cased"]["batch_size"] = 8
    config["activations"]["sample_tokens"] = 1500
    config["dictionary"].update({"atoms": 24, "iterations": 20, "batch_size": 64, "heldout_tokens": 300,
                                 "browse_atoms": 3})
    config["targets"]["batch_size"] = 16
    config["pretrain"].update({"size": "tiny", "max_steps": 4, "batch_size": 8, "grad_accumulation": 1,
                               "compile": False, "warmup_fraction": 0.25, "checkpoint_fractions": [],
                               "seq_len_schedule": [{"fraction": 0.5, "max_seq_len": 32},
                                                    {"fraction": 0.5, "max_seq_len": 64}]})
    config["finetune"].update({"seeds": [0], "epochs": 1, "batch_size": 16, "max_seq_len": 64,
                               "max_train_examples": 32, "checkpoint_tasks": []})
    return config


def small_paper_config(model: str, glue: Path, ner: Path, tasks: list[str]) -> dict:
    """config/paper.yaml scaled down, evaluated on `tasks` (names of the preset's tasks) with a checkpoint at 50 %."""
    config = scaled_down(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()), model)
    if importlib.util.find_spec("spams") is None:  # the pipeline's learner, the same atoms and lambda
        config["dictionary"]["backend"] = "torch"
        del config["dictionary"]["iterations"]
    config["pretrain"]["checkpoint_fractions"] = [0.5]
    config["finetune"].update({"max_train_examples": 64, "checkpoint_tasks": tasks})
    config["tasks"] = {name: {**task, "path": str(ner if task["format"] == "conll" else glue / name)}
                       for name, task in config["tasks"].items() if name in tasks}
    return config


def prepare(work: Path, tasks: list[str]) -> Path:
    """The working directory: a tiny teacher, the GLUE tasks (real and fixtures), the config. Returns it."""
    sys.path.insert(0, str(REPO / "tests"))
    import glue_fixtures
    from conftest import save_tiny_teacher

    work.mkdir(parents=True, exist_ok=True)
    model = work / "teacher"
    if not model.exists():
        save_tiny_teacher(model, with_mlm_head=True)
    glue = work / "glue"
    if not glue.exists():
        glue_fixtures.all_of_glue(glue, SHARED / "glue")
    config = small_paper_config(str(model), glue, SHARED / "ner" / "conll2002-esp", tasks)
    configfile = work / "paper-small.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return configfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="the working directory (results/ goes there)")
    p.add_argument("--tasks", nargs="+", default=ALL_TASKS, choices=ALL_TASKS)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    configfile = prepare(args.work.resolve(), args.tasks)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
               str(args.work.resolve()), "--configfile", str(configfile), "--cores", str(args.cores),
               "--workflow-profile", str(REPO / "profiles" / "default")]
    from conftest import venv_env  # this interpreter's bin/ first (rules call python), offline

    env = venv_env(PYTHONPATH=str(REPO))
    raise SystemExit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
