"""How the report judges what it shows: the students' training-health diagnostics (measured by pre-training,
pipeline/pretrain/diagnostics.py), and the fine-tuning scores against the control (objective none) and
the majority-class baseline. The thresholds, all fixed in advance (none tuned to a run):

- MLM: the student has learned beyond token frequencies when its validation MLM loss is below that of
  predicting the training tokens' frequencies, on the same masked tokens, by more than the noise: the 95 %
  confidence interval of the per-token difference (sequences as clusters) lies above 0;
- MLSM: the same against predicting the mean target distribution (the uniform one is shown beside it);
- collapse: a mean pairwise cosine (final-layer states at masked positions, at real tokens, word
  embeddings) that moved more than halfway from its value at initialisation towards 1 (every vector
  pointing the same way): c >= c0 + COLLAPSE_SHARE * (1 - c0);
- fine-tuning: a score is within noise of the control when the 95 % bootstrap CI of its difference to the
  control, paired by seed, contains 0, and within noise of the majority class when the 95 % bootstrap CI of
  its mean reaches down to the majority-class score. With one seed there is no CI: not established.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..objectives import ARCHITECTURE_KEYS, objective

Z95 = 1.959964  # two-sided 95 % normal quantile
COLLAPSE_SHARE = 0.5
BOOTSTRAP_SAMPLES = 10_000


def bootstrap_ci(values, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over seeds (nan with fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summary_cell(values) -> str:
    """mean ± sample std [95 % bootstrap CI] over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    low, high = bootstrap_ci(values)
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} [{low:.3f}, {high:.3f}]"


def ci_cell(low: float, high: float) -> str:
    return "–" if np.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


# ---- pre-training diagnostics ------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str             # short, for tables: "MLM loss", "masked states", ...
    passed: bool
    shown: str            # the figures: "6.95 vs 6.95 nats"
    warning: str = ""     # the plain-language sentence where it fails


def is_control(summary: dict) -> bool:
    return not objective(summary["params"]["objective"]).trains


def measured(summary: dict, step: int | None = None) -> tuple[dict, dict]:
    """(diagnostics at initialisation, at `step`, by default the last measured) of a student's record."""
    entries = {d["step"]: d for d in summary.get("diagnostics", [])}
    if not entries:
        return {}, {}
    return entries.get(0, {}), entries.get(max(entries) if step is None else step, {})


def checks(summary: dict, step: int | None = None) -> list[Check]:
    """The diagnostics a student's model at `step` (default: the final one) passes or fails; none for the
    control, whose model is its initialisation."""
    if is_control(summary):
        return []
    initial, final = measured(summary, step)
    out = [c for c in (_loss_check(final, "mlm"), _loss_check(final, "mlsm")) if c is not None]
    for key, what in (("masked_cosine", "masked states"), ("real_cosine", "real-token states"),
                      ("embedding_cosine", "word embeddings")):
        if final.get(key) is not None and initial.get(key) is not None:
            out.append(_collapse_check(what, initial[key], final[key]))
    return out


def _loss_check(final: dict, name: str) -> Check | None:
    gain, se = final.get(f"{name}_gain"), final.get(f"{name}_gain_se")
    if gain is None:
        return None
    loss = final[f"validation_{name}"]
    low = gain - Z95 * se if np.isfinite(se) else float("-inf")
    if name == "mlm":
        baseline = final["unigram_loss"]
        shown = f"{loss:.3f} vs {baseline:.3f} (token frequencies)"
        warning = (f"has not learned beyond token frequencies: its validation MLM loss {loss:.3f} is not below "
                   f"the {baseline:.3f} nats of predicting every masked token from the training tokens' "
                   f"frequencies by more than the noise (difference {gain:+.3f} ± {Z95 * se:.3f})")
        return Check("MLM loss", bool(low > 0), shown, warning)
    baseline, uniform = final["mean_target_loss"], final["uniform_loss"]
    shown = f"{loss:.3f} vs {baseline:.3f} (mean target), {uniform:.3f} (uniform)"
    warning = (f"has not learned to predict the latent semantic targets: its validation MLSM loss {loss:.3f} is "
               f"not below the {baseline:.3f} of predicting the mean target distribution by more than the noise "
               f"(difference {gain:+.3f} ± {Z95 * se:.3f}; predicting the uniform distribution costs {uniform:.3f})")
    return Check("MLSM loss", bool(low > 0), shown, warning)


