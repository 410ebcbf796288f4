"""Stage 3, fit_dictionary: non-negative sparse dictionary learning on L2-normalised teacher states.

    min_D,A  sum_i 1/2 ||x_i - D a_i||^2 + lambda ||a_i||_1,   a_i >= 0,   columns of D unit-norm

Backends behind one interface (`backend`):
- `torch` (default, CPU or GPU): online dictionary learning (Mairal et al., 2010). Atoms start as
  states drawn k-means++-style (far from those already drawn); each mini-batch is coded with the fast
  non-negative lasso (pipeline.lasso, to a loose duality gap), the statistics A = sum a a^T and
  B = sum x a^T are accumulated with forgetting (weights of older batches shrink by (1 - b/seen)^rho,
  so codes of early, poor dictionaries fade), and each atom is updated by block-coordinate descent and
  renormalised. Atoms the codes stop using are re-drawn from the worst-reconstructed states of the
  batch. A few times per epoch the objective on held-out states is measured; the fit stops when it
  improves by less than `convergence_tolerance` twice in a row. The state is checkpointed between
  mini-batches, so a killed fit resumes.
- `sklearn`: scikit-learn's MiniBatchDictionaryLearning (positive codes), always installed.
- `spams`: SPAMS trainDL with the MLSM reference's settings (posAlpha, mode 2, lambda2 = 0), as many
  iterations of `batch_size` as `epochs` passes need; needs `pip install spams-bin` (extra `spams`).
The last `heldout_tokens` of the (shuffled) sample never enter training and give the held-out metrics.

    python -m pipeline.dictionary --activations a.zarr --activations-manifest manifest.json --dictionary D.npy \
        --metrics m.json --atoms atoms.json [--resume-dir state/] --params '{"atoms": 256, "lambda": 0.05, ...}'
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import contract
from .common import StageError, load_tokenizer, log, parser, pick_device, run_stage, set_cpu_threads
from .integrity import CHECKSUM_KEY, atomic_output, file_entries, read_verified, write_json, write_record
from .lasso import Lasso, l2_normalise, objective
from .resume import Resume
from .teacher import read_store

BACKENDS = ("torch", "sklearn", "spams")
CONVERGED_ITERATIONS, CONVERGED_TOLERANCE = 3000, 1e-4  # held-out codes: relative duality gap 1e-4
CHECK_TOKENS = 4096  # held-out states scored at each convergence check
DEAD_USAGE = 1e-4  # an atom whose A_jj is below this fraction of the mean is dead


def init_atoms(x: torch.Tensor, atoms: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere: each next atom is a state drawn with probability
    proportional to its distance 1 - max cos to the atoms drawn so far. Returns [d, atoms]."""
    pool = x[torch.randperm(len(x), generator=generator)[: min(len(x), 20 * atoms)].to(x.device)]
    chosen = [int(torch.randint(len(pool), (1,), generator=generator))]
    distance = (1.0 - pool @ pool[chosen[0]]).clamp_min(0)
    for _ in range(atoms - 1):
        weights = distance.cpu().double()
        index = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(len(pool), (1,), generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1.0 - pool @ pool[index]).clamp_min(0))
    return pool[chosen].T.contiguous()


