"""The two ways to install agree, and the README's commands are the ones CI and users run."""

import re

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# conda-forge names of PyPI packages where the two differ
CONDA_NAME = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_pixi_and_pyproject_declare_the_same_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    pip_side = {CONDA_NAME.get(_name(r), _name(r)) for r in pyproject["dependencies"]}
    pip_side |= {_name(r) for r in pyproject["optional-dependencies"]["demo"]}
    pixi_side = {n.lower() for n in pixi["dependencies"] if n != "python"}
    pixi_side |= {n.lower() for n in pixi["pypi-dependencies"] if n != "mlsm-pipeline"}
    assert pip_side == pixi_side
    for extra in ("test", "hf"):  # the extras the tests need have a pixi feature of the same name
        extra_pip = {_name(r) for r in pyproject["optional-dependencies"][extra]}
        feature = pixi["feature"][extra]
        assert extra_pip == {n.lower() for n in [*feature["dependencies"], *feature.get("pypi-dependencies", {})]}, \
            extra
        assert extra in pixi["environments"]["default"]["features"]


def test_make_setup_installs_the_extras_the_tests_need():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install -q -e '\.\[demo,test,hf\]'", makefile)


def test_readme_quick_start_is_two_one_line_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    blocks = re.findall(r"```\w*\n(.*?)```", quick_start, flags=re.S)[:2]
    assert [len(b.strip().splitlines()) for b in blocks] == [1, 1]
    demo, test = (b.strip() for b in blocks)
    assert "demo" in demo
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in [line.strip() for line in ci if not line.startswith("#")]
