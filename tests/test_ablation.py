"""Ablations in one config (issue #31): dictionary variants per teacher, grids over student keys; which jobs
they make and which of them an edit reruns (the jobs, not only their rules)."""

from __future__ import annotations

import json

import pytest

from pipeline import ablation
from pipeline import config as cfg

from test_wiring import dag, edited, reruns
from test_workflow import tiny_config


@pytest.fixture(scope="module")
def ablation_config(tmp_path_factory):
    """The tiny config with a K = 12 variant of minilm's dictionary and a 2 x 2 grid over it."""
    config = tiny_config(tmp_path_factory.mktemp("teacher"))
    config["tasks"].pop("WNLI", None)
    config["teachers"]["minilm"]["dictionaries"] = {"k12": {"dictionary": {"atoms": 12},
                                                            "targets": {"top_k": 4}}}
    config["students"] = {"mlsm": {"objective": "mlsm", "teacher": "minilm"}, "mlm": {"objective": "mlm"}}
    config["grids"] = {"g": {"student": {"objective": "mlsm+mlm", "teacher": "minilm"},
                             "sweep": {"dictionary": ["k12"], "mlm_weight": [0.5, 1.0]}}}
    config["finetune"]["checkpoint_tasks"] = []
    return config


def jobs_of(jobs: dict, rule: str) -> list[dict]:
    return sorted((json.loads(w) for r, w in jobs if r == rule), key=json.dumps)


def test_a_grid_becomes_named_students_with_their_control(ablation_config):
    config = cfg.validate(ablation_config)
    assert sorted(config["students"]) == ["g.dictionary-k12.mlm_weight-0.5", "g.dictionary-k12.mlm_weight-1.0",
                                          "mlm", "mlsm", "none"]
    assert config["students"]["g.dictionary-k12.mlm_weight-1.0"] == {
        "objective": "mlsm+mlm", "teacher": "minilm", "dictionary": "k12", "mlm_weight": 1.0}
    assert ablation.grid_members(config)["g.dictionary-k12.mlm_weight-0.5"] == {
        "grid": "g", "keys": {"dictionary": "k12", "mlm_weight": 0.5}}


def test_each_dictionary_a_student_uses_runs_once_on_one_extraction(ablation_config):
    jobs = dag(ablation_config)
    assert jobs_of(jobs, "extract_activations") == [{"teacher": "minilm"}]
    assert jobs_of(jobs, "fit_dictionary") == [{"dictionary": "minilm"}, {"dictionary": "minilm@k12"}]
    params = {d["dictionary"]: json.loads(jobs["fit_dictionary", json.dumps(d)]["params"])
              for d in jobs_of(jobs, "fit_dictionary")}
    assert (params["minilm"]["atoms"], params["minilm@k12"]["atoms"]) == (24, 12)
    student = jobs["pretrain_student", json.dumps({"student": "g.dictionary-k12.mlm_weight-0.5"})]
    assert student["inputs"]["target_manifest"] == "results/targets/minilm@k12/manifest.json"
    assert json.loads(student["params"])["atoms"] == 12
    targets = json.loads(jobs["precompute_targets", json.dumps({"dictionary": "minilm@k12", "part": "shard-000"},
                                                               sort_keys=True)]["params"])
    assert (targets["top_k"], targets["teacher"]) == (4, "minilm")
    # The unnamed dictionary keeps its paths: a config without variants finds its results where they were.
    assert jobs["pretrain_student", json.dumps({"student": "mlsm"})]["inputs"]["target_manifest"] == \
        "results/targets/minilm/manifest.json"


def grid_student(values: str) -> tuple[str, str]:
    return "pretrain_student", json.dumps({"student": f"g.dictionary-k12.{values}"})


