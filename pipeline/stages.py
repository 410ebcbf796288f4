"""A stage run from Python as its command line runs it: its paths (every port and setting of its declaration,
pipeline/wiring/<stage>.py) and `call`.

Each stage is a module `pipeline.<name>` whose function takes (paths, params): `paths` holds one entry per
port (a path, a list of paths, or None for an absent optional port) and the settings; `params` is its config
slice. Nothing here imports torch: the workflow reads it at every parse.
"""

from __future__ import annotations

from types import SimpleNamespace

from .wiring import SETTINGS, STAGES


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
