"""Stage 3: non-negative sparse dictionary learning on the L2-normalised sampled states (pipeline/dictionary.py)."""

from __future__ import annotations

from ..data import contract
from .base import DICTIONARY, RESUME, Resources, Rule, Shown, Stage, inp, out

STAGE = Stage("dictionary", "non-negative sparse dictionary learning on L2-normalised teacher states", (
    inp("activations", directory=True), inp("activations_manifest"),
    out("dictionary"), out("metrics"), out("atoms"), RESUME), settings=("checkpoint_seconds",), entry="fit")


def inputs(w, job):
    teacher = w.coding_teacher(job.dictionary)
    return {"activations": w.path(contract.ACTIVATIONS, teacher=teacher),
            "activations_manifest": w.path(contract.ACTIVATIONS_MANIFEST, teacher=teacher)}


def cost(plan, job):
    from ..plan import EARLY_STOP

    teacher, d, _ = plan.workflow.coding(job.dictionary)
    hidden = plan.hidden(teacher)
    rows = plan.config["activations"]["sample_tokens"] - d["heldout_tokens"]
    batches = d["epochs"] * max(1, rows // d["batch_size"]) * (EARLY_STOP if d["convergence_tolerance"] else 1)
    keys = ("atoms", "lambda", "batch_size", "code_iterations", "forgetting", "code_tolerance", "atom_block",
            "atom_sweeps")
    per_batch = plan.rates.dictionary_batch(hidden, plan.key({k: d[k] for k in keys}),
                                            FIT_DICTIONARY.job_threads(plan.workflow, job))
    return plan.rates.startup(True) + batches * per_batch, hidden * d["atoms"] * 4 + 2e4, 1


FIT_DICTIONARY = Rule(
    "fit_dictionary", STAGE, job="{dictionary}",
    outputs={"dictionary": contract.DICTIONARY, "metrics": contract.DICTIONARY_METRICS,
             "atoms": contract.DICTIONARY_ATOMS},
    inputs=inputs, params=lambda w, job: {**w.coding(job.dictionary)[1], "device": w.device},
    jobs=lambda w: [{"dictionary": c} for c in w.codings], cost=cost,
    threads=2, resources=Resources(mem_mb=8000, runtime=120, gpu=True), resumable=True,
    shown={"metrics": Shown("dictionary_metrics", DICTIONARY, (("dictionary", "{dictionary}"), ("record", "metrics"))),
           "atoms": Shown("dictionary_atoms", DICTIONARY, (("dictionary", "{dictionary}"), ("record", "atoms")))})
