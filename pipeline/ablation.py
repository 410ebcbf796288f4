"""Ablations in one config: dictionary variants per teacher, and grids that expand into named students.

A teacher's `dictionaries` name variants of the dictionary and targets sections (K, lambda, backend, top_k,
...); each variant is a *coding*, with its own dictionary and targets, named `<teacher>@<variant>` in paths
and jobs (`dictionaries/minilm@k128/`). A student without `dictionary` learns from its teacher's unnamed
coding, the sections themselves, whose paths are the teacher's name as before.

A grid (`grids.<name>: {student: {...}, sweep: {key: [values]}}`) becomes one student per combination of
the swept values, named `<grid>.<key>-<value>...`; the workflow, the plan and the controls see them as
students the config listed. Nothing here imports torch: the workflow reads it at every parse.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from .objectives import objective

SEPARATOR = "@"  # between a teacher's name and its variant's; no config name holds it
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # the schema's name_map_key


class GridError(ValueError):
    """A grid the config cannot expand (raised as the config's error)."""


def coding_name(teacher: str, variant: str | None) -> str:
    return teacher if variant is None else f"{teacher}{SEPARATOR}{variant}"


def coding_parts(name: str) -> tuple[str, str | None]:
    teacher, _, variant = name.partition(SEPARATOR)
    return teacher, variant or None


def student_coding(config: dict, student: str) -> str | None:
    """The coding a student's MLSM targets come from; None for an objective without targets."""
    options = config["students"][student]
    if not objective(options["objective"]).targets:
        return None
    return coding_name(options["teacher"], options.get("dictionary"))


def codings_in_use(config: dict) -> list[str]:
    return sorted({c for s in config["students"] if (c := student_coding(config, s)) is not None})


def coding_sections(config: dict, name: str) -> tuple[str, dict, dict]:
    """(teacher, dictionary section, targets section) of a coding: the config's sections with the variant's
    keys over them."""
    teacher, variant = coding_parts(name)
    if variant is None:
        return teacher, config["dictionary"], config["targets"]
    changes = config["teachers"][teacher]["dictionaries"][variant]
    return (teacher, {**config["dictionary"], **changes.get("dictionary", {})},
            {**config["targets"], **changes.get("targets", {})})


# ---- checks ----

def coding_problems(where: str, dictionary: dict, targets: dict, sample_tokens: int) -> list[str]:
    """What the schema cannot check of one coding's sections; `where` prefixes each key named."""
    problems = []
    atoms, top_k = dictionary["atoms"], targets["top_k"]
    if top_k != "none" and top_k > atoms:
        problems.append(f"config key '{where}targets.top_k': {top_k} is larger than dictionary.atoms ({atoms})")
    if dictionary["spams_call"] != "pipeline" and dictionary["backend"] != "spams":
        problems.append(f"config key '{where}dictionary.spams_call': applies to backend spams only; remove it or "
                        "set dictionary.backend: spams")
    if dictionary["iterations"] is not None and dictionary["backend"] != "spams":
        problems.append(f"config key '{where}dictionary.iterations': applies to backend spams only (the torch and "
                        "sklearn backends run `epochs` passes); remove it or set dictionary.backend: spams")
    if dictionary["heldout_tokens"] >= sample_tokens:
        problems.append(f"config key '{where}dictionary.heldout_tokens': {dictionary['heldout_tokens']} must be "
                        f"below activations.sample_tokens ({sample_tokens})")
    return problems


def variant_problems(config: dict, validate_section) -> list[str]:
    """Each variant's sections (validate_section(section, values, where) gives the schema's complaints), and
    every student's `dictionary`."""
    problems, sample = [], config["activations"]["sample_tokens"]
    for teacher, options in config["teachers"].items():
        for variant in options.get("dictionaries", {}):
            where = f"teachers.{teacher}.dictionaries.{variant}."
            _, dictionary, targets = coding_sections(config, coding_name(teacher, variant))
            found = validate_section("dictionary", dictionary, where) + validate_section("targets", targets, where)
            problems += found or coding_problems(where, dictionary, targets, sample)
    for name, student in config["students"].items():
        variant = student.get("dictionary")
        if variant is None:
            continue
        if not objective(student["objective"]).targets:
            problems.append(f"config key 'students.{name}.dictionary': objective {student['objective']} learns no "
                            "MLSM targets; remove it")
        elif student.get("teacher") in config["teachers"]:
            known = config["teachers"][student["teacher"]].get("dictionaries", {})
            if variant not in known:
                problems.append(f"config key 'students.{name}.dictionary': teacher {student['teacher']} has no "
                                f"dictionary '{variant}' (its dictionaries: {', '.join(known) or 'none defined'})")
    return problems


# ---- grids ----

def value_label(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return repr(value)  # 1.0, not 1: a float key keeps its type in the name
    return str(value)


def grid_students(name: str, grid: dict) -> dict[str, dict]:
    """Student name -> its keys, one per combination of the swept values (the first key varies slowest)."""
    base, sweep = grid.get("student", {}), grid["sweep"]
    both = sorted(set(base) & set(sweep))
    if both:
        raise GridError(f"config key 'grids.{name}.student.{both[0]}': the grid also sweeps it; give it in one place")
    students = {}
    for values in itertools.product(*sweep.values()):
        coordinates = dict(zip(sweep, values))
        student = ".".join([name, *(f"{k}-{value_label(v)}" for k, v in coordinates.items())])
        if not NAME.match(student):
            raise GridError(f"config key 'grids.{name}.sweep': the student name {student!r} is not a valid name "
                            "(letters, digits and _ . + - only); use such values")
        students[student] = {**base, **coordinates}
    if len(students) < math.prod(len(v) for v in sweep.values()):
        raise GridError(f"config key 'grids.{name}.sweep': a value is listed twice")
    return students


def expand_grids(config: dict) -> dict[str, tuple[str, dict]]:
    """Add every grid's students to config["students"]; student -> (grid, its swept values)."""
    made, limit = {}, config.get("grid_limit", 64)
    for name, grid in (config.get("grids") or {}).items():
        size = math.prod(len(v) for v in grid["sweep"].values())
        if size > limit:
            shape = " x ".join(f"{k} {len(v)}" for k, v in grid["sweep"].items())
            raise GridError(f"config key 'grids.{name}': {size} students ({shape}), over grid_limit ({limit}); "
                            "sweep fewer values, or raise grid_limit")
        for student, keys in grid_students(name, grid).items():
            validated_before = config["students"].get(student) == keys  # this grid's own student, expanded once
            if student in made or (student in config["students"] and not validated_before):
                raise GridError(f"config key 'grids.{name}': its student {student!r} is also a student of the "
                                "config or of another grid; rename one")
            made[student] = (name, {k: keys[k] for k in grid["sweep"]})
            config["students"][student] = keys
    return made


# ---- budgets ----

def budget_independent(options: dict) -> bool:
    """Whether no update of a trainee depends on its max_steps: its state after N updates is that of every run
    with more updates and the same options, so a longer budget continues from a shorter one's final state."""
    warmup_fixed = options.get("warmup_steps") is not None or options["warmup_fraction"] == 0
    return (options.get("lr_schedule") == "constant" and warmup_fixed and not options.get("seq_len_schedule")
            and not options.get("checkpoint_fractions") and objective(options["objective"]).trains)


def budget_chain(config: dict, student_options) -> dict[str, str]:
    """Student -> the student of the next shorter budget it continues from: students of a grid that sweeps
    max_steps and differ in nothing else, where both are budget_independent (student_options(name) gives
    a student's options)."""
    chain = {}
    for name, grid in (config.get("grids") or {}).items():
        if "max_steps" not in grid["sweep"]:
            continue
        lines: dict[tuple, list[tuple[int, str]]] = {}
        for student, keys in grid_students(name, grid).items():
            others = tuple((k, value_label(v)) for k, v in keys.items() if k != "max_steps" and k in grid["sweep"])
            lines.setdefault(others, []).append((keys["max_steps"], student))
        for line in lines.values():
            ordered = sorted(line)
            for (_, shorter), (_, longer) in zip(ordered, ordered[1:]):
                if budget_independent(student_options(shorter)) and budget_independent(student_options(longer)):
                    chain[longer] = shorter
    return chain


def grid_layout(config: dict) -> dict[str, dict]:
    """Grid -> {"keys": the swept keys, "students": [[student, its values of them], ...]}, in the grid's order
    (lists, which keep it through the params' sorted JSON)."""
    return {name: {"keys": list(grid["sweep"]),
                   "students": [[student, [keys[k] for k in grid["sweep"]]]
                                for student, keys in grid_students(name, grid).items()]}
            for name, grid in (config.get("grids") or {}).items()}
