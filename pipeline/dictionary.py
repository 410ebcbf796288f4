"""Stage 3, fit_dictionary: non-negative sparse dictionary learning on L2-normalised teacher states.

Online dictionary learning (Mairal et al., 2010): mini-batches of states are coded with the
non-negative lasso (pipeline.lasso), the sufficient statistics A = sum a a^T and B = sum x a^T are
accumulated, and each atom is updated by block-coordinate descent and renormalised to unit length.
Atoms no code uses are re-drawn from the worst-reconstructed states of the batch. The last
`heldout_tokens` of the (shuffled) sample never enter training and give the held-out metrics.

    python -m pipeline.dictionary --activations a.zarr --activations-manifest manifest.json --dictionary D.npy \
        --metrics m.json --atoms atoms.json [--resume-dir state/] --params '{"atoms": 256, "lambda": 0.05, ...}'
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import contract
from .common import StageError, load_tokenizer, log, parser, pick_device, run_stage, set_cpu_threads
from .integrity import CHECKSUM_KEY, atomic_output, file_entries, read_verified, write_json, write_record
from .lasso import fista, l2_normalise, lipschitz, objective
from .resume import Resume
from .teacher import read_store

CONVERGED_ITERATIONS, CONVERGED_TOLERANCE = 1000, 1e-6


def learn(x: torch.Tensor, atoms: int, lam: float, batch_size: int, epochs: int, code_iterations: int,
          generator: torch.Generator, resume: Resume | None = None) -> torch.Tensor:
    """Dictionary [d, K] with unit-norm columns learned from L2-normalised rows of x [n, d].

    One unit of work is one mini-batch; `resume` checkpoints the whole state between units."""
    n, d = x.shape
    if n < atoms:
        raise StageError(f"{n} training states cannot initialise {atoms} atoms; sample more tokens")
    starts = list(range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size))
    saved = resume.load_state() if resume is not None else None
    if saved is None:
        # Init on data points; contiguous, as a restored checkpoint is (the layout changes float sums).
        dictionary = x[torch.randperm(n, generator=generator)[:atoms]].T.contiguous()
        stat_a = torch.zeros(atoms, atoms, dtype=x.dtype, device=x.device)
        stat_b = torch.zeros(d, atoms, dtype=x.dtype, device=x.device)
        unit, seen, order = 0, 0, None
    else:
        meta, state = saved
        dictionary, stat_a, stat_b = (state[k].to(x.device) for k in ("dictionary", "stat_a", "stat_b"))
        order = state["order"].to(x.device)
        generator.set_state(state["generator"])
        unit, seen = meta["unit"], meta["seen"]
    while unit < epochs * len(starts):
        epoch, start = divmod(unit, len(starts))
        if start == 0:
            order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        batch = x[order[starts[start] : starts[start] + batch_size]]
        codes, _ = fista(batch, dictionary, lam, code_iterations)
        # Down-weight the statistics of early, poor dictionaries (Mairal's beta for t < batch).
        seen += len(batch)
        decay = (1.0 - len(batch) / seen) if epoch == 0 else 1.0
        stat_a.mul_(decay).add_(codes.T @ codes)
        stat_b.mul_(decay).add_(batch.T @ codes)
        _update_atoms(dictionary, stat_a, stat_b)
        _resample_dead(dictionary, stat_a, stat_b, batch, codes, generator)
        unit += 1
        if resume is not None and resume.due():
            resume.save_state(unit, {"seen": seen}, {"dictionary": dictionary, "stat_a": stat_a, "stat_b": stat_b,
                                                     "order": order, "generator": generator.get_state()})
    return dictionary


def _update_atoms(dictionary: torch.Tensor, stat_a: torch.Tensor, stat_b: torch.Tensor) -> None:
    for j in range(dictionary.shape[1]):
        if stat_a[j, j] <= 1e-10:
            continue
        update = dictionary[:, j] + (stat_b[:, j] - dictionary @ stat_a[:, j]) / stat_a[j, j]
        dictionary[:, j] = update / torch.linalg.vector_norm(update).clamp_min(1e-12)


def _resample_dead(dictionary, stat_a, stat_b, batch, codes, generator) -> None:
    dead = torch.nonzero(torch.diagonal(stat_a) <= 1e-10).flatten()
    if len(dead) == 0:
        return
    errors = (batch - codes @ dictionary.T).pow(2).sum(1)
    worst = torch.argsort(errors, descending=True)[: len(dead)]
    dictionary[:, dead[: len(worst)]] = l2_normalise(batch[worst]).T
    stat_a[dead, :] = 0
    stat_a[:, dead] = 0
    stat_b[:, dead] = 0


def evaluate(x: torch.Tensor, dictionary: torch.Tensor, lam: float) -> tuple[dict, torch.Tensor]:
    """Held-out metrics with converged codes, and those codes."""
    gram = dictionary.T @ dictionary
    codes, _ = fista(x, dictionary, lam, CONVERGED_ITERATIONS, CONVERGED_TOLERANCE, gram=gram)
    nnz = (codes > 0).sum(1).float()
    residual = torch.linalg.vector_norm(x - codes @ dictionary.T, dim=1)
    off_diagonal = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    metrics = {
        "heldout_objective": float(objective(x, dictionary, codes, lam).mean()),
        "relative_residual": float((residual / torch.linalg.vector_norm(x, dim=1)).mean()),
        "mean_nnz": float(nnz.mean()),
        "p99_nnz": float(torch.quantile(nnz, 0.99)),
        "zero_code_fraction": float((nnz == 0).float().mean()),
        "atoms_used_fraction": float(((codes > 0).any(0)).float().mean()),
        "mutual_coherence": float(off_diagonal.abs().max()),
        "lipschitz": lipschitz(gram),
    }
    return metrics, codes


def browse_atoms(codes: torch.Tensor, token_ids: np.ndarray, tokenizer, n_atoms: int, per_atom: int = 8) -> list[dict]:
    """For the most-used atoms, the tokens whose states load on them most."""
    usage = codes.sum(0)
    atoms = torch.argsort(usage, descending=True)[:n_atoms]
    table = []
    for atom in atoms.tolist():
        loads = codes[:, atom]
        top = torch.argsort(loads, descending=True)[: per_atom * 4].tolist()
        tokens, seen = [], set()
        for row in top:
            if loads[row] <= 0 or len(tokens) == per_atom:
                break
            token = tokenizer.convert_ids_to_tokens(int(token_ids[row]))
            if token not in seen:
                seen.add(token)
                tokens.append({"token": token, "weight": round(float(loads[row]), 4)})
        table.append({"atom": atom, "usage": round(float(usage[atom]), 4),
                      "tokens_used": int((loads > 0).sum()), "top_tokens": tokens})
    return table


def fit(activations: str, activations_manifest: str, dictionary_path: str, metrics_path: str, atoms_path: str,
        params: dict, resume_dir: str | None = None) -> dict:
    set_cpu_threads()
    store_record = read_verified(activations_manifest, [activations])
    attrs, arrays = read_store(activations)
    states = arrays["states"].astype(np.float32)
    if not np.isfinite(states).all():
        bad = int(np.flatnonzero(~np.isfinite(states).all(1))[0])
        raise StageError(f"activation store {activations}: non-finite state in row {bad}")
    device = pick_device(params.get("device", "auto"))
    generator = torch.Generator().manual_seed(params["seed"])
    order = torch.randperm(len(states), generator=generator)
    x = l2_normalise(torch.from_numpy(states)[order].to(device))
    n_heldout = params["heldout_tokens"]
    train, heldout = x[:-n_heldout], x[-n_heldout:]
    resume = Resume(resume_dir, {"params": params, "activations": store_record[CHECKSUM_KEY]})
    dictionary = learn(train, params["atoms"], params["lambda"], params["batch_size"], params["epochs"],
                       params["code_iterations"], generator, resume)
    metrics, codes = evaluate(heldout, dictionary, params["lambda"])
    metrics.update({"format_version": contract.FORMAT_VERSION["dictionary"], "atoms": params["atoms"],
                    "lambda": params["lambda"], "hidden_size": int(x.shape[1]), "train_tokens": len(train),
                    "heldout_tokens": n_heldout, "teacher": attrs["teacher"], "layer": attrs["layer"]})
    heldout_ids = arrays["token_ids"][order[-n_heldout:].numpy()]
    atom_table = browse_atoms(codes.cpu(), heldout_ids, load_tokenizer(attrs["tokenizer"]), params["browse_atoms"])
    with atomic_output(dictionary_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, dictionary.cpu().numpy().astype(np.float32))
    write_json(atoms_path, atom_table)
    metrics["files"] = file_entries(Path(metrics_path).parent, [dictionary_path, atoms_path])
    write_record(metrics_path, metrics)
    resume.finish()
    log.info("dictionary: K=%d lambda=%g held-out objective %.4f, mean nnz %.1f, atoms used %.2f",
             params["atoms"], params["lambda"], metrics["heldout_objective"], metrics["mean_nnz"],
             metrics["atoms_used_fraction"])
    return metrics


def load_dictionary(path: str) -> np.ndarray:
    """The dictionary [d, K] (verify it against the stage's metrics record first)."""
    try:
        dictionary = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StageError(f"dictionary {path} is unreadable: {err}") from None
    if dictionary.ndim != 2 or not np.allclose(np.linalg.norm(dictionary, axis=0), 1, atol=1e-3):
        raise StageError(f"dictionary {path} is not a [d, K] matrix with unit-norm columns")
    return dictionary


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--activations", required=True)
    p.add_argument("--activations-manifest", required=True)
    p.add_argument("--dictionary", required=True)
    p.add_argument("--metrics", required=True, help="metrics and checksums of the dictionary and atoms files")
    p.add_argument("--atoms", required=True)
    p.add_argument("--resume-dir", help="where the resumable state of this job is kept")
    args = p.parse_args(argv)
    fit(args.activations, args.activations_manifest, args.dictionary, args.metrics, args.atoms, args.params,
        args.resume_dir)


if __name__ == "__main__":
    run_stage(main)
