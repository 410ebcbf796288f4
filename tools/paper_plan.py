"""The plan of config/paper.yaml at the paper's scale, before anyone launches it: disk and time per stage on a
GPU class, with the students on 1 GPU and on `--gpus` GPUs each (data parallel), from the printed assumptions
(or `--bench`, a benchmark run's JSON on that class).

    python tools/paper_plan.py [--hardware h100] [--gpus 8] [--corpus-tokens 3e9] [--out plan.md]

No hub access is needed: the teacher is a stand-in of bert-base-cased's shape (BERT-base, random weights) with
MiniLM's vocabulary (30,522 ids where bert-base-cased has 28,996); the GLUE tasks are the real ones where
../shared/data/glue has them, and for MNLI, QQP and QNLI stand-ins with the official row counts, each row two
real English sentences of ../shared/data/corpus (their length is the corpus's, not the task's); NER is
CoNLL-2002's Spanish sentences cycled to CoNLL-2003's 14,041 and 3,250 sentences. The corpus is
../shared/data/corpus's text (a sample packed as the preset packs it), scaled to --corpus-tokens.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# Official row counts: train, then each dev set.
GLUE_ROWS = {"MNLI": (392702, 9815, 9832), "QQP": (363846, 40430), "QNLI": (104743, 5463)}
CONLL2003 = (14041, 3250)


def sentences():
    with gzip.open(SHARED / "corpus" / "train.txt.gz", "rt", encoding="utf-8") as fh:
        lines = [line.strip().replace("\t", " ") for line in itertools.islice(fh, 400000) if len(line.strip()) > 20]
    return itertools.cycle(lines)


def glue_stand_ins(root: Path) -> None:
    import glue_fixtures  # tests/: the official layouts

    text = sentences()
    for task, counts in GLUE_ROWS.items():
        rows = {"MNLI": lambda n: glue_fixtures.mnli_rows(n, "fiction"), "QQP": glue_fixtures.qqp_rows,
                "QNLI": glue_fixtures.qnli_rows}[task]
        names = {"MNLI": ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"]}.get(task, ["train.tsv", "dev.tsv"])
        for name, count in zip(names, counts):
            made = rows(count)
            columns = {"MNLI": ("sentence1", "sentence2"), "QQP": ("question1", "question2"),
                       "QNLI": ("question", "sentence")}[task]
            for row in made:
                row[columns[0]], row[columns[1]] = next(text), next(text)
            header = (glue_fixtures.MNLI_TRAIN if name == "train.tsv" else glue_fixtures.MNLI_DEV) \
                if task == "MNLI" else list(made[0])
            glue_fixtures.write(root / task / name, header, made)
    for task in (SHARED / "glue").iterdir():
        (root / task.name).symlink_to(task)


def ner_stand_in(directory: Path) -> None:
    from pipeline.data.conll import read_conll

    directory.mkdir(parents=True)
    words, tags = read_conll(SHARED / "ner" / "conll2002-esp" / "train.txt")
    pool = itertools.cycle(zip(words, tags))
    for name, count in zip(("train.txt", "dev.txt"), CONLL2003):
        sentences_written = itertools.islice(pool, count)
        directory.joinpath(name).write_text("\n".join("".join(f"{w} {t}\n" for w, t in zip(*pair))
                                                      for pair in sentences_written))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", default="h100")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per student in the second plan")
    p.add_argument("--corpus-tokens", type=float, default=3e9)
    p.add_argument("--bench", help="a benchmark run's JSON on that GPU class")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from bench.common import random_teacher

    outputs = []
    with tempfile.TemporaryDirectory(prefix="paper-plan-") as work:
        work = Path(work)
        teacher = random_teacher(work / "bert-base-stand-in", "base")
        glue_stand_ins(work / "glue")
        ner_stand_in(work / "conll2003")
        config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
        # Real English text: the plan packs a sample of it for the sequences' length, then scales to the tokens.
        config["corpus"]["inputs"] = [str(SHARED / "corpus" / "train.txt.gz")]
        config["corpus"]["tokenizer"] = teacher
        for options in config["teachers"].values():
            options["source"] = teacher
        for task in config["tasks"].values():
            task["path"] = str(work / "conll2003") if task["format"] == "conll" else \
                str(work / "glue" / Path(task["path"]).name)
        accumulation = config["pretrain"]["grad_accumulation"]
        for gpus in (1, args.gpus):  # the same global batch: per-process batch x accumulation x processes
            if accumulation % gpus:
                raise SystemExit(f"--gpus {gpus} does not divide grad_accumulation {accumulation}")
            config["pretrain"]["gpus"], config["pretrain"]["grad_accumulation"] = gpus, accumulation // gpus
            configfile = work / f"paper-{gpus}.yaml"
            configfile.write_text(yaml.safe_dump(config))
            command = [sys.executable, "-m", "pipeline.plan", "--configfile", str(configfile), "--hardware",
                       args.hardware, "--corpus-tokens", str(args.corpus_tokens),
                       *(["--bench", args.bench] if args.bench else [])]
            run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stdout + run.stderr)
            outputs.append(f"## Students on {gpus} GPU(s) each\n\n{run.stdout}")
    text = "\n".join(outputs)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
