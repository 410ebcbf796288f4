"""The schema and the cross-key rules: defaults fill in, bad values name their key."""

import copy

import pytest

from pipeline import config as cfg

from conftest import REPO


@pytest.fixture()
def default():
    return cfg.load_yaml(REPO / "config" / "config.yaml")


def test_default_config_is_valid_and_complete(default):
    validated = cfg.validate(default)
    assert validated["dictionary"]["atoms"] == default["dictionary"]["atoms"]
    assert set(validated["students"]) == {"mlsm", "mlm", "mlsm_mlm", "none"}  # the control, added


def test_the_paper_preset_is_valid_and_holds_the_reference_recipe():
    paper = cfg.validate(cfg.load_yaml(REPO / "config" / "paper.yaml"))
    options = cfg.student_options(paper, "mlsm")
    assert options["size"] == "medium" and options["learning_rate"] == 1e-4
    assert options["batch_size"] * options["grad_accumulation"] == 1024 and paper["corpus"]["max_seq_len"] == 128
    assert (paper["dictionary"]["atoms"], paper["dictionary"]["lambda"]) == (3000, 0.05)


def test_the_glue_small_comparison_is_valid():
    small = cfg.validate(cfg.load_yaml(REPO / "config" / "glue-small.yaml"))
    assert {s["objective"] for s in small["students"].values()} == {"mlsm", "mlm", "kd", "mlsm+mlm", "none"}
    assert len(small["tasks"]) == 6 and len(small["finetune"]["seeds"]) == 3
    assert cfg.finetuned_snapshots(small, "mlsm", "RTE") == ["step500", "step1000", "final"]
    assert cfg.finetuned_snapshots(small, "mlsm", "SST-2") == ["final"]


def test_missing_options_take_schema_defaults():
    minimal = {"corpus": {"inputs": ["a.txt"], "tokenizer": "t"}, "teachers": {"t": {"source": "x"}},
               "students": {"s": {"objective": "mlsm", "teacher": "t"}},
               "tasks": {"x": {"format": "glue", "path": "glue/RTE"}}}
    validated = cfg.validate(minimal)
    assert validated["teachers"]["t"]["layer"] == -1
    assert validated["pretrain"]["mask_fraction"] == 0.15
    assert validated["finetune"]["seeds"] == [1, 2]
    assert "max_steps" not in validated["students"]["s"]  # students inherit the pretrain section


def test_student_overrides_pretrain_section(default):
    default["pretrain"]["max_steps"] = 7
    default["students"]["mlm"]["max_steps"] = 3
    validated = cfg.validate(default)
    assert cfg.student_options(validated, "mlm")["max_steps"] == 3
    assert cfg.student_options(validated, "mlsm")["max_steps"] == 7


def set_key(config, dotted, value):
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


@pytest.mark.parametrize("key, value, expected", [
    ("dictionary.atoms", "many", "dictionary.atoms"),          # wrong type
    ("corpus.max_seq_len", -5, "corpus.max_seq_len"),            # negative size
    ("dictionary.atoms", 0, "dictionary.atoms"),                 # K = 0
    ("dictionary.lambda", -0.1, "dictionary.lambda"),            # lambda < 0
    ("students.mlsm.objective", "mlsm2", "students.mlsm.objective"),  # unknown objective
    ("targets.top_k", 10_000, "targets.top_k"),                  # top-k > K
    ("students.mlsm.teacher", "bert", "students.mlsm.teacher"),  # unknown teacher
    ("pretrain.mask_fraction", 1.5, "pretrain.mask_fraction"),
    ("tasks.bbc_topic.format", "xml", "tasks.bbc_topic.format"),
    ("targets.top_k", "all", "targets.top_k"),                   # neither a number nor none
    ("targets.top_mass", 0, "targets.top_mass"),
    ("dictionary.iterations", 1000, "dictionary.iterations"),    # SPAMS's count for the torch backend
    ("students.mlsm.seq_len_schedule", [{"fraction": 0.9, "max_seq_len": 128}], "students.mlsm.seq_len_schedule"),
    ("students.mlsm.seq_len_schedule", [{"fraction": 1, "max_seq_len": 4}],
     "students.mlsm.seq_len_schedule.0.max_seq_len"),
    ("pretrain.mlsm_head", "shared", "pretrain.mlsm_head"),
    ("finetune.classifier_init", "zeros", "finetune.classifier_init"),
])
def test_bad_value_names_its_key(default, key, value, expected):
    set_key(default, key, value)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(default)
    assert f"'{expected}'" in str(err.value)


