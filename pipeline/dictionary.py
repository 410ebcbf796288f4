"""Stage 3, fit_dictionary: non-negative sparse dictionary learning on L2-normalised teacher states.

    min_D,A  sum_i 1/2 ||x_i - D a_i||^2 + lambda ||a_i||_1,   a_i >= 0,   columns of D unit-norm

Backends behind one interface (`backend`):
- `torch` (default, CPU or GPU): online dictionary learning, pipeline/solvers/dictlearn.py (streams mini-batches
  from the store, block atom updates, resumable, stops on the held-out objective).
- `sklearn`: scikit-learn's MiniBatchDictionaryLearning (positive codes), always installed.
- `spams`: SPAMS trainDL with the MLSM reference's settings (posAlpha, SPAMS's mode 2 and lambda2 1e-9): `iterations`
  mini-batches of `batch_size` (the reference: 1000 of 400), or as many as `epochs` passes need; needs
  `pip install spams-bin` (extra `spams`).
`heldout_tokens` states drawn at random (seeded) never enter training and give the held-out metrics:
objective with converged codes, residual, nnz, atoms used, coherence, and the atom browser (the tokens
loading most on the most-used atoms).

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

from .cli import run
from .common import StageError, log, pick_device, set_cpu_threads
from .data import contract
from .data.formats import open_store, write_dictionary
from .data.integrity import CHECKSUM_KEY, file_entries, read_verified, write_json, write_record
from .models import load_tokenizer
from .resume import Resume
from .solvers.dictlearn import StoreBatches, learn, read_rows
from .solvers.lasso import Lasso, l2_normalise, objective

CONVERGED_ITERATIONS, CONVERGED_TOLERANCE = 3000, 1e-4  # held-out codes: relative duality gap 1e-4
CHECK_TOKENS = 4096  # held-out states scored at each convergence check


def learn_sklearn(x: torch.Tensor, params: dict) -> torch.Tensor:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    model = MiniBatchDictionaryLearning(
        n_components=params["atoms"], alpha=params["lambda"], batch_size=params["batch_size"],
        max_iter=params["epochs"], positive_code=True, fit_algorithm="cd", transform_algorithm="lasso_cd",
        transform_alpha=params["lambda"], random_state=params["seed"], n_jobs=os.cpu_count())
    model.fit(x.cpu().numpy().astype(np.float64))
    return l2_normalise(torch.from_numpy(model.components_).float()).T.contiguous().to(x.device)


def spams_iterations(params: dict, states: int) -> int:
    """SPAMS trainDL's iter: the configured count (the reference's semantics), else epochs passes of batch_size."""
    if params.get("iterations"):
        return int(params["iterations"])
    return math.ceil(params["epochs"] * states / params["batch_size"])


REFERENCE_SPAMS_THREADS = 8  # train_dict.py's numThreads


def learn_spams(x: torch.Tensor, params: dict, threads: int | None = None) -> torch.Tensor:
    iterations = spams_iterations(params, len(x))
    reference = params.get("spams_call", "pipeline") == "reference"
    return train_spams(x, params["atoms"], params["lambda"], iterations, params["batch_size"],
                       REFERENCE_SPAMS_THREADS if reference else threads, reference)


def train_spams(x: torch.Tensor, atoms: int, lam: float, iterations: int, batch_size: int,
                threads: int | None = None, as_the_reference: bool = False) -> torch.Tensor:
    """SPAMS trainDL called with the MLSM reference's train_dict.py's settings (K, lambda1, iter, batchsize,
    posAlpha; SPAMS's defaults for the rest: mode 2, lambda2 1e-9) on rows of x; the dictionary [d, K]: on
    float64 data with its columns scaled to unit norm after, or (as_the_reference) on float32 data as returned."""
    try:
        import spams
    except ImportError:
        raise StageError("dictionary backend spams needs SPAMS: pip install spams-bin "
                         "(or the extra mlsm-pipeline[spams])") from None
    data = np.asfortranarray(x.cpu().numpy().T.astype(np.float32 if as_the_reference else np.float64))
    dictionary = spams.trainDL(data, K=atoms, lambda1=lam, posAlpha=True, iter=iterations, batchsize=batch_size,
                               numThreads=threads or os.cpu_count() or 1, verbose=False)
    dictionary = torch.from_numpy(np.asarray(dictionary).T).float()
    return (dictionary if as_the_reference else l2_normalise(dictionary)).T.contiguous().to(x.device)


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


def fit(paths, params: dict) -> dict:
    set_cpu_threads()
    store_record = read_verified(paths.activations_manifest, [paths.activations])
    attrs, arrays = open_store(paths.activations)
    states = arrays["states"]
    device = pick_device(params.get("device", "auto"))
    heldout_rows, train = split_heldout(states.shape[0], params)
    heldout = l2_normalise(torch.from_numpy(read_rows(states, heldout_rows, paths.activations)).to(device))
    resume = Resume(paths.resume_dir, {"params": params, "activations": store_record[CHECKSUM_KEY]},
                    interval=paths.checkpoint_seconds)
    started = time.perf_counter()
    curve = []
    if params["backend"] == "torch":
        source = StoreBatches(states, train, params["batch_size"], params["seed"], device, paths.activations)
        dictionary, curve = learn(source, params["atoms"], params["lambda"], params["batch_size"], params["epochs"],
                                  params["code_iterations"], torch.Generator().manual_seed(params["seed"]), resume,
                                  heldout[:CHECK_TOKENS], params["forgetting"], params["code_tolerance"],
                                  params["checks_per_epoch"], params["convergence_tolerance"], params["atom_block"],
                                  params["atom_sweeps"])
    else:  # the comparison backends take the whole training split in memory
        x = l2_normalise(torch.from_numpy(read_rows(states, np.flatnonzero(train), paths.activations)))
        dictionary = (learn_sklearn if params["backend"] == "sklearn" else learn_spams)(x, params).to(device)
    log.info("dictionary: %s backend fitted K=%d in %.1f s", params["backend"], params["atoms"],
             time.perf_counter() - started)
    metrics, codes = evaluate(heldout, dictionary, params["lambda"])
    metrics.update({"format_version": contract.FORMAT_VERSION["dictionary"], "atoms": params["atoms"],
                    "lambda": params["lambda"], "hidden_size": int(states.shape[1]), "train_tokens": int(train.sum()),
                    "heldout_tokens": len(heldout_rows), "teacher": attrs["teacher"], "layer": attrs["layer"],
                    "backend": params["backend"], "heldout_curve": curve})
    heldout_ids = np.asarray(arrays["token_ids"].oindex[heldout_rows])  # for the atom browser
    atom_table = browse_atoms(codes.cpu(), heldout_ids, load_tokenizer(attrs["tokenizer"]), params["browse_atoms"])
    write_dictionary(paths.dictionary, dictionary.cpu().numpy())
    write_json(paths.atoms, atom_table)
    metrics["files"] = file_entries(Path(paths.metrics).parent, [paths.dictionary, paths.atoms])
    write_record(paths.metrics, metrics)
    resume.finish()
    log.info("dictionary: K=%d lambda=%g held-out objective %.4f, mean nnz %.1f, atoms used %.2f",
             params["atoms"], params["lambda"], metrics["heldout_objective"], metrics["mean_nnz"],
             metrics["atoms_used_fraction"])
    return metrics


def split_heldout(rows: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(sorted held-out rows drawn with the seed, mask of the training rows)."""
    n_heldout = min(params["heldout_tokens"], rows)
    heldout_rows = np.sort(np.random.default_rng(params["seed"]).choice(rows, n_heldout, replace=False))
    train = np.ones(rows, dtype=bool)
    train[heldout_rows] = False
    if train.sum() < params["atoms"]:
        raise StageError(f"{train.sum()} training states (after {n_heldout} held out) cannot initialise "
                         f"{params['atoms']} atoms; sample more tokens (activations.sample_tokens) or use fewer atoms")
    return heldout_rows, train


if __name__ == "__main__":
    run("dictionary", fit)
