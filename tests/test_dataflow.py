"""The data flow shown where Snakemake users look (issue #29, item 2): the table of what each rule reads and
writes at the top of workflow/rules/pipeline.smk, and the rule graph in the README, are what the declarations
give, and that graph is Snakemake's own (`snakemake --rulegraph`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from pipeline.wiring import dataflow

from conftest import REPO, venv_env


def test_the_table_in_the_rules_file_is_the_declarations():
    text = (REPO / "workflow" / "rules" / "pipeline.smk").read_text()
    assert dataflow.table() in text, "regenerate it: python -m pipeline.wiring.dataflow"


def test_the_readme_shows_the_rule_graph_of_the_declarations():
    assert f"```mermaid\n{dataflow.mermaid(dataflow.edges())}\n```" in (REPO / "README.md").read_text()


def rulegraph(tmp_path, config: dict) -> set[tuple[str, str]]:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--rulegraph", "--snakefile",
                             str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                             str(tmp_path / "c.yaml"), "--cores", "1"], capture_output=True, text=True,
                            env=venv_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = dict(re.findall(r'(\d+)\[label = "(\w+)"', result.stdout))
    return {(names[a], names[b]) for a, b in re.findall(r"(\d+) -> (\d+)", result.stdout) if names[b] != "all"}


@pytest.mark.parametrize("variant", range(3), ids=["default", "trained tokenizer, auxiliary teacher", "phases"])
def test_the_graph_is_snakemakes(tmp_path, variant):
    config = dataflow.representative_configs()[variant]
    assert rulegraph(tmp_path, config) == dataflow.edges([config])