@pytest.mark.parametrize("where", ["", "dictionary.", "students.mlsm.", "teachers.minilm."])
def test_unknown_key_is_named(default, where):
    set_key(default, where + "atomz", 3)
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(default)
    assert f"'{where}atomz'" in str(err.value) and "unknown key" in str(err.value)


def test_a_student_from_a_checkpoint_takes_no_architecture(default):
    default["students"]["mlm"].update({"init": "results/students/x/model", "architecture": "bert-base-cased"})
    with pytest.raises(cfg.ConfigError, match=r"'students.mlm.init': .* give init or architecture, not both"):
        cfg.validate(default)


def test_mlsm_student_without_teacher_is_rejected(default):
    del default["students"]["mlsm"]["teacher"]
    with pytest.raises(cfg.ConfigError, match="students.mlsm.teacher"):
        cfg.validate(default)


def test_validation_does_not_modify_its_input(default):
    before = copy.deepcopy(default)
    cfg.validate(default)
    assert default == before


def test_only_teachers_of_mlsm_students_run(default):
    default["teachers"]["unused"] = {"source": "somewhere"}
    assert cfg.teachers_in_use(cfg.validate(default)) == ["minilm"]


def test_a_trained_tokenizer_needs_auxiliary_teachers(default):
    config = copy.deepcopy(default)
    config["corpus"]["tokenizer"] = cfg.TRAINED_TOKENIZER
    with pytest.raises(cfg.ConfigError, match=r"'teachers.minilm.source': with corpus.tokenizer 'train'"):
        cfg.validate(config)
    config["teachers"]["minilm"]["source"] = cfg.AUXILIARY_TEACHER
    validated = cfg.validate(config)
    assert validated["teachers"]["minilm"]["auxiliary"]["max_steps"] == 300  # the pretrain options' defaults
    assert validated["tokenizer_training"] == {"model": "wordpiece", "vocab_size": 16000, "lowercase": True,
                                               "min_frequency": 2, "max_sentences": 0, "normalizer": "bert"}


def test_a_control_is_added_for_every_architecture_of_the_pretrained_students(default):
    default["students"]["small"] = {"objective": "mlm", "size": "small"}
    default["students"]["other_seed"] = {"objective": "mlm", "seed": 3, "max_steps": 9}  # max_steps: not shape
    students = cfg.validate(default)["students"]
    controls = {name: s for name, s in students.items() if s["objective"] == "none"}
    assert controls == {"none": {"objective": "none"}, "none_small": {"objective": "none", "size": "small"},
                        "none_seed3": {"objective": "none", "seed": 3}}
    options = cfg.student_options(cfg.validate(default), "none_small")
    assert (options["size"], options["max_steps"], options["checkpoint_fractions"]) == ("small", 0, [])


def test_a_listed_control_is_kept_and_control_false_adds_none(default):
    default["students"]["floor"] = {"objective": "none"}
    assert {n for n, s in cfg.validate(default)["students"].items() if s["objective"] == "none"} == {"floor"}
    del default["students"]["floor"]
    default["control"] = False
    assert "none" not in cfg.validate(default)["students"]


def test_a_student_named_like_the_automatic_control_is_named(default):
    default["students"]["none"] = {"objective": "mlm", "size": "small"}
    with pytest.raises(cfg.ConfigError, match=r"'students.none': this name is the automatic control student's"):
        cfg.validate(default)


def test_the_glue_cpu_comparison_gives_every_student_the_same_budget():
    config = cfg.validate(cfg.load_yaml(REPO / "config" / "glue-cpu.yaml"))
    students = config["students"]
    assert sorted(s["objective"] for s in students.values()) == ["mlm", "mlsm", "mlsm+mlm", "none"]
    assert {"CoLA", "SST-2", "MRPC", "RTE"} <= set(config["tasks"]) and len(config["finetune"]["seeds"]) >= 3
    assert config["corpus"]["max_documents"] > 0 and config["device"] == "cpu"
    trained = [cfg.student_options(config, name) for name, s in students.items() if s["objective"] != "none"]
    budget = ("size", "max_steps", "batch_size", "grad_accumulation", "learning_rate", "warmup_fraction", "seed",
              "mask_fraction", "checkpoint_fractions")
    assert len({tuple(str(options[key]) for key in budget) for options in trained}) == 1
    assert trained[0]["checkpoint_fractions"] == [0.25, 0.5]