def _collapse_check(what: str, initial: float, final: float) -> Check:
    limit = initial + COLLAPSE_SHARE * (1 - initial)
    return Check(what, bool(final < limit), f"{final:.3f} (init {initial:.3f})",
                 f"has collapsed {what}: mean pairwise cosine {final:.3f}, against {initial:.3f} at "
                 f"initialisation (limit {limit:.3f}; 1 means every vector points the same way)")


def failed(summary: dict, step: int | None = None) -> list[Check]:
    return [c for c in checks(summary, step) if not c.passed]


def health_cell(summary: dict, step: int | None = None) -> str:
    """The verdict on a student's model at `step` (default: the final one)."""
    if is_control(summary):
        return "control (no pre-training)"
    found = checks(summary, step)
    if not found:
        return "not measured (no validation split)"
    bad = [c.name for c in found if not c.passed]
    return "fails: " + ", ".join(bad) if bad else "passes"


# ---- fine-tuning against the control and the majority class ------------------------------------

def architecture(summary: dict) -> tuple:
    return tuple(summary["params"].get(key) for key in ARCHITECTURE_KEYS)


def controls_of(summaries: dict[str, dict]) -> dict[str, str]:
    """Each pre-trained student -> the control student of its architecture (size, dropout, seed), if any."""
    controls = {architecture(s): name for name, s in sorted(summaries.items()) if is_control(s)}
    return {name: controls[architecture(s)] for name, s in summaries.items()
            if not is_control(s) and architecture(s) in controls}


def paired(rows: list[dict], a: str, b: str, task: str) -> dict | None:
    """Mean over seeds of (a's score - b's score) on task (final models, paired by seed), its 95 % bootstrap
    CI and on how many seeds a scored higher; None without a common seed."""
    scores = [{r["seed"]: r["score"] for r in rows if r["student"] == s and r["task"] == task
               and r["snapshot"] == "final"} for s in (a, b)]
    seeds = sorted(scores[0].keys() & scores[1].keys())
    if not seeds:
        return None
    diffs = [scores[0][s] - scores[1][s] for s in seeds]
    low, high = bootstrap_ci(diffs)
    return {"difference": float(np.mean(diffs)), "low": low, "high": high, "seeds": len(seeds),
            "wins": sum(d > 0 for d in diffs)}


def reading(low: float, high: float) -> str:
    """What a difference's 95 % CI says: above 0, below 0, within noise (contains 0), or one seed (no CI)."""
    if np.isnan(low):
        return "one seed: no CI"
    return "above" if low > 0 else "below" if high < 0 else "within noise"


def not_above(values: list[float], reference: float) -> bool:
    """A score is not above a reference beyond noise: the 95 % bootstrap CI of its mean reaches down to it
    (with one seed, no CI: not established either)."""
    low, _ = bootstrap_ci(values)
    return bool(np.isnan(low) or low <= reference)


def majority_score(metrics: tuple, train_labels: list[str], dev_labels: list[str]) -> float | None:
    """The task's score (GLUE convention: the mean of its first two metrics) of predicting the training set's
    most frequent label for every dev example; None for regression."""
    if metrics[0] == "pearson":
        return None
    counts = Counter(train_labels)
    majority = max(sorted(counts), key=counts.__getitem__)
    names = sorted(set(train_labels))
    positive = "1" if "1" in names else names[min(1, len(names) - 1)]
    hit = float(np.mean([label == majority for label in dev_labels]))
    share = float(np.mean([label == positive for label in dev_labels]))
    values = {"accuracy": hit, "mcc": 0.0,  # constant predictions have no correlation
              "f1": 2 * share / (1 + share) if majority == positive and share else 0.0}
    return float(np.mean([values[m] for m in metrics[:2]]))
