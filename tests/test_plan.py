"""python -m pipeline.plan: every job's expected seconds and bytes from the config, its inputs and the rates
of the hardware class; and, after a run, its ratio to what the run's benchmark files and outputs say."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline import config as cfg
from pipeline import plan, plan_rates
from pipeline.common import StageError
from pipeline.corpus import shard
from pipeline.data import contract
from pipeline.data.text import input_files
from pipeline.plan import BYTES, Planner, actual_costs, render
from pipeline.plan_rates import Assumed, student_training_flops
from pipeline.wiring.workflow import Workflow

from conftest import MINILM, REPO, venv_env
from test_workflow import tiny_config


class FixedRates:
    """Rates of a made-up machine: every kind of work at a known speed."""

    name, basis, figures = "cpu", "fixed", {}

    def startup(self, heavy):
        return 3.0 if heavy else 0.5

    def tokenize_bytes_per_second(self, measured):
        return 1e6

    def teacher(self, source, layer, batch, length, threads, trust):
        return 1.0, 10_000.0

    def lasso(self, hidden, atoms, solver, threads):
        return 5_000.0

    def dictionary_batch(self, hidden, options, threads):
        return 0.1

    def training(self, options, objective, atoms, length, vocab, threads):
        from pipeline.objectives import objective as objective_named

        timed_as = objective_named(objective).rate_as or objective  # as the measured rates (kd: mlm's heads)
        return {"mlm": 2_000.0, "mlsm": 3_000.0, "mlsm+mlm": 1_500.0}[timed_as]

    def finetuning(self, size, batch, length, vocab, threads):
        return 4_000.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("teacher"))
    config["tasks"].pop("WNLI", None)  # only the demo's task, which the plan builds itself
    return cfg.validate(config)


@pytest.fixture(scope="module")
def planned(tiny):
    planner = Planner(tiny, FixedRates(), cores=2)
    return planner, {c.rule: c for c in planner.costs()}


def test_the_plan_has_every_job_of_the_workflow(tiny, planned):
    _, costs = planned
    jobs = {}
    for rule, _ in Workflow(tiny).jobs():
        jobs[rule] = jobs.get(rule, 0) + 1
    assert {rule: c.jobs for rule, c in costs.items()} == jobs


def test_the_corpus_estimate_is_the_corpus_stage_on_the_same_text(tmp_path, tiny, planned):
    planner, _ = planned
    text = planner.demo.path(f"{contract.BBC_DIR}/pretrain.txt.gz")  # the demo text, built by the plan
    paths = [str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")]
    held_out = tiny["corpus"]["validation_fraction"]
    manifest = shard(input_files([str(text)]), paths, str(tmp_path / "m.json"),
                     {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0, "validation_fraction": held_out},
                     str(tmp_path / "validation.parquet"))
    corpus, validation = planner.corpus, manifest["validation"]
    whole = manifest["tokens"] + validation["tokens"]
    assert corpus.tokens + corpus.validation_tokens == pytest.approx(whole, rel=0.01)
    # The stage holds out whole documents; the plan, their expected share of the tokens (a few documents of
    # the tiny corpus move the split by several per cent).
    assert corpus.tokens == pytest.approx(manifest["tokens"], rel=0.1)
    assert corpus.sequences == pytest.approx(manifest["sequences"], rel=0.1)


def test_a_corpus_slice_is_planned_as_the_slice(tmp_path, tiny):
    """corpus.max_documents: the plan sizes the documents the corpus stage reads, not the whole input."""
    options = {**tiny["corpus"], "max_documents": 12}
    planner = Planner({**tiny, "corpus": options}, FixedRates(), cores=2)
    text = planner.demo.path(f"{contract.BBC_DIR}/pretrain.txt.gz")
    paths = [str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")]
    manifest = shard(input_files([str(text)]), paths, str(tmp_path / "m.json"),
                     {"tokenizer": MINILM, "max_seq_len": 64, "seed": 0, "max_documents": 12,
                      "validation_fraction": options["validation_fraction"]}, str(tmp_path / "validation.parquet"))
    whole = manifest["tokens"] + manifest["validation"]["tokens"]
    assert planner.corpus.tokens + planner.corpus.validation_tokens == pytest.approx(whole, rel=0.02)


def test_each_stage_costs_its_work_at_the_rates(tiny, planned):
    planner, costs = planned
    corpus = planner.corpus
    tokens = 4 * 8 * round(corpus.mean_length)  # max_steps x batch_size x the mean sequence length
    assert costs["pretrain_student"].seconds == pytest.approx(  # 5 start-ups: 4 students and the control
        5 * 3.0 + tokens / 3_000 + tokens / 2_000 + tokens / 1_500 + tokens / 2_000 + tokens / 10_000)  # kd: +teacher
    task = planner.tasks["bbc_topic"]
    assert task.train == 64 and task.length == 64  # max_train_examples; whole articles cut to max_seq_len
    per_job = 3.0 + 64 * 64 / 4_000 + task.dev * 64 / (3 * 4_000)
    assert costs["finetune"].seconds == pytest.approx(costs["finetune"].jobs * per_job)
    target_tokens = corpus.tokens + corpus.validation_tokens
    assert costs["precompute_targets"].disk == pytest.approx(target_tokens * 8 * BYTES["target_per_atom"])
    assert costs["extract_activations"].disk == pytest.approx(1500 * (384 * BYTES["store_per_value"] + 14))


def test_the_measured_rates_time_the_pipelines_own_code(tiny, encoder_teacher, monkeypatch):
    monkeypatch.setattr(plan_rates, "MEASURE_SECONDS", 0.05)
    rates = plan_rates.Measured("cpu")
    options = Planner.key(cfg.student_options(tiny, "mlsm"))
    solver = Planner.key({"solver": "fast", "max_iterations": 100, "tolerance": 1e-2, "precision": "fp32",
                           "lambda": 0.05})
    dictionary = Planner.key({**tiny["dictionary"], "batch_size": 64})
    figures = [rates.training(options, objective, 24, 32, 30522, 1) for objective in ("mlsm", "mlsm+mlm", "kd")]
    figures += [rates.finetuning("tiny", 4, 32, 30522, 1), rates.lasso(32, 24, solver, 1),
                rates.teacher(str(encoder_teacher), -1, 4, 32, 1, False)[1]]
    assert all(f > 0 for f in figures) and 0 < rates.dictionary_batch(32, dictionary, 1) < 60
    assert 0 < rates.startup(False) < rates.startup(True)  # torch and transformers take longer to import
    assert "tiny mlsm training" in rates.figures and "dictionary K=24" in rates.figures


def test_a_gpu_class_uses_assumed_or_recorded_rates(tiny):
    options = {**cfg.student_options(tiny, "mlsm"), "size": "medium"}
    assumed = Assumed("h100")
    flops = student_training_flops(options, "mlsm", 3000, 128, 30522)
    assert assumed.training(Planner.key(options), "mlsm", 3000, 128, 30522, 1) == pytest.approx(989e12 * 0.2 / flops)
    recorded = Assumed("h100", {"pretrain": {"stage": 250_000.0}})  # the bench's medium mlsm student, K=3000
    assert recorded.training(Planner.key(options), "mlsm", 3000, 128, 30522, 1) == pytest.approx(250_000.0)
    assert "assumed fractions" in assumed.basis and "recorded benchmark rates" in recorded.basis


def test_a_hub_dataset_needs_the_corpus_size(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config["corpus"]["inputs"] = ["hf:someone/corpus"]
    configfile = tmp_path / "hub.yaml"
    configfile.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="hf:someone/corpus.*give the corpus' tokens with --corpus-tokens"):
        plan.main(["--configfile", str(configfile), "--hardware", "h100"])


@pytest.mark.e2e
def test_the_plan_of_the_tiny_dag_is_within_2x_of_its_run(workflow_run):
    workdir, configfile, config = workflow_run
    result = subprocess.run([sys.executable, "-m", "pipeline.plan", "--configfile", str(configfile), "--hardware",
                             "cpu", "--cores", "2", "--check", "results"], capture_output=True, text=True,
                            env=venv_env(PYTHONPATH=str(REPO)), cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    total = next(line for line in result.stdout.splitlines() if line.startswith("| total |")).split("|")
    cpu_ratio, disk_ratio = float(total[6]), float(total[9])  # predicted / CPU time, predicted / disk
    assert 0.5 <= cpu_ratio <= 2.0, result.stdout  # against the jobs' CPU time: the machine's load aside
    assert 0.8 <= disk_ratio <= 1.25, result.stdout
    actual = actual_costs(cfg.validate(config), workdir / "results", 2)
    assert actual["pretrain_student"].disk > 0 and actual["report"].seconds > 0


def test_the_check_names_jobs_without_a_benchmark_file():
    costs = [plan.Cost("fit_dictionary", 1, 10.0, 0, 1e6), plan.Cost("finetune", 2, 20.0, 0, 1e3)]
    actual = {"fit_dictionary": plan.Cost("fit_dictionary", 1, 12.0, 0, 1e6, 9.0, timed=1),
              "finetune": plan.Cost("finetune", 2, 8.0, 0, 1e3, 8.0, timed=1)}
    text = plan.render_check(costs, actual)
    assert "missing from the actual time: finetune (1 of 2)." in text
    assert "| total | 30.0 s | 20.0 s | 1.50 | 17.0 s | 1.76 |" in text


def with_stand_ins(config: dict, model: str, glue, ner=None) -> dict:
    """A shipped config whose hub models, corpus and task directories are local stand-ins: the tiny teacher
    (MiniLM's vocabulary), the demo's text, GLUE tasks (glue/<task>), a CoNLL task (ner)."""
    config = cfg.validate(config)

    def local(source):
        return source if source in (cfg.AUXILIARY_TEACHER, cfg.TRAINED_TOKENIZER, None) or \
            source.startswith("package:") else model

    config["corpus"]["inputs"] = [f"{contract.BBC_DIR}/pretrain.txt.gz"]
    config["corpus"]["tokenizer"] = local(config["corpus"]["tokenizer"])
    config["demo_data"]["bbc_news"]["enabled"] = True
    for teacher in config["teachers"].values():
        teacher["source"] = local(teacher["source"])
    for options in [config["pretrain"], *config["students"].values()]:
        for key in ("architecture", "init"):
            if options.get(key):
                options[key] = local(options[key])
    for task in config["tasks"].values():
        if task["format"] == "glue":
            task["path"] = str(glue / (task.get("glue_task") or task["path"].rstrip("/").rsplit("/", 1)[-1]))
        elif task["format"] == "conll":
            task["path"] = str(ner)
    return cfg.validate(config)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_config_in_the_repository_is_planned(name, mlm_teacher, tmp_path):
    """Issue #29: the plan crashed on the paper preset (no cost for shard_corpus_phase and summarize_phase_targets,
    no special-token count for reference_pairs, top_k none multiplied). Every job of every shipped config is
    costed by its rule's declaration."""
    from conftest import SHARED

    if not (SHARED / "glue").is_dir():
        pytest.skip("the GLUE tasks in ../shared/data stand in for the presets' tasks")
    import glue_fixtures

    glue = glue_fixtures.all_of_glue(tmp_path / "glue", SHARED / "glue")
    config = with_stand_ins(cfg.load_yaml(REPO / "config" / name), str(mlm_teacher), glue,
                            SHARED / "ner" / "conll2002-esp")
    planner = Planner(config, FixedRates(), cores=2)
    costs = {c.rule: c for c in planner.costs()}
    jobs = {}
    for rule, _ in planner.workflow.jobs():
        jobs[rule] = jobs.get(rule, 0) + 1
    assert {rule: c.jobs for rule, c in costs.items()} == jobs
    assert all(c.seconds > 0 and c.disk > 0 for c in costs.values()), costs


