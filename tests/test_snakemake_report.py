"""The reports: report.html rendered from report.md by the Jinja2 template, whatever sections report.md
holds; and `snakemake --report` holding the plots, tables and records the rules mark with report()."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest

from pipeline.data import contract
from pipeline.reporting.report_html import blocks, render_html
from pipeline.wiring import RULES

from conftest import REPO, venv_env
from test_workflow import SNAKEFILE

MARKDOWN = """# A report

Some `code` and a [link](cards/a/README.md) <b>escaped</b>.

## Scores

| student | score |
|---|---:|
| a | 0.5 |

![scores](scores.png)

## A section added later

| diagnostic | value |
|---|---:|
| grad norm | 1.0 |
"""


def test_every_markdown_section_becomes_html_without_template_changes(tmp_path):
    png = b"\x89PNG fake"
    (tmp_path / "scores.png").write_bytes(png)
    page = render_html(MARKDOWN, {"scores.png": str(tmp_path / "scores.png")})
    kinds = [b["kind"] for b in blocks(MARKDOWN)]
    assert kinds == ["heading", "paragraph", "heading", "table", "image", "heading", "table"]
    assert '<h2 id="a-section-added-later">A section added later</h2>' in page
    assert "<tr><td>grad norm</td><td>1.0</td></tr>" in page and page.count("<table>") == 2
    assert '<a href="#a-section-added-later">' in page  # in the table of contents
    assert "<code>code</code>" in page and '<a href="cards/a/README.md">link</a>' in page
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page  # text is escaped, never markup
    assert 'src="data:image/png;base64,' + base64.b64encode(png).decode() + '"' in page


def test_the_shown_outputs_have_captions_and_are_outputs_of_their_rules():
    for name, rule in RULES.items():
        assert set(rule.shown) <= set(rule.outputs), name
        for shown in rule.shown.values():
            assert (REPO / "workflow" / "report" / f"{shown.caption}.rst").is_file(), shown.caption
    assert {"scores_plot", "curve_plot", "csv", "html", "cards"} <= set(RULES["report"].shown)


@pytest.mark.e2e
def test_snakemake_report_holds_the_plots_tables_and_records(workflow_run):
    workdir, configfile, config = workflow_run
    out = workdir / "snakemake-report.html"
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
                             str(workdir), "--configfile", str(configfile), "--report", str(out)],
                            capture_output=True, text=True, env=venv_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    page = out.read_text()
    results = workdir / "results"
    for plot in (contract.REPORT_PLOT, contract.REPORT_CURVE):  # embedded, byte for byte
        assert base64.b64encode((results / plot).read_bytes()).decode() in page
    assert base64.b64encode((results / contract.REPORT_CSV).read_bytes()).decode() in page
    for category in ("1 Results", "2 Corpus", "3 Dictionary", "4 Targets", "5 Pre-training"):
        assert category in page
    assert all(f"model card of {student}" in page for student in config["students"])
    assert "Dev-set scores of the final models after fine-tuning" in page  # a caption
    assert re.search(r"Record of the dictionary of teacher <tt[^>]*>minilm</tt>", page)  # a caption, wildcards filled
