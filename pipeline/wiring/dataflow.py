"""What each rule reads and writes, derived from the declarations: the table at the top of
workflow/rules/pipeline.smk and the rule graph in the README, both kept up to date by tests/test_dataflow.py
(which also checks them against `snakemake --rulegraph`).

    python -m pipeline.wiring.dataflow        # prints both (the README's block, then the .smk's comment)

The rules are those of the embedded default and of two variants that use the others: a trained tokenizer with
an auxiliary teacher, and a sequence-length schedule.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from types import SimpleNamespace

from . import RULES

REPO = Path(__file__).resolve().parents[2]


def representative_configs() -> list[dict]:
    """The embedded default, and variants between them using every rule."""
    from .. import config as cfg

    default = cfg.load_yaml(REPO / "config" / "config.yaml")
    trained = copy.deepcopy(default)
    trained["corpus"]["tokenizer"] = "train"
    for teacher in trained["teachers"].values():
        teacher["source"] = "auxiliary"
    phases = copy.deepcopy(default)
    phases["pretrain"]["seq_len_schedule"] = [{"fraction": 0.5, "max_seq_len": default["corpus"].get("max_seq_len",
                                                                                                     128)},
                                              {"fraction": 0.5, "max_seq_len": 64}]
    return [default, trained, phases]


def _workflows(configs: list[dict]):
    from .. import config as cfg
    from .workflow import Workflow

    return [Workflow(cfg.validate(c)) for c in configs]


def reads(configs: list[dict] | None = None) -> dict[str, dict[str, set[str]]]:
    """rule -> input port -> the rules whose outputs (and benchmark files) it reads ("" for files no rule writes:
    the corpus text, task files, a teacher's states computed elsewhere)."""
    found: dict[str, dict[str, set[str]]] = {name: {} for name in RULES}
    for workflow in _workflows(configs or representative_configs()):
        producer = {}
        for rule, wildcards in workflow.jobs():
            producer[workflow.benchmark(rule, **wildcards)] = rule  # the report reads every job's benchmark
            for value in workflow.outputs(rule).values():
                for path in value if isinstance(value, list) else [value]:
                    producer[path.format(**wildcards) if wildcards else path] = rule
        for rule, wildcards in workflow.jobs():
            for port, value in workflow.inputs(rule, SimpleNamespace(**wildcards)).items():
                for path in value if isinstance(value, list) else [value]:
                    found[rule].setdefault(port, set()).add(producer.get(str(path), ""))
    return found


def edges(configs: list[dict] | None = None) -> set[tuple[str, str]]:
    """(producer, consumer) of every rule whose outputs another reads."""
    return {(source, rule) for rule, ports in reads(configs).items() for sources in ports.values()
            for source in sources if source}


def mermaid(found: set[tuple[str, str]]) -> str:
    order = list(RULES)
    lines = ["flowchart TD"] + [f"    {a} --> {b}" for a, b in sorted(found, key=lambda e: (order.index(e[0]),
                                                                                          order.index(e[1])))]
    return "\n".join(lines)


def table() -> str:
    """One comment block: each rule's inputs (by the rules that write them: "given" for the user's files) and
    its outputs (under the results directory, the demo's data beside it)."""
    found, lines = reads(), []
    for name, rule in RULES.items():
        inputs = ", ".join(f"{port} ({'/'.join(sorted(s or 'given' for s in sources))})"
                           for port, sources in found[name].items()) or "-"
        lines.append(f"# {name}")
        for label, text in (("reads: ", inputs), ("writes:", ", ".join(rule.outputs.values()))):
            lines += textwrap.wrap(text, 110, initial_indent=f"#     {label} ", subsequent_indent="#" + " " * 13,
                                   break_on_hyphens=False)
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"```mermaid\n{mermaid(edges())}\n```\n")
    print(table())
