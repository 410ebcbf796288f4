"""Load and validate the pipeline configuration.

The JSON schema (workflow/schemas/config.schema.yaml) is the single description of every key. This
module validates a config against it, fills the schema's defaults, checks the cross-key rules a
schema cannot express, and adds the control students; it also holds what several rules' config slices
derive from the config (a student's options, its phases and checkpoints). Each rule's slice is declared in
its stage's home (pipeline/wiring/<stage>.py), so that an edit invalidates only the jobs it concerns.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import ablation
from .objectives import ARCHITECTURE_KEYS, CONTROL, OBJECTIVES, objective
from .results_dir import results_problem

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
TRAINED_TOKENIZER = "train"  # corpus.tokenizer: the train_tokenizer stage's output
AUXILIARY_TEACHER = "auxiliary"  # teachers.<name>.source: pre-trained by the pipeline (pretrain_teacher)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def load_schema() -> dict:
    """The config's JSON schema, with the objectives of the registry (pipeline/objectives.py) as the choices of
    students.<name>.objective."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["properties"]["students"]["additionalProperties"]["properties"]["objective"]["enum"] = list(OBJECTIVES)
    return schema


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one mapping "
                                  f"(first on line {seen[key] + 1}); the second would silently replace the first. "
                                  f"Keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    """A config file, parsed as Snakemake parses it but refusing a key given twice."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"config file {path}, {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def check_files(paths) -> None:
    """The config files Snakemake read (workflow.configfiles): each parses with no key given twice. Snakemake's
    own loader keeps the last of two equal keys, so a student written twice would silently be the second."""
    for path in paths:
        if Path(path).suffix.lower() in (".yaml", ".yml", ".json") or Path(path).is_file():
            load_yaml(path)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = set(error.schema.get("properties", {}))
        for ref in error.schema.get("allOf", []) + [error.schema]:
            if "$ref" in ref:
                allowed |= set(_resolve(ref["$ref"]).get("properties", {}))
        unknown = sorted(set(error.instance) - allowed) if isinstance(error.instance, dict) else []
        if unknown:
            return f"config key '{_key(path + [unknown[0]])}': unknown key (allowed here: {', '.join(sorted(allowed))})"
    if error.validator == "required":
        return f"config key '{_key(path)}': {error.message}"
    return f"config key '{_key(path)}': {error.message}"


_SCHEMA_CACHE: dict | None = None


def _schema() -> dict:
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        _SCHEMA_CACHE = load_schema()
    return _SCHEMA_CACHE


def section_defaults(section: str, keys: tuple[str, ...]) -> dict:
    """The schema's defaults of some keys of a config section (for stages called outside the workflow)."""
    properties = _schema()["properties"][section]["properties"]
    return {key: properties[key]["default"] for key in keys}


def option_defaults(definition: str) -> dict:
    """The schema's defaults of a $defs entry (pretrain_options): what a stage called outside the workflow
    takes for the keys its params leave out."""
    properties = _schema()["$defs"][definition]["properties"]
    return {key: copy.deepcopy(prop["default"]) for key, prop in properties.items() if "default" in prop}


def _resolve(ref: str) -> dict:
    node: Any = _schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _fill_defaults(schema: dict, instance: Any) -> None:
    """Fill `default`s of `properties` (following $ref and name maps, never allOf).

    Students list their options under allOf so that they inherit the pretrain section rather than
    the schema's defaults (see resolve_students)."""
    if "$ref" in schema:
        _fill_defaults(_resolve(schema["$ref"]), instance)
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill_defaults(sub, instance[name])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(extra, value)


INT64 = 2**63 - 1
MAX_CONFIG_VALUES = 1_000_000  # a config is hundreds; YAML aliases can make one of a few lines billions


def _expanded_size(value: Any, sizes: dict) -> int:
    """How many values `value` holds once YAML's aliases are expanded (each shared node counted once per use,
    computed once per node)."""
    if id(value) in sizes:
        return sizes[id(value)]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    sizes[id(value)] = size = 1 + sum(_expanded_size(child, sizes) for child in children)
    return size


def _number_problems(value: Any, path: tuple = ()) -> list[str]:
    """Numbers no schema bound catches: NaN passes every comparison (`nan < minimum` is false), infinity any
    bound left open, and an integer beyond 64 bits overflows numpy and torch inside a job."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _number_problems(item, (*path, key))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _number_problems(item, (*path, index))]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"config key '{_key(path)}': {value} is not a finite number"]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64:
        return [f"config key '{_key(path)}': {value} does not fit a 64-bit integer"]
    return []


def validate(config: dict) -> dict:
    """Return a validated copy of `config` with defaults filled; raise ConfigError naming the key."""
    size = _expanded_size(config, {})
    if size > MAX_CONFIG_VALUES:
        raise ConfigError(f"invalid configuration: it holds {size:,} values once its YAML aliases (*name) are "
                          f"expanded, more than the {MAX_CONFIG_VALUES:,} any config needs (an alias bomb?)")
    config = copy.deepcopy(dict(config))
    numbers = _number_problems(config)
    if numbers:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(numbers))
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    config.setdefault("students", {})
    _expand_grids(config, validator)
    if not config["students"]:
        raise ConfigError("invalid configuration:\n  config key 'students': no student; list students, or give "
                          "grids that make them")
    _fill_defaults(_schema(), config)
    _check_cross_keys(config)
    add_controls(config)
    return config


def _expand_grids(config: dict, validator) -> None:
    """The grids' students added to the config's, each checked as a student the config lists."""
    try:
        made = ablation.expand_grids(config)
    except ablation.GridError as err:
        raise ConfigError(f"invalid configuration:\n  {err}") from None
    problems = {}
    for student, (grid, swept) in made.items():
        prefix = f"'students.{student}."
        for error in validator.iter_errors({"students": {student: config["students"][student]}}):
            text = _describe(error)
            if prefix not in text:  # about the student as a whole: a key's own error says more
                continue
            key = text.split(prefix, 1)[1].split("'")[0].split(".")[0]
            text = text.replace(prefix, f"'grids.{grid}.{'sweep' if key in swept else 'student'}.")
            problems.setdefault(text.split("'")[1], f"{text} (student {student})")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems.values()))


def _section_problems(section: str, values: dict, where: str) -> list[str]:
    """The schema's complaints about one section's values (a dictionary variant's), keys prefixed by where."""
    schema = {"$defs": _schema()["$defs"], **_schema()["properties"][section]}
    errors = jsonschema.Draft202012Validator(schema).iter_errors(values)
    return [f"config key '{where}{section}.{_key(e.absolute_path)}': {e.message}"
            if e.absolute_path else f"config key '{where}{section}': {e.message}" for e in errors]


def architecture(config: dict, student: str) -> tuple:
    """The options that fix a student's initial weights and shape (objectives.ARCHITECTURE_KEYS)."""
    options = student_options(config, student)
    return tuple(options[key] for key in ARCHITECTURE_KEYS)


def add_controls(config: dict) -> None:
    """With `control` on, a control student (objective none) for every architecture of the pre-trained
    students that no control of the config has: `none` for the pretrain section's, else none_<what differs>."""
    if not config["control"]:
        return
    students = config["students"]
    covered = {architecture(config, name) for name, s in students.items() if s["objective"] == CONTROL}
    needed = dict.fromkeys(architecture(config, name) for name, s in sorted(students.items())
                           if objective(s["objective"]).trains and architecture(config, name) not in covered)
    section = tuple(config["pretrain"][key] for key in ARCHITECTURE_KEYS)
    for shape in needed:
        differs = {key: value for key, value, default in zip(ARCHITECTURE_KEYS, shape, section) if value != default}
        name = "_".join([CONTROL, *(str(v) if k == "size" else f"{k}{v}" for k, v in differs.items())])
        if name in students:
            raise ConfigError(f"config key 'students.{name}': this name is the automatic control student's "
                              "(objective none); rename the student, or set control: false")
        students[name] = {"objective": CONTROL, **differs}


def _check_cross_keys(config: dict) -> None:
    problems = []
    results = results_problem(config["results"])
    if results:
        problems.append(f"config key 'results': {config['results']!r} is refused: {results}")
    for name, student in config["students"].items():
        teacher = student.get("teacher")
        if objective(student["objective"]).teacher:
            if teacher is None:
                problems.append(f"config key 'students.{name}.teacher': objective {student['objective']} needs a "
                                "teacher")
            elif teacher not in config["teachers"]:
                known = ", ".join(config["teachers"]) or "none defined"
                problems.append(f"config key 'students.{name}.teacher': unknown teacher '{teacher}' "
                                f"(teachers: {known})")
    if config["corpus"]["tokenizer"] == TRAINED_TOKENIZER:
        used = {s.get("teacher") for s in config["students"].values() if objective(s["objective"]).teacher}
        for name in sorted(used & set(config["teachers"])):
            if config["teachers"][name]["source"] != AUXILIARY_TEACHER:
                problems.append(f"config key 'teachers.{name}.source': with corpus.tokenizer '{TRAINED_TOKENIZER}' "
                                f"a teacher must be '{AUXILIARY_TEACHER}' (a pre-trained teacher has its own "
                                "vocabulary)")
    if "hf:" in config["corpus"]["inputs"]:
        problems.append("config key 'corpus.inputs': 'hf:' names no dataset (hf:<a save_to_disk directory, a "
                        "dataset directory or a hub id>)")
    problems += ablation.coding_problems("", config["dictionary"], config["targets"],
                                         config["activations"]["sample_tokens"])
    problems += ablation.variant_problems(config, _section_problems)
    problems += _check_students(config)
    for name, task in config["tasks"].items():
        if task["format"] not in ("glue", "conll"):
            for key in ("text_columns", "label_column"):
                if key not in task:
                    problems.append(f"config key 'tasks.{name}.{key}': required for format {task['format']}")
    unknown = [t for t in config["finetune"]["checkpoint_tasks"] if t not in config["tasks"]]
    if unknown:
        problems.append(f"config key 'finetune.checkpoint_tasks': {unknown} are not tasks "
                        f"(tasks: {sorted(config['tasks'])})")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _check_students(config: dict) -> list[str]:
    """The pre-training options of every student and auxiliary teacher that the schema cannot check."""
    problems = []
    specific = {key for o in OBJECTIVES.values() for key in o.options}
    for name, student in config["students"].items():
        unused = sorted(specific & set(student) - set(objective(student["objective"]).options))
        if unused:
            users = sorted(o.name for o in OBJECTIVES.values() if unused[0] in o.options)
            verb = "do" if len(users) > 1 else "does"
            problems.append(f"config key 'students.{name}.{unused[0]}': objective {student['objective']} does not "
                            f"use it ({', '.join(users)} {verb}); remove it, or set it in the pretrain section")
    trainees = {f"students.{name}": student_options(config, name) for name in config["students"]}
    trainees.update({f"teachers.{name}.auxiliary": teacher["auxiliary"]
                     for name, teacher in config["teachers"].items() if teacher["source"] == AUXILIARY_TEACHER})
    for where, options in trainees.items():
        if options.get("architecture") and options.get("init"):
            problems.append(f"config key '{where}.init': a student continued from a checkpoint takes its "
                            "architecture from it; give init or architecture, not both")
        schedule = options.get("seq_len_schedule") or []
        if schedule and abs(sum(phase["fraction"] for phase in schedule) - 1) > 1e-9:
            problems.append(f"config key '{where}.seq_len_schedule': the phases' fractions add up to "
                            f"{sum(p['fraction'] for p in schedule):g}, not 1")
    return problems


# ---- slices: what each stage sees --------------------------------------------------------------

# The targets section's solver settings, and the MLSM reference's (what online_solver: reference uses).
SOLVER_KEYS = ("solver", "max_iterations", "tolerance", "precision")
REFERENCE_SOLVER = {"solver": "fista", "max_iterations": 100, "tolerance": 0.0, "precision": "fp32"}


def student_options(config: dict, name: str) -> dict:
    """The pretrain section overlaid with the student's own keys; a control (objective none) has no updates,
    so no checkpoints, and one process."""
    merged = dict(config["pretrain"])
    merged.update(config["students"][name])
    if not objective(merged["objective"]).trains:
        merged.update(max_steps=0, checkpoint_fractions=[], gpus=1)
        merged.pop("nodes", None)
    return merged


def phase_lengths(options: dict, main_length: int) -> list[int]:
    """The lengths of a trainee's seq_len_schedule other than the corpus's own (main_length), in order of first
    use: the order in which the workflow passes their corpus and targets to the pre-training stage."""
    return list(dict.fromkeys(p["max_seq_len"] for p in options.get("seq_len_schedule") or []
                              if p["max_seq_len"] != main_length))


def phase_plan(options: dict, main_length: int) -> list[tuple[int, int, int]]:
    """(first update, end update, max_seq_len) of each phase of a trainee's seq_len_schedule: phase i ends at
    round(cumulative fraction * max_steps), the last at max_steps; phases that round to no update are left
    out. No schedule: one phase at the corpus's own length."""
    total, schedule = options["max_steps"], options.get("seq_len_schedule") or []
    if not schedule:
        return [(0, total, main_length)]
    plan, start, cumulative = [], 0, 0.0
    for number, phase in enumerate(schedule):
        cumulative += phase["fraction"]
        end = total if number == len(schedule) - 1 else min(total, round(cumulative * total))
        if end > start:
            plan.append((start, end, phase["max_seq_len"]))
        start = max(start, end)
    return plan


def model_max_length(options: dict, main_length: int) -> int:
    """The longest sequence a trainee's position embeddings hold: its phases' longest; for the control (no
    update, no phase) its schedule's longest, so that it has the trained students' architecture."""
    lengths = [length for _, _, length in phase_plan(options, main_length)]
    return max(lengths or [phase["max_seq_len"] for phase in options.get("seq_len_schedule") or []] or [main_length])


def checkpoint_steps(options: dict) -> list[int]:
    """The updates after which a student's model is saved besides the final one: round(f * max_steps) for
    each of its checkpoint_fractions f, those before the last update only."""
    total = options["max_steps"]
    steps = {max(1, round(f * total)) for f in options["checkpoint_fractions"]}
    return sorted(s for s in steps if s < total)


def finetuned_snapshots(config: dict, student: str, task: str) -> list[str]:
    """Which of a student's models are fine-tuned on a task: "final", and its saved checkpoints
    ("step<N>") for the finetune.checkpoint_tasks (the sample-efficiency curve)."""
    steps = checkpoint_steps(student_options(config, student)) if task in config["finetune"]["checkpoint_tasks"] else []
    return [f"step{s}" for s in steps] + ["final"]


def teachers_in_use(config: dict) -> list[str]:
    """Teachers that some student's objective needs (others are not run)."""
    used = {s["teacher"] for s in config["students"].values() if objective(s["objective"]).targets}
    return sorted(used)


def as_json(slice_: Any) -> str:
    return json.dumps(slice_, sort_keys=True, separators=(",", ":"))
