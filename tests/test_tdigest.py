"""TDigest: per-gene non-zero median and quantiles against numpy's exact values."""

from __future__ import annotations

import os
import socket
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cellarium_steps.models.tdigest import N_SMALL_VALUES, TDigest

# The batches are sparse CSR tensors on purpose; torch's beta notice about them is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

PBMC = Path("/work/shared/data/pbmc_multibatch_15493x7152_raw.h5ad")
BATCH_SIZE = 1000


def csr_batches(x_ng: sp.csr_matrix, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
    """Cells in order, as float32 torch sparse CSR tensors, as the data loader yields them."""
    for start in range(0, x_ng.shape[0], batch_size):
        block = x_ng[start : start + batch_size]
        yield torch.sparse_csr_tensor(
            torch.from_numpy(block.indptr.astype(np.int64)),
            torch.from_numpy(block.indices.astype(np.int64)),
            torch.from_numpy(block.data.astype(np.float32)),
            size=block.shape,
        )


def fit(x_ng: sp.csr_matrix, var_names_g: np.ndarray, dense: bool = False) -> TDigest:
    model = TDigest(var_names_g)
    for batch in csr_batches(x_ng):
        model(batch.to_dense() if dense else batch, var_names_g)
    return model


def nonzero_columns(x_ng: sp.spmatrix) -> list[np.ndarray]:
    x_csc = sp.csc_matrix(x_ng)
    columns = (x_csc.data[x_csc.indptr[g] : x_csc.indptr[g + 1]] for g in range(x_csc.shape[1]))
    return [column[column != 0].astype(np.float64) for column in columns]


def exact_quantile_g(columns: list[np.ndarray], q: float) -> np.ndarray:
    return np.array([np.quantile(c, q) if len(c) else np.nan for c in columns])


def relative_error(estimate_g: np.ndarray, exact_g: np.ndarray) -> np.ndarray:
    return np.abs(estimate_g - exact_g) / np.abs(exact_g)


@pytest.fixture(scope="module")
def pbmc() -> tuple[sp.csr_matrix, np.ndarray, list[np.ndarray]]:
    if not PBMC.exists():
        pytest.skip(f"real test data not found: {PBMC} (shared data directory not mounted)")
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(PBMC)
    x_ng = sp.csr_matrix(adata.X)
    return x_ng, adata.var_names.to_numpy(), nonzero_columns(x_ng)


@pytest.fixture(scope="module")
def pbmc_model(pbmc) -> TDigest:
    x_ng, var_names_g, _ = pbmc
    return fit(x_ng, var_names_g)


@pytest.fixture(scope="module")
def large_counts() -> sp.csr_matrix:
    """Counts in the thousands (lognormal), a few small-and-large mixtures, 30% zeros."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 6000, 40
    x_ng = np.round(rng.lognormal(mean=7.0, sigma=1.0, size=(n_cells, n_genes)))
    # Genes 30..39: 40% of values are small, so the median sits in the tail at an adjusted rank.
    small = rng.random((n_cells, 10)) < 0.4
    x_ng[:, 30:][small] = rng.integers(1, N_SMALL_VALUES + 1, size=small.sum())
    x_ng[rng.random((n_cells, n_genes)) < 0.3] = 0
    return sp.csr_matrix(x_ng)


def test_pbmc_median_matches_numpy(pbmc, pbmc_model: TDigest) -> None:
    _, _, columns = pbmc
    exact_g = exact_quantile_g(columns, 0.5)
    median_g = pbmc_model.median_g.numpy()
    n_g = np.array([len(c) for c in columns])
    assert np.array_equal(pbmc_model.n_nonzero_g.numpy(), n_g.astype(np.float64))

    enough_g = n_g >= 100
    assert enough_g.sum() > 1000
    assert relative_error(median_g[enough_g], exact_g[enough_g]).max() <= 0.01
    # Every gene whose values all fit the histogram is exact, whatever its number of values.
    small_only_g = np.array([len(c) > 0 and c.max() <= N_SMALL_VALUES for c in columns])
    assert small_only_g.sum() > 1000
    np.testing.assert_array_equal(median_g[small_only_g], exact_g[small_only_g])
    # This data set's non-zero medians are all <= 64, so even genes with a tail digest are exact.
    np.testing.assert_array_equal(median_g[n_g > 0], exact_g[n_g > 0])
    assert np.isnan(median_g[n_g == 0]).all()


def test_pbmc_quartiles_exact_in_histogram(pbmc, pbmc_model: TDigest) -> None:
    _, _, columns = pbmc
    small_only_g = np.array([len(c) > 0 and c.max() <= N_SMALL_VALUES for c in columns])
    for q in (0.25, 0.75):
        exact_g = exact_quantile_g(columns, q)
        np.testing.assert_array_equal(pbmc_model.quantile_g(q).numpy()[small_only_g], exact_g[small_only_g])


def test_pbmc_upper_quantiles_from_digest(pbmc, pbmc_model: TDigest) -> None:
    """Quantiles above 64 are read from the tail digests at the rank within the tail."""
    _, _, columns = pbmc
    n_g = np.array([len(c) for c in columns])
    for q in (0.95, 0.99):
        exact_g = exact_quantile_g(columns, q)
        tail_g = (exact_g > N_SMALL_VALUES) & (n_g >= 100)
        assert tail_g.any()
        assert relative_error(pbmc_model.quantile_g(q).numpy()[tail_g], exact_g[tail_g]).max() <= 0.02


def test_pbmc_mostly_ones_gene_is_exactly_one(pbmc, pbmc_model: TDigest) -> None:
    _, var_names_g, columns = pbmc
    ones_fraction_g = np.array([(c == 1).mean() if len(c) else 0.0 for c in columns])
    max_g = np.array([c.max() if len(c) else 0.0 for c in columns])
    # Prefer a gene that also has a tail digest: its large values must not pull the median.
    candidates = np.flatnonzero((ones_fraction_g > 0.6) & (max_g > N_SMALL_VALUES))
    if not len(candidates):
        candidates = np.flatnonzero((ones_fraction_g > 0.6) & (max_g > 1))
    gene = int(candidates[0])
    assert pbmc_model.median_g[gene].item() == 1.0
    df = pbmc_model.summary_df().set_index("gene")
    assert df.loc[var_names_g[gene], "median"] == 1.0
    assert df.loc[var_names_g[gene], "n_nonzero"] == len(columns[gene])


def test_summary_df_columns(pbmc_model: TDigest) -> None:
    df = pbmc_model.summary_df()
    assert list(df.columns) == ["gene", "n_nonzero", "median", "q25", "q75", "n_cells"]
    assert len(df) == pbmc_model.n_vars
    assert (df["n_cells"] == pbmc_model.x_size.item()).all() and (df["n_nonzero"] <= df["n_cells"]).all()
    valid = df["n_nonzero"] > 0
    assert (df.loc[valid, "q25"] <= df.loc[valid, "median"]).all()
    assert (df.loc[valid, "median"] <= df.loc[valid, "q75"]).all()


def test_large_counts_use_the_digest(large_counts: sp.csr_matrix) -> None:
    var_names_g = np.array([f"g{i}" for i in range(large_counts.shape[1])])
    model = fit(large_counts, var_names_g)
    columns = nonzero_columns(large_counts)
    assert len(model.tail_digests) == large_counts.shape[1]
    for q in (0.25, 0.5, 0.75):
        exact_g = exact_quantile_g(columns, q)
        assert relative_error(model.quantile_g(q).numpy(), exact_g).max() <= 0.01
    # The mixtures keep their small values exactly in the histogram.
    assert model.small_counts_gv[30:].sum() > 0


def test_median_between_histogram_and_tail_is_exact() -> None:
    """Even n with the two middle values on either side of 64: both are known exactly."""
    x_ng = torch.tensor([[3.0], [5.0], [1000.0], [70.0]])
    model = TDigest(np.array(["g"]))
    model(x_ng, np.array(["g"]))
    assert model.median_g.item() == np.median([3, 5, 1000, 70]) == 37.5


def test_non_integer_values_are_sketched_together() -> None:
    """Non-integer values below 64 interleave with the histogram's; the answer stays close."""
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.integers(1, 40, 3000), rng.uniform(0.5, 60.0, 3000)]).astype(np.float32)
    model = TDigest(np.array(["g"]))
    model(torch.from_numpy(values)[:, None], np.array(["g"]))
    for q in (0.25, 0.5, 0.75):
        assert abs(model.quantile_g(q).item() - np.quantile(values, q)) <= 0.01 * np.quantile(values, q)


