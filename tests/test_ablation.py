"""Ablations in one config (issue #31): dictionary variants per teacher, grids over student keys; which jobs
they make and which of them an edit reruns (the jobs, not only their rules)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from pipeline import ablation
from pipeline import config as cfg
from pipeline.common import StageError
from pipeline.data.integrity import read_record, write_record
from pipeline.plan import Planner, render
from pipeline.stages import call
from pipeline.wiring import RULES

from conftest import MINILM
from test_finetune_and_report import diagnostics
from test_plan import FixedRates
from test_pretrain import BASE, learning_curve
from test_wiring import dag, edited, reruns
from test_workflow import finetune_jobs, planned_jobs, snakemake, tiny_config


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
    assert ablation.grid_layout(config) == {"g": {"keys": ["dictionary", "mlm_weight"], "students": [
        ["g.dictionary-k12.mlm_weight-0.5", ["k12", 0.5]], ["g.dictionary-k12.mlm_weight-1.0", ["k12", 1.0]]]}}


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
    (("grids.g.student.lerning_rate", 2.0), "config key 'grids.g.student.lerning_rate': unknown key (allowed here:"),
    (("grids.g.sweep.lerning_rate", [2.0]), "config key 'grids.g.sweep.lerning_rate': unknown key (allowed here:"),
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


def grid_report(tmp_path, with_plots: bool = True):
    """A 2 x 2 grid (dictionary k64/k512 x mlm_weight 0.2/1.0) whose scores on t1 are 0.6 + seed/100, +0.05 with
    k512 and +0.02 with weight 1.0; an MLM student; the control at 0.55 + seed/100. Every student learned."""
    layout, scores, students = {"g": {"keys": ["dictionary", "mlm_weight"], "students": []}}, [], []
    rows = [(f"g.dictionary-{k}.mlm_weight-{w}", "mlsm+mlm", 0.6 + 0.05 * (k == "k512") + 0.02 * (w == 1.0),
             {"dictionary": k, "mlm_weight": w}) for k in ("k64", "k512") for w in (0.2, 1.0)]
    rows += [("mlm", "mlm", 0.58, None), ("none", "none", 0.55, None)]
    for student, objective, base, keys in rows:
        if keys:
            layout["g"]["students"].append([student, list(keys.values())])
        for seed in (1, 2, 3):
            path = tmp_path / f"{student}-{seed}.json"
            write_record(path, {"params": {"student": student, "objective": objective, "task_name": "t1",
                                           "seed": seed, "snapshot": "final"},
                                "pretrain_steps": 8, "score": base + seed / 100, "metrics": ["accuracy"],
                                "final": {"accuracy": base + seed / 100}})
            scores.append(str(path))
        gains = {"mlm": (1.0, 0.05)} if objective == "mlm" else {"mlm": (1.0, 0.05), "mlsm": (0.5, 0.02)}
        measured = [diagnostics(0, cosines=(0.53, 0.45, 0.0))]
        if objective != "none":
            measured.append(diagnostics(8, **gains))
        path = tmp_path / f"{student}.json"
        write_record(path, {"params": {"student": student, "objective": objective, "size": "tiny", "dropout": 0.1,
                                       "seed": 0}, "steps": 8, "final": {"step": 8}, "parameters": 10,
                            "tokens_per_second": 5.0, "diagnostics": measured})
        students.append(str(path))
    out = tmp_path / "report"
    params = json.loads(cfg.as_json({"device": "cpu", "grids": layout}))  # as the workflow passes it: keys sorted
    call("report", params, scores=scores, students=students, md=out / "r.md",
         csv=out / "r.csv", scores_plot=out / "r.png", curve_plot=out / "curve.png", manifest=out / "manifest.json",
         html=out / "r.html", **({"ablation": out / "ablation"} if with_plots else {}))
    return out


def test_the_report_reads_a_grid_by_its_swept_keys(tmp_path):
    import matplotlib.image

    out = grid_report(tmp_path)
    text = (out / "r.md").read_text()
    assert "## Ablation grid `g`: dictionary × mlm_weight" in text
    assert "### Against `dictionary`" in text and "### Against `mlm_weight`" in text
    # k64, weight 0.2: 0.61, 0.62, 0.63 over seeds; k512, weight 1.0: 0.68, 0.69, 0.70.
    assert "| mlm_weight 0.2 | k64 | 0.620 ± 0.010" in text and "| mlm_weight 1.0 | k512 | 0.690 ± 0.010" in text
    assert "| control `none` | – | 0.570 ± 0.010" in text
    # The pairs that differ in one key only, by seed: k512 - k64 = +0.05, weight 1.0 - 0.2 = +0.02, on every seed.
    assert text.count("| k64 → k512 | t1 | +0.050 | [+0.050, +0.050] | 3/3 | dictionary k512 higher |") == 2
    assert text.count("| 0.2 → 1.0 | t1 | +0.020 | [+0.020, +0.020] | 3/3 | mlm_weight 1.0 higher |") == 2
    assert "k64 → k512 | t1 | +0.070" not in text  # students that differ in both keys are no pair
    # MLSM against MLM: the grid's students are compared in one key at a time, not with the MLM student.
    assert "## MLSM against MLM" not in text
    listed = set(read_record(out / "manifest.json")["files"])
    assert listed >= {"ablation/g.dictionary.png", "ablation/g.mlm_weight.png"}
    for name in ("g.dictionary.png", "g.mlm_weight.png"):
        assert f"![g: {name[2:-4]}](ablation/{name})" in text
        image = matplotlib.image.imread(out / "ablation" / name)
        assert image.shape[1] > 600 and image[..., :3].std() > 0.05
    # The scores and the two keys' plots (no checkpoint was fine-tuned: no sample-efficiency plot).
    assert (out / "r.html").read_text().count('src="data:image/png;base64,') == 3


def test_without_the_plots_directory_the_grid_tables_stay(tmp_path):
    text = (grid_report(tmp_path, with_plots=False) / "r.md").read_text()
    assert "### Against `dictionary`" in text and "](ablation/" not in text


def test_the_plan_and_a_dry_run_show_the_grid_before_anything_runs(ablation_config, tmp_path):
    config = cfg.validate(ablation_config)
    planner = Planner(config, FixedRates(), cores=2)
    text = render("ablation.yaml", planner, planner.costs())
    assert "Dictionaries, each with its own fit_dictionary and targets jobs: minilm (K 24, lambda 0.05), " \
           "minilm@k12 (K 12, lambda 0.05)." in text
    assert "Grid g: 2 students (dictionary 1 x mlm_weight 2), pre-training " in text
    assert "g.dictionary-k12.mlm_weight-0.5 (" in text and "g.dictionary-k12.mlm_weight-1.0 (" in text
    configfile = tmp_path / "ablation.yaml"
    configfile.write_text(json.dumps(ablation_config))
    dry = snakemake(tmp_path, configfile, "--dry-run", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr
    counts = {line.split()[0]: int(line.split()[1]) for line in dry.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert (counts["pretrain_student"], counts["fit_dictionary"], counts["extract_activations"]) == (5, 2, 1)


@pytest.fixture(scope="module")
def corpus_with_validation(tmp_path_factory, corpus_text):
    from pipeline.corpus import shard

    out = tmp_path_factory.mktemp("corpus")
    shards, manifest, validation = [str(out / "shard-000.parquet")], str(out / "manifest.json"), str(
        out / "validation.parquet")
    shard([corpus_text], shards, manifest, {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0,
                                            "validation_fraction": 0.2}, validation)
    return shards, manifest, validation


def pretrain(corpus, tmp_path, name: str, params: dict, log_every: int, **more) -> dict:
    shards, manifest, validation = corpus
    return call("pretrain", {**params, "student": name}, corpus_shards=shards, corpus_manifest=manifest,
                validation=validation, model=tmp_path / name / "model", checkpoints=tmp_path / name / "checkpoints",
                summary=tmp_path / name / "summary.json", log_every=log_every, **more)


CONSTANT = {**BASE, "objective": "mlm", "lr_schedule": "constant", "warmup_steps": 2, "dropout": 0.1}


@pytest.mark.parametrize("log_every", [1, 10])
def test_a_longer_budget_continues_a_shorter_one_to_the_weights_of_a_run_from_scratch(
        tmp_path, corpus_with_validation, log_every):
    """Budgets under a constant schedule: 5 updates continued from a 3-update run end where 5 from scratch do
    (weights bit for bit on the CPU, losses, diagnostics, tokens), the shorter run's end leaving no trace."""
    from safetensors.torch import load_file

    straight = pretrain(corpus_with_validation, tmp_path, "straight", {**CONSTANT, "max_steps": 5}, log_every)
    pretrain(corpus_with_validation, tmp_path, "short", {**CONSTANT, "max_steps": 3}, log_every)
    assert (tmp_path / "short" / "checkpoints" / "state" / "state.safetensors").is_file()
    continued = pretrain(corpus_with_validation, tmp_path, "long", {**CONSTANT, "max_steps": 5}, log_every,
                         continue_from=tmp_path / "short" / "checkpoints",
                         continue_summary=tmp_path / "short" / "summary.json")
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("straight", "long"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert learning_curve(continued) == learning_curve(straight)
    assert [d["step"] for d in continued["diagnostics"]] == [0, 5]
    assert continued["diagnostics"] == straight["diagnostics"]
    assert continued["tokens_seen"] == straight["tokens_seen"]


def test_a_run_that_differs_in_more_than_its_budget_is_not_continued(tmp_path, corpus_with_validation):
    pretrain(corpus_with_validation, tmp_path, "short", {**CONSTANT, "max_steps": 2}, 10)
    with pytest.raises(StageError, match="differs from this one in more than its budget"):
        pretrain(corpus_with_validation, tmp_path, "long", {**CONSTANT, "max_steps": 4, "learning_rate": 5e-4}, 10,
                 continue_from=tmp_path / "short" / "checkpoints", continue_summary=tmp_path / "short" / "summary.json")
    # A schedule that decays by max_steps keeps no final state: nothing to continue from.
    pretrain(corpus_with_validation, tmp_path, "linear", {**CONSTANT, "lr_schedule": "linear", "max_steps": 2}, 10)
    assert not (tmp_path / "linear" / "checkpoints" / "state").exists()


def test_a_grid_over_budgets_chains_them_only_where_the_schedule_allows(ablation_config):
    config = edited(ablation_config, "grids.g.sweep", {"max_steps": [8, 2, 4]})
    config["grids"]["g"]["student"].update(lr_schedule="constant", warmup_steps=1, checkpoint_fractions=[])
    jobs = dag(config)
    inputs = {s: jobs["pretrain_student", json.dumps({"student": f"g.max_steps-{s}"})]["inputs"] for s in (2, 4, 8)}
    assert "continue_from" not in inputs[2]
    assert inputs[4]["continue_from"] == "results/students/g.max_steps-2/checkpoints"
    assert inputs[8]["continue_summary"] == "results/students/g.max_steps-4/summary.json"
    planner = Planner(cfg.validate(config), FixedRates(), cores=2)
    cost = {s: RULES["pretrain_student"].cost(planner, SimpleNamespace(student=f"g.max_steps-{s}"))[0]
            for s in (2, 4, 8)}
    assert cost[8] - planner.rates.startup(True) == pytest.approx(2 * (cost[4] - planner.rates.startup(True)))
    unset = edited(config, "grids.g.student", {k: v for k, v in config["grids"]["g"]["student"].items()
                                               if k != "warmup_steps"})  # a warm-up of a fraction of max_steps
    others = [edited(config, "grids.g.student.lr_schedule", "linear"), unset,
              edited(config, "grids.g.student.checkpoint_fractions", [0.5])]
    for other in others:
        assert not any("continue_from" in job["inputs"] for job in dag(other).values())


def test_a_config_of_grids_alone_needs_no_students_section(ablation_config):
    config = {k: v for k, v in ablation_config.items() if k != "students"}
    assert sorted(cfg.validate(config)["students"]) == ["g.dictionary-k12.mlm_weight-0.5",
                                                        "g.dictionary-k12.mlm_weight-1.0", "none"]
    with pytest.raises(cfg.ConfigError, match="config key 'students': no student; list students, or give grids"):
        cfg.validate({k: v for k, v in config.items() if k != "grids"})


@pytest.mark.e2e
def test_an_ablation_added_to_a_finished_run_runs_only_its_own_jobs(workflow_run):
    """Real Snakemake on the tiny run: a dictionary variant and a grid over it and the MLM weight add their
    dictionary, targets, students and fine-tuning; the corpus, the activations and every finished student stay."""
    workdir, _, config = workflow_run
    changed = json.loads(json.dumps(config))
    changed["teachers"]["minilm"]["dictionaries"] = {"k12": {"dictionary": {"atoms": 12}, "targets": {"top_k": 4}}}
    changed["grids"] = {"g": {"student": {"objective": "mlsm+mlm", "teacher": "minilm"},
                              "sweep": {"dictionary": ["k12"], "mlm_weight": [0.5, 1.0]}}}
    other = workdir / "ablation.yaml"
    other.write_text(yaml.safe_dump(changed))
    result = snakemake(workdir, other, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    parts = changed["corpus"]["shards"] + 1  # the training shards and the validation split
    assert planned_jobs(result) == {"fit_dictionary": 1, "precompute_targets": parts, "summarize_targets": 1,
                                    "pretrain_student": 2, "finetune": finetune_jobs(config, students=2),
                                    "report": 1, "all": 1}
    planned = re.findall(r"wildcards: (.*)", result.stdout)
    assert all("student=g.dictionary-k12" in w or "dictionary=minilm@k12" in w for w in planned), planned


def test_the_new_ports_stay_out_of_the_commands_of_configs_without_them(ablation_config):
    """Snakemake reruns a job whose command changed: a config without budgets or grids keeps the commands it had
    before this issue (no --continue-from, no --ablation), so that upgrading reruns none of its jobs."""
    from pipeline.wiring import command
    from pipeline.wiring.workflow import Workflow

    plain = Workflow(cfg.validate({k: v for k, v in ablation_config.items() if k != "grids"}
                                  | {"students": {"mlm": {"objective": "mlm"}}}))
    assert "--continue-from" not in command("pretrain_student", plain) and "--ablation" not in command("report", plain)
    assert "ablation" not in plain.outputs("report")
    budgets = edited(ablation_config, "grids.g.sweep", {"max_steps": [2, 4]})
    budgets["grids"]["g"]["student"].update(lr_schedule="constant", warmup_steps=1, checkpoint_fractions=[])
    chained = Workflow(cfg.validate(budgets))
    assert "{params.continue_from:q} {params.continue_summary:q}" in command("pretrain_student", chained)
    assert "--ablation {output.ablation:q}" in command("report", chained)


def test_a_validated_config_validates_again_to_itself(ablation_config):
    once = cfg.validate(ablation_config)
    assert cfg.validate(once) == once
