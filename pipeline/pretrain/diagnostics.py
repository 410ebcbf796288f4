"""Training-health measurements of a student on the held-out sequences (corpus/validation.parquet), taken
at initialisation, at each saved checkpoint and at the end. The report judges them (pipeline/reporting/health.py);
here they are only measured, against baselines that need no training:

- MLM: the student's loss on the masked held-out tokens against the loss of predicting every masked token
  from the training tokens' frequencies (the unigram distribution of corpus/token_counts.npy, special
  tokens left out, unseen tokens given the Good-Turing missing mass n1/N), on the same tokens;
- MLSM: the student's KL loss against that of predicting the mean target distribution (the training
  targets' atom mass, targets record `atom_usage`, with half a token of mass added to every atom) and the
  uniform distribution over the K atoms, on the same masked positions;
- collapse: the mean pairwise cosine of the last layer's states at masked positions and at the other
  ordinary (real) tokens, and of the word embeddings of the tokens seen in training.

Losses are compared per token: `*_gain` is the baseline's mean loss minus the student's (positive: better
than the baseline) and `*_gain_se` its standard error with the held-out sequences as clusters (masked
tokens of one sequence are not independent). The masks are fixed by the seed and VALIDATION_BATCH, so
every student with the same seed is measured on the same masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formats import read_token_counts
from .data import Shard, make_batch

VALIDATION_MASKS = 1  # the held-out sequences' masks come from (seed, VALIDATION_MASKS, first row)
VALIDATION_BATCH = 32  # held-out sequences per forward pass (fixed: the masks depend on it)
TARGET_PSEUDO_MASS = 0.5  # tokens' worth of target mass added to every atom of the mean target distribution


@dataclass
class Baselines:
    """What a student's validation losses and embeddings are compared with."""

    unigram_log_probs: torch.Tensor | None = None  # [vocab]
    unigram_entropy: float | None = None  # of the training tokens' frequencies, in nats (no smoothing)
    unigram_missing_mass: float | None = None  # Good-Turing: the probability given to unseen tokens
    seen_tokens: torch.Tensor | None = None  # ids of the ordinary tokens that occur in training
    mean_target_log_probs: torch.Tensor | None = None  # [K]

    def record(self) -> dict:
        return {"unigram_entropy": self.unigram_entropy, "unigram_missing_mass": self.unigram_missing_mass,
                "seen_tokens": None if self.seen_tokens is None else len(self.seen_tokens),
                "atoms": None if self.mean_target_log_probs is None else len(self.mean_target_log_probs)}


def unigram(counts: np.ndarray, special_ids: list[int]) -> tuple[np.ndarray, float, float]:
    """(log probabilities over the vocabulary, entropy of the training frequencies, missing mass): the
    training tokens' frequencies without special tokens; tokens never seen share the Good-Turing missing
    mass n1/N (the fraction of tokens seen once), so that no held-out token has probability 0."""
    counts = counts.astype(np.float64).copy()
    counts[special_ids] = 0
    total = counts.sum()
    if total <= 0:
        raise ValueError("the token counts hold no ordinary token")
    frequencies = counts / total
    seen = counts > 0
    entropy = float(-(frequencies[seen] * np.log(frequencies[seen])).sum())
    ordinary = np.ones(len(counts), dtype=bool)
    ordinary[special_ids] = False
    unseen = ordinary & ~seen
    missing = min(max((counts == 1).sum(), 1) / total, 0.5) if unseen.any() else 0.0
    probabilities = frequencies * (1 - missing)
    probabilities[unseen] = missing / max(unseen.sum(), 1)
    with np.errstate(divide="ignore"):
        return np.log(probabilities), entropy, float(missing)


def baselines(token_counts: str | None, special_ids: list[int], atom_usage: list[float] | None) -> Baselines:
    out = Baselines()
    if token_counts:
        counts = read_token_counts(token_counts)
        log_probs, out.unigram_entropy, out.unigram_missing_mass = unigram(counts, special_ids)
        out.unigram_log_probs = torch.from_numpy(log_probs).float()
        ordinary = np.ones(len(counts), dtype=bool)
        ordinary[special_ids] = False
        out.seen_tokens = torch.from_numpy(np.flatnonzero((counts > 0) & ordinary))
    if atom_usage is not None:
        mass = np.asarray(atom_usage, dtype=np.float64) + TARGET_PSEUDO_MASS
        out.mean_target_log_probs = torch.from_numpy(np.log(mass / mass.sum())).float()
    return out


def mean_pairwise_cosine(unit_sum: torch.Tensor, count: int) -> float | None:
    """Mean cosine over the pairs of `count` vectors from the sum of their unit vectors:
    (|sum|^2 - n) / (n (n - 1))."""
    if count < 2:
        return None
    return float((unit_sum.double().pow(2).sum() - count) / (count * (count - 1)))


def _unit_sum(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.double(), dim=-1).sum(0)