def test_merge_from_matches_single_instance(pbmc, pbmc_model: TDigest, large_counts: sp.csr_matrix) -> None:
    x_ng, var_names_g, _ = pbmc
    bounds = [0, 4000, 9500, x_ng.shape[0]]
    parts = [fit(x_ng[a:b], var_names_g) for a, b in zip(bounds, bounds[1:])]
    parts[0].merge_from(parts[1:])
    assert torch.equal(parts[0].small_counts_gv, pbmc_model.small_counts_gv)
    assert torch.equal(parts[0].n_nonzero_g, pbmc_model.n_nonzero_g)
    # Histogram-based medians are identical, not merely close.
    assert torch.equal(parts[0].median_g, pbmc_model.median_g)

    names_g = np.array([f"g{i}" for i in range(large_counts.shape[1])])
    single = fit(large_counts, names_g)
    pieces = [fit(large_counts[a:b], names_g) for a, b in ((0, 1500), (1500, 4000), (4000, 6000))]
    pieces[0].merge_from(pieces[1:])
    assert torch.equal(pieces[0].n_nonzero_g, single.n_nonzero_g)
    assert relative_error(pieces[0].median_g.numpy(), single.median_g.numpy()).max() <= 0.01
    exact_g = exact_quantile_g(nonzero_columns(large_counts), 0.5)
    assert relative_error(pieces[0].median_g.numpy(), exact_g).max() <= 0.01


