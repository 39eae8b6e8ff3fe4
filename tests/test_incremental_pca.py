"""IncrementalPCA against the exact PCA: real cells at the model's defaults, for 1, 2, 3 and 5
ranks on unequal shards, and the mechanics of the update, the merge and the state.

The real-data tests feed normalise-total + log1p cells on 1,000-2,000 genes in batches, as the pca
step does, and hold the result to ``pca_reference``'s acceptance: every component's explained
variance within 1e-3 of the largest eigenvalue, residual variance within 1.01x the optimum, top-10
subspace within 1e-2 rad of float64 ``numpy.linalg.eigh``'s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellarium_steps.models import ExactPCA, IncrementalPCA, incremental_pca
from conftest import MOUSE_BRAIN, require
from pca_reference import Reference, assert_accurate, fit_model, log_normalised, merge_on_threads, synthetic

pytestmark = [pytest.mark.filterwarnings("ignore:Sparse:UserWarning")]

N_HVG = 2000
MAX_COMPONENTS = 50
# Cells drawn at random from each file, kept in file order (the runtime of the 15 fits below grows
# with them; every source of the PBMC file is still there, ~500 cells on average).
PBMC_CELLS = 8000
MOUSE_CELLS = 5000
# Shard sizes in proportion to these, rank r taking shard r: the largest is 3x the smallest.
SHARD_WEIGHTS = np.array([1.0, 0.7, 1.3, 0.5, 1.5])


@dataclass
class Cells:
    """Log-normalised cells in file order, their exact PCA, and a random order to feed them in."""

    name: str
    x_ng: np.ndarray
    reference: Reference

    @property
    def var_names_g(self) -> np.ndarray:
        return np.array([f"gene{i}" for i in range(self.x_ng.shape[1])])

    def random_order(self) -> np.ndarray:
        return np.random.default_rng(0).permutation(len(self.x_ng))


def cells_of(name: str, counts: sp.csr_matrix, columns: np.ndarray, n_cells: int) -> Cells:
    """``n_cells`` random cells in file order, log-normalised on ``columns``, and their exact PCA."""
    rows_n = np.sort(np.random.default_rng(1).choice(counts.shape[0], n_cells, replace=False))
    x_ng = log_normalised(counts[rows_n], columns)
    return Cells(name, x_ng, Reference(x_ng, MAX_COMPONENTS))


@pytest.fixture(scope="module")
def pbmc_cells(pbmc_multibatch: ad.AnnData) -> Cells:
    """The merged PBMC file (nine sources, 23 batches) on its 2,000 seurat_v3 HVGs."""
    scanpy = pytest.importorskip("scanpy")
    hvg = scanpy.pp.highly_variable_genes(pbmc_multibatch, n_top_genes=N_HVG, flavor="seurat_v3", inplace=False)
    columns = np.flatnonzero(hvg["highly_variable"].to_numpy())
    return cells_of("pbmc", sp.csr_matrix(pbmc_multibatch.X), columns, PBMC_CELLS)


@pytest.fixture(scope="module")
def mouse_cells() -> Cells:
    """The mouse brain file on all of its 1,000 genes (285 never detected)."""
    adata = ad.read_h5ad(require(MOUSE_BRAIN))
    return cells_of("mouse", sp.csr_matrix(adata.X), np.arange(adata.n_vars), MOUSE_CELLS)


@pytest.fixture(scope="module")
def pbmc_many_genes_cells(pbmc_multibatch: ad.AnnData) -> Cells:
    """The merged PBMC file on 5,000 seurat_v3 HVGs: r + chunk_size < genes, so every chunk of
    1,050 cells is truncated, as with the many genes incremental is for."""
    scanpy = pytest.importorskip("scanpy")
    hvg = scanpy.pp.highly_variable_genes(pbmc_multibatch, n_top_genes=5000, flavor="seurat_v3", inplace=False)
    columns = np.flatnonzero(hvg["highly_variable"].to_numpy())
    return cells_of("pbmc-5000", sp.csr_matrix(pbmc_multibatch.X), columns, PBMC_CELLS)


@pytest.fixture
def cells(request: pytest.FixtureRequest) -> Cells:
    return request.getfixturevalue(f"{request.param}_cells")


def fit(cells: Cells, rows_n: np.ndarray, n_components: int, batch_size: int) -> IncrementalPCA:
    """The model at its defaults, fed cells ``rows_n`` in that order as float32 batches."""
    model = IncrementalPCA(cells.var_names_g, n_components)
    x_ng = cells.x_ng[rows_n].astype(np.float32)
    for start in range(0, len(x_ng), batch_size):
        model(torch.from_numpy(x_ng[start : start + batch_size]), cells.var_names_g)
    return model


def fit_ranks(cells: Cells, rows_by_rank: list[np.ndarray], n_components: int, batch_size: int,
              monkeypatch: pytest.MonkeyPatch) -> list[IncrementalPCA]:
    """One model per rank on its cells, then the real end-of-epoch merge on threads."""
    models = [fit(cells, rows_n, n_components, batch_size) for rows_n in rows_by_rank]
    merge_on_threads(models, monkeypatch)
    for model in models[1:]:  # every rank ends with rank 0's result, bit for bit
        assert torch.equal(model.V_rg, models[0].V_rg) and torch.equal(model.S_r, models[0].S_r)
    return models


def unequal_slices(rows_n: np.ndarray, world_size: int) -> list[np.ndarray]:
    weights = SHARD_WEIGHTS[:world_size]
    bounds = np.r_[0, np.cumsum(weights / weights.sum() * len(rows_n))].round().astype(int)
    return [rows_n[a:b] for a, b in itertools.pairwise(bounds)]


def report(label: str, accuracy: dict[str, float]) -> None:
    print(f"{label}: variance {accuracy['variance']:.2e}, reconstruction {accuracy['reconstruction']:.5f}, "
          f"angle {accuracy['angle']:.2e}")


@pytest.mark.parametrize("batch_size", [128, 1024])
@pytest.mark.parametrize("n_components", [30, 50])
@pytest.mark.parametrize("cells", ["pbmc", "mouse"], indirect=True)
def test_one_process_matches_exact(cells: Cells, n_components: int, batch_size: int) -> None:
    model = fit(cells, cells.random_order(), n_components, batch_size)
    accuracy = cells.reference.accuracy(model)
    report(f"{cells.name} k={n_components} batch={batch_size}", accuracy)
    assert_accurate(accuracy)
    # Mean and total variance are exact sums, whatever the truncations.
    np.testing.assert_allclose(model.mean_g.numpy(), cells.reference.mean_g, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(model.total_variance), cells.reference.trace, rtol=1e-6)


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize(("cells", "n_components", "batch_size"), [("pbmc", 30, 1024), ("mouse", 50, 1024)],
                         indirect=["cells"])
def test_any_world_size_matches_exact(cells: Cells, n_components: int, batch_size: int, world_size: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of a shuffled collection, unequal in size: what a rank sees is like the whole."""
    rows_by_rank = unequal_slices(cells.random_order(), world_size)
    models = fit_ranks(cells, rows_by_rank, n_components, batch_size, monkeypatch)
    accuracy = cells.reference.accuracy(models[0])
    report(f"{cells.name} k={n_components} batch={batch_size} {world_size} ranks", accuracy)
    assert_accurate(accuracy)
    assert float(models[0].x_size) == len(cells.x_ng)