def learn(x: torch.Tensor, atoms: int, lam: float, batch_size: int, epochs: int, code_iterations: int,
          generator: torch.Generator, resume: Resume | None = None, heldout: torch.Tensor | None = None,
          forgetting: float = 4.0, code_tolerance: float = 5e-2, checks_per_epoch: int = 4,
          convergence_tolerance: float = 0.0) -> tuple[torch.Tensor, list]:
    """Dictionary [d, K] with unit-norm columns learned from L2-normalised rows of x [n, d], and the
    held-out curve [[mini-batches, objective], ...] (with `heldout`).

    One unit of work is one mini-batch; `resume` checkpoints the whole state between units."""
    n, d = x.shape
    if n < atoms:
        raise StageError(f"{n} training states cannot initialise {atoms} atoms; sample more tokens")
    starts = list(range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size))
    check_every = max(1, len(starts) // max(1, checks_per_epoch))
    saved = resume.load_state() if resume is not None else None
    if saved is None:
        dictionary = init_atoms(x, atoms, generator)
        stat_a = torch.zeros(atoms, atoms, dtype=x.dtype, device=x.device)
        stat_b = torch.zeros(d, atoms, dtype=x.dtype, device=x.device)
        unit, seen, order, curve = 0, 0, None, []
    else:
        meta, state = saved
        dictionary, stat_a, stat_b = (state[k].to(x.device) for k in ("dictionary", "stat_a", "stat_b"))
        order = state["order"].to(x.device)
        generator.set_state(state["generator"])
        unit, seen, curve = meta["unit"], meta["seen"], meta["curve"]
    while unit < epochs * len(starts) and not _converged(curve, convergence_tolerance):
        epoch, start = divmod(unit, len(starts))
        if start == 0:
            order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        batch = x[order[starts[start] : starts[start] + batch_size]]
        codes = Lasso(dictionary, lam, "fast", code_iterations, code_tolerance)(batch).codes
        seen += len(batch)
        decay = (1.0 - len(batch) / seen) ** forgetting
        stat_a.mul_(decay).add_(codes.T @ codes)
        stat_b.mul_(decay).add_(batch.T @ codes)
        _update_atoms(dictionary, stat_a, stat_b)
        _resample_dead(dictionary, stat_a, stat_b, batch, codes, unit, generator)
        unit += 1
        if heldout is not None and (unit % check_every == 0 or unit == epochs * len(starts)):
            value = float(objective(heldout, dictionary, Lasso(dictionary, lam, "fast", 500, 1e-2)(heldout).codes,
                                    lam).mean())
            curve.append([unit, value])
            log.info("dictionary: %d mini-batches (epoch %.2f), held-out objective %.4f", unit, unit / len(starts), value)
        if resume is not None and resume.due():
            resume.save_state(unit, {"seen": seen, "curve": curve},
                              {"dictionary": dictionary, "stat_a": stat_a, "stat_b": stat_b, "order": order,
                               "generator": generator.get_state()})
    return dictionary, curve


def _converged(curve: list, tolerance: float) -> bool:
    """The held-out objective improved by less than `tolerance` (relative) at the last two checks."""
    if tolerance <= 0 or len(curve) < 3:
        return False
    values = [value for _, value in curve[-3:]]
    return all(before - after < tolerance * before for before, after in zip(values, values[1:]))


def _update_atoms(dictionary: torch.Tensor, stat_a: torch.Tensor, stat_b: torch.Tensor) -> None:
    for j in range(dictionary.shape[1]):
        if stat_a[j, j] <= 1e-10:
            continue
        update = dictionary[:, j] + (stat_b[:, j] - dictionary @ stat_a[:, j]) / stat_a[j, j]
        dictionary[:, j] = update / torch.linalg.vector_norm(update).clamp_min(1e-12)


def _resample_dead(dictionary, stat_a, stat_b, batch, codes, unit, generator) -> None:
    """Atoms no code has used lately (A_jj tiny next to the others) restart as the worst-reconstructed
    states of the batch, with their statistics cleared."""
    usage = torch.diagonal(stat_a)
    dead = torch.nonzero(usage <= DEAD_USAGE * usage.mean()).flatten()
    if len(dead) == 0:
        return
    errors = (batch - codes @ dictionary.T).pow(2).sum(1)
    worst = torch.argsort(errors, descending=True)[: len(dead)]
    dead = dead[: len(worst)]
    dictionary[:, dead] = l2_normalise(batch[worst]).T
    stat_a[dead, :] = 0
    stat_a[:, dead] = 0
    stat_b[:, dead] = 0
    if unit % 50 == 0:
        log.info("dictionary: %d dead atoms re-drawn at mini-batch %d", len(dead), unit)


def learn_sklearn(x: torch.Tensor, params: dict) -> torch.Tensor:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    model = MiniBatchDictionaryLearning(
        n_components=params["atoms"], alpha=params["lambda"], batch_size=params["batch_size"],
        max_iter=params["epochs"], positive_code=True, fit_algorithm="cd", transform_algorithm="lasso_cd",
        transform_alpha=params["lambda"], random_state=params["seed"], n_jobs=os.cpu_count())
    model.fit(x.cpu().numpy().astype(np.float64))
    return l2_normalise(torch.from_numpy(model.components_).float()).T.contiguous().to(x.device)


def learn_spams(x: torch.Tensor, params: dict, threads: int | None = None) -> torch.Tensor:
    try:
        import spams
    except ImportError:
        raise StageError("dictionary backend spams needs SPAMS: pip install spams-bin (or the extra mlsm-pipeline[spams])") from None
    iterations = math.ceil(params["epochs"] * len(x) / params["batch_size"])
    data = np.asfortranarray(x.cpu().numpy().T.astype(np.float64))
    dictionary = spams.trainDL(data, K=params["atoms"], lambda1=params["lambda"], mode=2, lambda2=0.0,
                               posAlpha=True, iter=iterations, batchsize=params["batch_size"],
                               numThreads=threads or os.cpu_count() or 1, verbose=False)
    return l2_normalise(torch.from_numpy(np.asarray(dictionary).T).float()).T.contiguous().to(x.device)


def evaluate(x: torch.Tensor, dictionary: torch.Tensor, lam: float) -> tuple[dict, torch.Tensor]:
    """Held-out metrics with converged codes, and those codes."""
    solver = Lasso(dictionary, lam, "fast", CONVERGED_ITERATIONS, CONVERGED_TOLERANCE)
    codes, gram = solver(x).codes, solver.gram
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
        "lipschitz": solver.lip,
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
    if len(train) < params["atoms"]:
        raise StageError(f"{len(train)} training states (after {n_heldout} held out) cannot initialise "
                         f"{params['atoms']} atoms; sample more tokens (activations.sample_tokens) or use fewer atoms")
    resume = Resume(resume_dir, {"params": params, "activations": store_record[CHECKSUM_KEY]})
    started = time.perf_counter()
    curve = []
    if params["backend"] == "torch":
        dictionary, curve = learn(train, params["atoms"], params["lambda"], params["batch_size"], params["epochs"],
                                  params["code_iterations"], generator, resume, heldout[:CHECK_TOKENS],
                                  params["forgetting"], params["code_tolerance"], params["checks_per_epoch"],
                                  params["convergence_tolerance"])
    elif params["backend"] == "sklearn":
        dictionary = learn_sklearn(train, params)
    else:
        dictionary = learn_spams(train, params)
    log.info("dictionary: %s backend fitted K=%d in %.1f s", params["backend"], params["atoms"],
             time.perf_counter() - started)
    metrics, codes = evaluate(heldout, dictionary, params["lambda"])
    metrics.update({"format_version": contract.FORMAT_VERSION["dictionary"], "atoms": params["atoms"],
                    "lambda": params["lambda"], "hidden_size": int(x.shape[1]), "train_tokens": len(train),
                    "heldout_tokens": n_heldout, "teacher": attrs["teacher"], "layer": attrs["layer"],
                    "backend": params["backend"], "heldout_curve": curve})
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
