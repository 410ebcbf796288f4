"""Security hygiene, linted: no unpickling of files, no remote code unless the config asks, no shell
strings built from config values."""

from __future__ import annotations

import ast
import re

from conftest import REPO

SOURCES = sorted((REPO / "pipeline").rglob("*.py"))
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))
# Shell fields not quoted with :q, and why each is safe.
UNQUOTED_SHELL_FIELDS = {
    "params.launcher": "pipeline.launch.torchrun_command: built from two schema-checked integers",
}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unpickling_of_files():
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno}: imports a pickle library")
        for node, owner, name, kwargs in calls(tree):
            where = f"{path.name}:{node.lineno}"
            if owner == "torch" and name == "load" and not is_true(kwargs.get("weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and name == "load" and not (isinstance(kwargs.get("allow_pickle"), ast.Constant)
                                                         and kwargs["allow_pickle"].value is False):
                problems.append(f"{where}: np.load without allow_pickle=False")
    assert not problems, problems


def test_remote_code_only_when_the_config_sets_it():
    problems = []
    for path in SOURCES:
        for node, _, name, kwargs in calls(ast.parse(path.read_text())):
            if name == "from_pretrained":
                if "trust_remote_code" not in kwargs:
                    problems.append(f"{path.name}:{node.lineno}: from_pretrained without an explicit trust_remote_code")
                elif is_true(kwargs["trust_remote_code"]):
                    problems.append(f"{path.name}:{node.lineno}: trust_remote_code=True")
    assert not problems, problems
    schema = (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text()
    assert re.search(r"trust_remote_code:\n\s+type: boolean\n\s+default: false", schema)


def test_no_shell_from_python():
    problems = []
    for path in SOURCES:
        for node, owner, name, kwargs in calls(ast.parse(path.read_text())):
            if is_true(kwargs.get("shell")) or (owner == "os" and name in ("system", "popen")) \
                    or (isinstance(node.func, ast.Name) and name in ("eval", "exec")):
                problems.append(f"{path.name}:{node.lineno}: {owner}.{name} runs a shell or code string")
    assert not problems, problems


def shell_blocks(text: str) -> list[str]:
    """The string literals of each rule's shell: directive."""
    blocks = []
    for match in re.finditer(r"^(\s+)shell:\n((?:\1\s+.*\n?)+)", text, flags=re.M):
        blocks.append(match.group(2))
    return blocks


def test_rule_shell_commands_quote_every_field():
    """Every rule's shell is the command pipeline.workflow builds for it, and that quotes every field."""
    from pipeline.rules import RULES as WIRED
    from pipeline.rules import command

    problems, seen = [], 0
    for path in RULES:
        for block in shell_blocks(path.read_text()):
            seen += 1
            if not re.fullmatch(r'\s*command\("\w+"\)\s*', block):
                problems.append(f"{path.name}: a shell that is not command(<rule>): {block.strip()}")
    for rule in WIRED:
        problems += [f"{rule}: {{{field}}} is not quoted with :q"
                     for field in unquoted_fields(f"  shell:\n    {command(rule)!r}\n")]
    assert seen == len(WIRED) and not problems, problems


def unquoted_fields(text: str) -> list[str]:
    return [field for block in shell_blocks(text) for field in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block)
            if field.partition(":")[2] != "q" and field.partition(":")[0] not in UNQUOTED_SHELL_FIELDS]


def test_the_shell_lint_sees_an_unquoted_field():
    rule = 'rule x:\n    shell:\n        "python -m a --out {output.x:q}"\n        " --in {params.path} > {log:q}"\n'
    assert unquoted_fields(rule) == ["params.path"]