def test_dense_input_matches_sparse(pbmc, large_counts: sp.csr_matrix) -> None:
    x_ng, var_names_g, _ = pbmc
    subset = x_ng[:3000]
    sparse_model, dense_model = fit(subset, var_names_g), fit(subset, var_names_g, dense=True)
    assert torch.equal(sparse_model.small_counts_gv, dense_model.small_counts_gv)
    # assert_array_equal, not torch.equal: genes without non-zero values are NaN in both.
    np.testing.assert_array_equal(sparse_model.median_g.numpy(), dense_model.median_g.numpy())

    names_g = np.array([f"g{i}" for i in range(large_counts.shape[1])])
    sparse_model, dense_model = fit(large_counts, names_g), fit(large_counts, names_g, dense=True)
    for q in (0.25, 0.5, 0.75):
        np.testing.assert_array_equal(sparse_model.quantile_g(q).numpy(), dense_model.quantile_g(q).numpy())


def test_explicit_zeros_are_ignored() -> None:
    x_ng = torch.sparse_csr_tensor(
        torch.tensor([0, 2, 4]), torch.tensor([0, 1, 0, 1]), torch.tensor([0.0, 2.0, 0.0, 4.0]), size=(2, 2)
    )
    model = TDigest(np.array(["a", "b"]))
    model(x_ng, np.array(["a", "b"]))
    assert model.n_nonzero_g.tolist() == [0.0, 2.0]
    assert np.isnan(model.median_g[0].item())
    assert model.median_g[1].item() == 3.0


def test_var_names_mismatch_raises() -> None:
    model = TDigest(np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="var_names_g"):
        model(torch.ones(2, 3), np.array(["a", "c", "b"]))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_values_raise(bad: float) -> None:
    model = TDigest(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="non-negative finite"):
        model(torch.tensor([[1.0, bad]]), np.array(["a", "b"]))


def test_reset_and_checkpoint_round_trip(large_counts: sp.csr_matrix) -> None:
    names_g = np.array([f"g{i}" for i in range(large_counts.shape[1])])
    model = fit(large_counts, names_g)
    restored = TDigest(names_g)
    restored.load_state_dict(model.state_dict())
    for q in (0.25, 0.5, 0.99):
        assert torch.equal(restored.quantile_g(q), model.quantile_g(q))

    model.on_train_start(types.SimpleNamespace(world_size=1))
    assert model.small_counts_gv.sum() == 0 and not model.tail_digests
    assert torch.isnan(model.median_g).all()
    with pytest.raises(ValueError, match="q must be"):
        model.quantile_g(1.5)


def _ddp_worker(rank: int, world_size: int, port: int, x_ng: sp.csr_matrix, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        names_g = np.array([f"g{i}" for i in range(x_ng.shape[1])])
        model = fit(x_ng[rank::world_size], names_g)
        trainer = types.SimpleNamespace(world_size=world_size)
        model.on_train_epoch_end(trainer)
        model.on_train_epoch_end(trainer)  # a second call must not reduce again
        queue.put((rank, model.small_counts_gv.sum().item(), model.quantile_g(0.5).numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_reduction_gives_every_rank_the_same_result(large_counts: sp.csr_matrix) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world_size = 2
    mp.start_processes(
        _ddp_worker, args=(world_size, port, large_counts, queue), nprocs=world_size, start_method="spawn"
    )
    results = sorted(queue.get(timeout=60) for _ in range(world_size))
    names_g = np.array([f"g{i}" for i in range(large_counts.shape[1])])
    single = fit(large_counts, names_g)
    exact_g = exact_quantile_g(nonzero_columns(large_counts), 0.5)
    for _, small_total, median_g in results:
        assert small_total == single.small_counts_gv.sum().item()
        assert relative_error(median_g, exact_g).max() <= 0.01
    np.testing.assert_array_equal(results[0][2], results[1][2])
