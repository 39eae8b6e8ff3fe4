"""Demo-data generators: schema the shard readers rely on, determinism, and count statistics."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellarium_steps.data.simulate import resample_shards, simulate_shards, thin_counts

SHARED_PBMC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pbmc_multibatch_15493x7152_raw.h5ad"
CELL_TYPE_KEY = "cell_type_ontology_term_id"


def _read_all(paths: list[str]) -> list[ad.AnnData]:
    return [ad.read_h5ad(p) for p in paths]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[ad.AnnData]]:
    out = tmp_path_factory.mktemp("sim")
    paths = simulate_shards(str(out), n_cells=3000, n_genes=300, n_batches=4, n_cell_types=6, n_shards=3, seed=7)
    return paths, _read_all(paths)


def test_shapes_and_files(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    paths, shards = simulated
    assert [os.path.basename(p) for p in paths] == ["shard_000.h5ad", "shard_001.h5ad", "shard_002.h5ad"]
    assert sorted(os.listdir(os.path.dirname(paths[0]))) == sorted(os.path.basename(p) for p in paths)
    assert sum(a.n_obs for a in shards) == 3000
    assert all(a.n_vars == 300 for a in shards)


def test_counts_are_nonnegative_int32_csr(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    for a in shards:
        assert isinstance(a.X, sp.csr_matrix)
        assert a.X.dtype == np.int32
        assert a.X.data.min() > 0
        assert 0.01 < a.X.nnz / np.prod(a.X.shape) < 0.9


def test_obs_names_unique_across_shards(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    names = np.concatenate([a.obs_names.to_numpy() for a in shards])
    assert len(set(names)) == names.size
    assert shards[1].obs_names[0].endswith("-s1")


def test_var_and_categories_identical_across_shards(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    first = shards[0]
    assert first.var_names.is_unique
    assert first.var["gene_ids"].str.fullmatch(r"ENSG\d{11}").all()
    assert {"MT-CO1", "CD3D", "LYZ"} <= set(first.var_names)
    assert list(first.obs["batch"].cat.categories) == ["batch1", "batch2", "batch3", "batch4"]
    expected_ids = ["CL:0000624", "CL:0000625", "CL:0000236", "CL:0000623", "CL:0001054", "CL:0000784", "unknown"]
    assert list(first.obs[CELL_TYPE_KEY].cat.categories) == expected_ids
    for a in shards[1:]:
        pd.testing.assert_frame_equal(a.var, first.var)
        for key in ("batch", CELL_TYPE_KEY, "cell_type"):
            assert list(a.obs[key].cat.categories) == list(first.obs[key].cat.categories)
    for a in shards:
        assert a.obs["batch"].nunique() >= 3


def test_unknown_fraction_and_labels_match(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    obs = pd.concat([a.obs for a in shards])
    is_unknown = obs[CELL_TYPE_KEY].astype(str) == "unknown"
    assert 0.06 < is_unknown.mean() < 0.14
    assert (obs["cell_type"].astype(str) == "unknown").equals(is_unknown)
    b_cells = obs[CELL_TYPE_KEY].astype(str) == "CL:0000236"
    assert (obs.loc[b_cells, "cell_type"].astype(str) == "B cell").all()


def test_batches_differ_in_depth(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    library_n = np.concatenate([np.asarray(a.X.sum(axis=1)).ravel() for a in shards])
    batch_n = np.concatenate([a.obs["batch"].astype(str).to_numpy() for a in shards])
    median_b = pd.Series(library_n).groupby(batch_n).median()
    assert median_b.max() / median_b.min() > 2.5
    assert 800 < median_b.min() and median_b.max() < 10000


def test_markers_follow_cell_type(simulated: tuple[list[str], list[ad.AnnData]]) -> None:
    _, shards = simulated
    a = ad.concat(shards)
    cd3d_n = np.asarray(a[:, "CD3D"].X.todense()).ravel()
    ids_n = a.obs[CELL_TYPE_KEY].astype(str).to_numpy()
    assert cd3d_n[ids_n == "CL:0000624"].mean() > 5 * cd3d_n[ids_n == "CL:0000236"].mean()


def test_deterministic_in_seed(tmp_path: Path) -> None:
    kwargs = dict(n_cells=400, n_genes=120, n_batches=3, n_cell_types=4, n_shards=2)
    a_paths = simulate_shards(str(tmp_path / "a"), seed=3, **kwargs)
    b_paths = simulate_shards(str(tmp_path / "b"), seed=3, **kwargs)
    c_paths = simulate_shards(str(tmp_path / "c"), seed=4, **kwargs)
    for pa, pb, pc in zip(a_paths, b_paths, c_paths):
        a, b, c = ad.read_h5ad(pa), ad.read_h5ad(pb), ad.read_h5ad(pc)
        assert (a.X != b.X).nnz == 0
        pd.testing.assert_frame_equal(a.obs, b.obs)
        assert a.X.shape == c.X.shape
        assert (a.X != c.X).nnz > 0
        assert not a.obs["batch"].equals(c.obs["batch"])


def test_more_cell_types_than_known_cycles_ids(tmp_path: Path) -> None:
    paths = simulate_shards(str(tmp_path), n_cells=300, n_genes=100, n_cell_types=16, n_shards=1, seed=0)
    a = ad.read_h5ad(paths[0])
    categories = list(a.obs[CELL_TYPE_KEY].cat.categories)
    assert len(categories) == len(set(categories)) == 15
    assert a.var_names.is_unique


def test_thin_counts_never_increases_and_has_expected_mean() -> None:
    rng = np.random.default_rng(0)
    x_ng = sp.random(500, 200, density=0.3, format="csr", random_state=1, dtype=np.float64)
    x_ng.data = np.ceil(x_ng.data * 50).astype(np.int32)
    x_ng = x_ng.astype(np.int32)
    y_ng = thin_counts(x_ng, 0.3, rng)
    assert y_ng.dtype == np.int32
    assert y_ng.data.min() > 0
    assert ((y_ng - x_ng).toarray() <= 0).all()
    assert abs(y_ng.sum() / (0.3 * x_ng.sum()) - 1.0) < 0.03
    assert thin_counts(x_ng, 1.0, rng).toarray().tolist() == x_ng.toarray().tolist()
    assert thin_counts(x_ng, 0.0, rng).nnz == 0


def test_thin_counts_per_row_fraction() -> None:
    rng = np.random.default_rng(0)
    x_ng = sp.csr_matrix(np.full((2, 1000), 20, dtype=np.int32))
    y_ng = thin_counts(x_ng, np.array([0.25, 0.75]), rng)
    ratio_n = np.asarray(y_ng.sum(axis=1)).ravel() / 20000
    np.testing.assert_allclose(ratio_n, [0.25, 0.75], rtol=0.03)


def test_resample_shards_on_real_pbmc(tmp_path: Path) -> None:
    if not SHARED_PBMC.exists():
        pytest.skip(f"shared data not found: {SHARED_PBMC}")
    source = ad.read_h5ad(SHARED_PBMC)
    columns = ["batch", "source", CELL_TYPE_KEY]
    paths = resample_shards(str(SHARED_PBMC), str(tmp_path), n_cells=2000, n_shards=2, seed=1, obs_columns=columns)
    shards = _read_all(paths)
    assert [a.n_obs for a in shards] == [1000, 1000]
    names = np.concatenate([a.obs_names.to_numpy() for a in shards])
    assert len(set(names)) == 2000
    assert names[0] == "pbmc_multibatch_15493x7152_raw-r0"
    source_library = np.asarray(source.X.sum(axis=1)).ravel()
    for a in shards:
        assert a.var_names.equals(source.var_names)
        pd.testing.assert_frame_equal(a.var, source.var)
        assert list(a.obs.columns) == columns
        for key in columns:
            assert isinstance(a.obs[key].dtype, pd.CategoricalDtype)
            assert list(a.obs[key].cat.categories) == list(source.obs[key].cat.categories)
        assert a.X.dtype == np.int32 and a.X.data.min() > 0
        library = np.asarray(a.X.sum(axis=1)).ravel()
        assert 0.5 * np.median(source_library) < np.median(library) < np.median(source_library)