def enum_options(schema: dict, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(key path, value) for every value of every enumerated option under the schema's sections."""
    found = []
    for key, spec in (schema.get("properties") or {}).items():
        if "enum" in spec:
            found += [((*path, key), value) for value in spec["enum"]]
        elif "oneOf" in spec:  # a number or a named value (targets.top_k: none)
            found += [((*path, key), choice["const"]) for choice in spec["oneOf"] if "const" in choice]
        elif spec.get("type") == "object":
            found += enum_options(spec, (*path, key))
    return found


def test_every_value_of_every_option_is_planned(tiny):
    """Issue #34: the plan crashed on option values it had no cost for (packing reference_pairs, top_k none).
    Each enumerated option of the schema, at each of its values, is planned on the tiny config (the values a
    config may not combine with the rest of it are counted apart), and every job gets a finite cost."""
    import copy
    import math

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    options = [(path, value) for path, value in enum_options(schema) if path[0] not in ("tasks", "students")]
    from pipeline.objectives import OBJECTIVES  # the schema's objective enum is made from this registry

    student = next(iter(tiny["students"]))
    options += [(("students", student, "objective"), name) for name in OBJECTIVES]
    planned, refused = [], []
    for path, value in options:
        config = copy.deepcopy(tiny)
        where = config
        for key in path[:-1]:
            where = where.setdefault(key, {})
        where[path[-1]] = value
        try:
            config = cfg.validate(config)
        except cfg.ConfigError:
            refused.append((path, value))
            continue
        try:
            costs = Planner(config, FixedRates(), cores=2).costs()
        except StageError:  # a clear message: the inputs cannot be read so (corpus.format jsonl of a text file)
            refused.append((path, value))
            continue
        except Exception as err:
            raise AssertionError(f"{'.'.join(path)} = {value!r}: the plan failed") from err
        bad = [c.rule for c in costs if not (math.isfinite(c.seconds) and math.isfinite(c.disk) and c.seconds >= 0)]
        assert not bad, f"{'.'.join(path)} = {value!r}: no finite cost for {bad}"
        planned.append((path, value))
    assert (("targets", "top_k"), "none") in planned and (("corpus", "packing"), "reference_pairs") in planned
    assert len(planned) >= 40 and len(refused) < len(planned), (len(planned), refused)


def test_the_plan_counts_slurm_submissions_packed_and_the_trainees_on_several_nodes(tiny):
    """Issue #33: the plan shows the students spanning nodes (nodes x GPUs) and how many jobs a cluster gets;
    finetune.pack puts up to that many fine-tuning jobs of one model in one submission."""
    import copy
    import math

    config = copy.deepcopy(tiny)
    config["students"]["mlm"]["nodes"], config["students"]["mlm"]["gpus"] = 2, 4
    planner = Planner(config, FixedRates(), cores=2)
    text = render("tiny.yaml", planner, planner.costs())
    assert "Several nodes: students.mlm: 2 nodes x 4 GPUs." in text
    local = {"bbc_news_data", "summarize_targets", "report"}
    jobs = [rule for rule, _ in planner.workflow.jobs() if rule not in local]
    assert f"On SLURM (profiles/slurm): {len(jobs)} submissions: every job but" in text
    config["finetune"]["pack"] = 2
    planner = Planner(config, FixedRates(), cores=2)
    packed = render("tiny.yaml", planner, planner.costs())
    tasks, seeds, trained = len(config["tasks"]), len(config["finetune"]["seeds"]), 4  # the control has no checkpoint
    models = {"final": len(config["students"]), "step2": trained}
    per_model = {"final": tasks * seeds, "step2": len(config["finetune"]["checkpoint_tasks"]) * seeds}
    finetune = sum(models[m] * math.ceil(per_model[m] / 2) for m in models)
    others = sum(rule != "finetune" for rule in jobs)
    assert f"On SLURM (profiles/slurm): {others + finetune} submissions ({len(jobs)} jobs, packed by finetune.pack)" \
        in packed