@pytest.mark.slow
def test_many_genes_match_exact(pbmc_many_genes_cells: Cells) -> None:
    cells = pbmc_many_genes_cells
    model = fit(cells, cells.random_order(), 50, 1024)
    assert model.svd_rank + model.chunk_size < cells.x_ng.shape[1]  # the truncating regime
    accuracy = cells.reference.accuracy(model)
    report(f"{cells.name} k=50 batch=1024", accuracy)
    assert_accurate(accuracy)


def test_the_result_does_not_depend_on_the_batch_size() -> None:
    """Cells wait for a whole chunk, so any batching gives the same updates, bit for bit."""
    x_ng = np.random.default_rng(3).normal(size=(1000, 300)) @ np.diag(np.linspace(3, 0.1, 300))
    names = names_of(x_ng)
    results = []
    for batch_size in (7, 128, 1000):
        model = IncrementalPCA(names, 5, oversample=20)
        assert model.chunk_size == 256
        fit_model(model, x_ng, batch_size=batch_size)
        results.append(model)
    for model in results[1:]:
        assert torch.equal(model.V_rg, results[0].V_rg) and torch.equal(model.S_r, results[0].S_r)
        assert torch.equal(model.x_mean_g, results[0].x_mean_g)


def test_ranks_on_sorted_shards(pbmc_cells: Cells, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hard case: the file's cells in order (its sources one after another) cut into 5 unequal
    shards, one rank each, each rank reading its own shard in a shuffled order. (The pca step's
    shuffled epoch interleaves shards, so its ranks see mixed sources; this is the worst a rank's
    share can be.) A rank tracks only its own sources' leading directions, so its noise along the
    others' is dropped; the directions kept beyond k are what keeps that loss within the acceptance."""
    sizes = np.diff(np.r_[0, np.cumsum(SHARD_WEIGHTS / SHARD_WEIGHTS.sum() * len(pbmc_cells.x_ng))].astype(int))
    offsets = np.r_[0, np.cumsum(sizes)]
    rng = np.random.default_rng(0)
    rows_by_rank = [offsets[rank] + rng.permutation(size) for rank, size in enumerate(sizes)]
    models = fit_ranks(pbmc_cells, rows_by_rank, 30, 1024, monkeypatch)
    accuracy = pbmc_cells.reference.accuracy(models[0])
    report("pbmc k=30 batch=1024 5 ranks, sorted shards", accuracy)
    assert_accurate(accuracy)


# --- mechanics, on synthetic data --------------------------------------------------------


def names_of(x_ng: np.ndarray) -> np.ndarray:
    return np.array([f"g{i}" for i in range(x_ng.shape[1])])


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("oversample", [incremental_pca.DEFAULT_OVERSAMPLE, 4])
def test_hierarchical_merge_any_world_size(world_size: int, oversample: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real merge code on threads. With the default oversample the 120 genes are all kept, so
    nothing is truncated and the result must be the exact PCA to rounding, whatever the split:
    that checks the bookkeeping (means, mean-correction rows, Chan's formula, the tree) exactly.
    With 4 extra directions every update and merge truncates."""
    x_ng = synthetic()
    names = names_of(x_ng)
    # Contiguous, unequal slices, as the epoch plan gives; with 7 ranks the last one gets no cells.
    bounds = np.r_[0, np.cumsum([900, 700, 600, 300, 400, 100])[: world_size - 1], len(x_ng)]
    bounds = np.minimum(bounds, len(x_ng))
    models = [IncrementalPCA(names, 8, oversample=oversample) for _ in range(world_size)]
    for rank, model in enumerate(models):
        fit_model(model, x_ng[bounds[rank] : bounds[rank + 1]], batch_size=250)
    fake = merge_on_threads(models, monkeypatch, calls=2)  # a second call must not merge again

    # A binary tree: ceil(log2 W) levels, each rank sends once (rank 0 never).
    assert sorted(src for src, _ in fake.sends) == list(range(1, world_size))
    assert all(src - dst == src & -src for src, dst in fake.sends)

    x32_ng = x_ng.astype(np.float32).astype(np.float64)
    reference = Reference(x32_ng, 8)
    result = models[0]
    assert float(result.x_size) == len(x_ng)
    variance_k = result.explained_variance_k.numpy()
    if oversample == incremental_pca.DEFAULT_OVERSAMPLE:
        assert result.svd_rank == 120
        np.testing.assert_allclose(variance_k, reference.eigenvalues_g[:8], rtol=1e-10)
        expected_kg = incremental_pca.orient_components(torch.from_numpy(reference.components_kg.copy())).numpy()
        np.testing.assert_allclose(result.components_kg.numpy(), expected_kg, atol=1e-9)
    else:
        # Each merge truncates both sides to r = 12, dropping a little noise along the last components.
        np.testing.assert_allclose(variance_k[:5], reference.eigenvalues_g[:5], rtol=1e-3)
        np.testing.assert_allclose(variance_k, reference.eigenvalues_g[:8], rtol=1e-2)
        assert reference.accuracy(result)["angle"] < 1e-2
    np.testing.assert_allclose(result.mean_g.numpy(), reference.mean_g, rtol=1e-9)
    np.testing.assert_allclose(float(result.total_variance), reference.trace, rtol=1e-9)
    for model in models[1:]:  # every rank ends with rank 0's result, bit for bit
        for name in ("V_rg", "S_r", "x_mean_g", "x_size", "x_m2"):
            assert torch.equal(getattr(model, name), getattr(result, name))


def test_exact_when_every_direction_is_kept() -> None:
    """r >= genes: the incremental model is the exact PCA, for any batch size, sparse or dense."""
    x_ng = synthetic(n=600, g=60)
    names = names_of(x_ng)
    exact = fit_model(ExactPCA(names, 6), x_ng)
    for batch_size, sparse in ((1, False), (7, True), (600, False)):
        model = fit_model(IncrementalPCA(names, 6), x_ng, batch_size=batch_size, sparse=sparse)
        np.testing.assert_allclose(model.explained_variance_k.numpy(), exact.explained_variance_k.numpy(), rtol=1e-10)
        np.testing.assert_allclose(model.components_kg.numpy(), exact.components_kg.numpy(), atol=1e-9)


def test_batches_are_merged_in_chunks() -> None:
    """A batch larger than the chunk goes through several updates of ``chunk_size`` cells (the
    stacked matrix stays small enough for the exact SVD); the rest waits until the result is read.
    Sparse and dense batches agree."""
    x_ng = np.abs(synthetic(n=1100, g=400))
    x_ng[x_ng < 3] = 0
    names = names_of(x_ng)
    sizes: list[int] = []
    model = IncrementalPCA(names, 5, oversample=20)
    update = model._update

    def spy(joined_mg: torch.Tensor, *args: object) -> None:
        sizes.append(joined_mg.shape[0] - model.svd_rank - 1)
        update(joined_mg, *args)

    model._update = spy  # type: ignore[method-assign]
    fit_model(model, x_ng, batch_size=1100, sparse=True)
    assert model.chunk_size == 256 and sizes == [256] * 4
    variance_k = model.explained_variance_k  # reading merges the 76 waiting cells
    assert sizes == [256] * 4 + [76] and float(model.x_size) == 1100
    dense = fit_model(IncrementalPCA(names, 5, oversample=20), x_ng, batch_size=1100)
    np.testing.assert_allclose(variance_k.numpy(), dense.explained_variance_k.numpy(), rtol=1e-10)
    state = IncrementalPCA(names, 5, oversample=20)
    fit_model(state, x_ng, batch_size=300)
    assert float(state.state_dict()["x_size"]) == 1100  # saving merges them too


def test_randomized_path_honours_niter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond EXACT_SVD_MAX rows and genes the update is torch.svd_lowrank with the model's niter,
    seeded per update (a run repeats exactly, whatever the global RNG state)."""
    monkeypatch.setattr(incremental_pca, "EXACT_SVD_MAX", 10)
    calls: list[int] = []
    lowrank = torch.svd_lowrank

    def spy(a: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, ...]:
        calls.append(niter)
        return lowrank(a, q=q, niter=niter)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    x_ng = synthetic(n=1000, g=60)
    names = names_of(x_ng)
    first = fit_model(IncrementalPCA(names, 4, svd_lowrank_niter=5, oversample=10), x_ng, batch_size=100)
    assert calls and set(calls) == {5}
    torch.manual_seed(123)
    second = fit_model(IncrementalPCA(names, 4, svd_lowrank_niter=5, oversample=10), x_ng, batch_size=100)
    assert torch.equal(first.V_rg, second.V_rg)
    reference = Reference(x_ng.astype(np.float32).astype(np.float64), 4)
    np.testing.assert_allclose(first.explained_variance_k.numpy(), reference.eigenvalues_g[:4], rtol=1e-3)


def test_loads_a_state_with_only_the_reported_rows() -> None:
    """States saved before the model kept extra directions hold ``V_kg`` and ``S_k`` only."""
    x_ng = synthetic(n=600, g=30)
    names = names_of(x_ng)
    model = fit_model(IncrementalPCA(names, 3), x_ng)
    state = {key: value for key, value in model.state_dict().items() if key not in ("V_rg", "S_r")}
    state["V_kg"], state["S_k"] = model.components_kg.clone(), model.S_k.clone()
    restored = IncrementalPCA(names, 3)
    restored.load_state_dict(state)
    assert torch.equal(restored.components_kg, model.components_kg)
    assert torch.equal(restored.explained_variance_k, model.explained_variance_k)
    assert torch.count_nonzero(restored.V_rg[3:]) == 0