def test_editing_a_variant_reruns_only_its_dictionary_targets_and_students(ablation_config):
    before = dag(ablation_config)
    after = dag(edited(ablation_config, "teachers.minilm.dictionaries.k12.dictionary.lambda", 0.1))
    changed = reruns(before, after)
    variant = {job for job in before if "minilm@k12" in job[1]}
    students = {grid_student("mlm_weight-0.5"), grid_student("mlm_weight-1.0")}
    finetunes = {job for job in before if job[0] == "finetune" and "g.dictionary-k12" in job[1]}
    assert changed == variant | students | finetunes | {("report", "{}")}
    assert {r for r, _ in variant} == {"fit_dictionary", "precompute_targets", "summarize_targets"}


def test_editing_a_grid_reruns_only_what_it_changes(ablation_config):
    before = dag(ablation_config)
    # A value added: its students are new jobs; no job of the others reruns (the report reads them all).
    added = dag(edited(ablation_config, "grids.g.sweep.mlm_weight", [0.5, 1.0, 2.0]))
    assert reruns(before, added) == {("report", "{}")}
    assert set(added) - set(before) >= {grid_student("mlm_weight-2.0")}
    # A key every student of the grid shares: the grid's students rerun, the others do not.
    shared = reruns(before, dag(edited(ablation_config, "grids.g.student.learning_rate", 5e-4)))
    assert {job for job in shared if job[0] == "pretrain_student"} == {grid_student("mlm_weight-0.5"),
                                                                      grid_student("mlm_weight-1.0")}
    assert not {job for job in shared if job[0] in ("fit_dictionary", "precompute_targets")}


def test_a_variant_no_student_uses_makes_no_job(ablation_config):
    config = edited(ablation_config, "teachers.minilm.dictionaries.unused", {"dictionary": {"atoms": 8}})
    assert dag(config).keys() == dag(ablation_config).keys()


@pytest.mark.parametrize("edit, message", [
    (("grids.g.sweep.seed", list(range(40))), "config key 'grids.g': 80 students (dictionary 1 x mlm_weight 2 x "
                                              "seed 40), over grid_limit (64)"),
    (("grids.g.sweep.dictionary", ["k12", "k99"]), "config key 'students.g.dictionary-k99.mlm_weight-0.5."
                                                   "dictionary': teacher minilm has no dictionary 'k99'"),
    (("grids.g.sweep.mlm_weight", [0.5, "heavy"]), "config key 'grids.g.sweep.mlm_weight': 'heavy' is not of "
                                                   "type 'number'"),
    (("grids.g.student.mlm_weight", 2.0), "config key 'grids.g.student.mlm_weight': the grid also sweeps it"),
    (("grids.g.sweep.mlm_weight", [0.5, 0.5]), "config key 'grids.g.sweep': a value is listed twice"),
    (("grids.g.sweep.init", ["a b"]), "the student name 'g.dictionary-k12.mlm_weight-0.5.init-a b' is not a "
                                      "valid name"),
    (("teachers.minilm.dictionaries.k12.dictionary.atoms", 0), "config key 'teachers.minilm.dictionaries.k12."
                                                               "dictionary.atoms': 0 is less than the minimum of 1"),
    (("teachers.minilm.dictionaries.k12.targets.top_k", 20), "config key 'teachers.minilm.dictionaries.k12."
                                                             "targets.top_k': 20 is larger than dictionary.atoms (12)"),
    (("students.mlm.dictionary", "k12"), "config key 'students.mlm.dictionary': objective mlm learns no MLSM "
                                         "targets"),
])
def test_a_bad_ablation_is_one_clear_error(ablation_config, edit, message):
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate(edited(ablation_config, *edit))
    assert message in str(caught.value)


def test_a_grid_student_named_as_a_listed_student_is_refused(ablation_config):
    config = edited(ablation_config, "students", {**ablation_config["students"],
                                                  "g.dictionary-k12.mlm_weight-0.5": {"objective": "mlm"}})
    with pytest.raises(cfg.ConfigError, match="its student 'g.dictionary-k12.mlm_weight-0.5' is also a student of"):
        cfg.validate(config)