class Clusters:
    """Per held-out sequence: the sum of (baseline loss - student loss) over its tokens, and their number;
    the mean gain and its cluster-robust standard error."""

    def __init__(self):
        self.gain: list[np.ndarray] = []
        self.count: list[np.ndarray] = []
        self.student = self.baseline = 0.0

    def add(self, rows: torch.Tensor, student: torch.Tensor, baseline: torch.Tensor | None, sequences: int) -> None:
        """Tokens of `sequences` held-out sequences: each one's sequence (row), its losses; no baseline: the
        student's loss alone."""
        self.student += float(student.sum())
        self.count.append(np.bincount(rows.numpy(), minlength=sequences))
        if baseline is not None:
            self.baseline += float(baseline.sum())
            self.gain.append(torch.zeros(sequences, dtype=torch.float64).index_add_(
                0, rows, (baseline - student).double()).numpy())

    def summary(self) -> dict:
        count = np.concatenate(self.count or [[]]).astype(np.int64)
        total = int(count.sum())
        if not total:
            return {}
        out = {"student": self.student / total, "tokens": total}
        if self.gain:
            gain, count = np.concatenate(self.gain)[count > 0], count[count > 0]
            mean, clusters = gain.sum() / total, len(count)
            se = (np.sqrt(clusters / (clusters - 1) * ((gain - mean * count) ** 2).sum()) / total
                  if clusters > 1 else float("nan"))
            out.update(baseline=self.baseline / total, gain=float(mean), gain_se=float(se), sequences=clusters)
        return out


def _mlsm_position_losses(logits: torch.Tensor, atoms: torch.Tensor, weights: torch.Tensor,
                          mean_log_probs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Per position with a target: KL(target || student), KL(target || mean target), KL(target || uniform)."""
    keep = weights.sum(1) > 0
    logits, atoms, weights = logits[keep].float(), atoms[keep], weights[keep]
    plogp = torch.where(weights > 0, weights * weights.clamp_min(1e-30).log(), torch.zeros_like(weights)).sum(1)
    student = plogp - (weights * F.log_softmax(logits, -1).gather(1, atoms)).sum(1)
    uniform = plogp + float(np.log(logits.shape[1]))
    mean = plogp - (weights * mean_log_probs[atoms]).sum(1) if mean_log_probs is not None else None
    return keep, student, mean, uniform


def measure(model, shard: Shard, tokenizer, params: dict, device, autocast, base: Baselines, with_mlm: bool,
            with_targets: bool) -> dict:
    """The student's losses against their baselines and its cosine statistics on the held-out sequences."""
    mlm, mlsm, uniform = Clusters(), Clusters(), Clusters()
    unit_sums = {"masked": 0.0, "real": 0.0}
    counts = {"masked": 0, "real": 0}
    model.eval()
    with torch.no_grad(), autocast:
        for start in range(0, len(shard), VALIDATION_BATCH):
            rows = np.arange(start, min(len(shard), start + VALIDATION_BATCH))
            batch = make_batch([(shard, rows)], tokenizer, params, mask_seed=(params["seed"], VALIDATION_MASKS, start))
            batch = {k: v.to(device) for k, v in batch.items()}
            states = model.encoder(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state
            special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids, device=device))
            real = batch["attention_mask"].bool() & ~special & ~batch["masked"]
            hidden, sequence = states[batch["masked"]], torch.nonzero(batch["masked"])[:, 0].cpu()
            for name, chosen in (("masked", hidden), ("real", states[real])):
                unit_sums[name] = unit_sums[name] + _unit_sum(chosen).cpu()
                counts[name] += len(chosen)
            logits = model.heads(hidden) if with_mlm or with_targets else {}
            if with_mlm:
                losses = F.cross_entropy(logits["mlm_logits"].float(), batch["labels"], reduction="none")
                unigram = base.unigram_log_probs
                mlm.add(sequence, losses.cpu(), None if unigram is None else -unigram[batch["labels"].cpu()],
                        len(rows))
            if with_targets:
                keep, student, mean, flat = _mlsm_position_losses(logits["mlsm_logits"], batch["target_atoms"],
                                                                  batch["target_weights"], _on(base, device))
                mlsm.add(sequence[keep.cpu()], student.cpu(), None if mean is None else mean.cpu(), len(rows))
                uniform.add(sequence[keep.cpu()], student.cpu(), flat.cpu(), len(rows))
    model.train()
    out = {f"{name}_cosine": mean_pairwise_cosine(unit_sums[name], counts[name]) if counts[name] else None
           for name in unit_sums}
    out["embedding_cosine"] = embedding_cosine(model, base)
    return {**out, **_losses("mlm", mlm.summary(), "unigram_loss"), **_mlsm_losses(mlsm.summary(), uniform.summary())}


def _on(base: Baselines, device) -> torch.Tensor | None:
    return None if base.mean_target_log_probs is None else base.mean_target_log_probs.to(device)


def embedding_cosine(model, base: Baselines) -> float | None:
    if base.seen_tokens is None or len(base.seen_tokens) < 2:
        return None
    rows = model.encoder.embeddings.word_embeddings.weight.detach()[base.seen_tokens.to(
        model.encoder.embeddings.word_embeddings.weight.device)]
    return mean_pairwise_cosine(_unit_sum(rows).cpu(), len(rows))


def _losses(name: str, summary: dict, baseline: str) -> dict:
    if not summary:
        return {}
    out = {f"validation_{name}": summary["student"], f"{name}_tokens": summary["tokens"]}
    if "gain" in summary:
        out.update({baseline: summary["baseline"], f"{name}_gain": summary["gain"],
                    f"{name}_gain_se": summary["gain_se"]})
    return out


def _mlsm_losses(mean: dict, uniform: dict) -> dict:
    if not uniform:
        return {}
    out = {"validation_mlsm": uniform["student"], "uniform_loss": uniform["baseline"], "mlsm_tokens": uniform["tokens"]}
    if "gain" in mean:
        out.update(mean_target_loss=mean["baseline"], mlsm_gain=mean["gain"], mlsm_gain_se=mean["gain_se"])
    return out
