"""OnePassMeanVarStd and the mean-var step against numpy float64 on real data, 1 to 3 DDP processes."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellarium_steps.data import ShardDataModule
from cellarium_steps.outputs.tables import read_provenance
from cellarium_steps.models import OnePassMeanVarStd
from cellarium_steps.runner import CellariumModule, build_trainer
from conftest import run_cli

REL_TOL = 1e-9


def numpy_stats(adata: ad.AnnData, batch_key: str) -> tuple[np.ndarray, np.ndarray, dict]:
    x = adata.X.toarray().astype(np.float64)
    per_batch = {}
    for batch in adata.obs[batch_key].cat.categories:
        xb = x[(adata.obs[batch_key] == batch).to_numpy()]
        per_batch[batch] = (len(xb), xb.mean(0), xb.var(0))
    return x.mean(0), x.var(0), per_batch


def assert_relative(actual: np.ndarray, expected: np.ndarray, tol: float = REL_TOL) -> None:
    scale = np.maximum(np.abs(expected), 1e-300)
    error = np.where(expected == 0, np.abs(actual), np.abs(actual - expected) / scale)
    assert error.max() < tol, f"max relative error {error.max():.3g}"


@pytest.fixture(scope="module")
def reference(pbmc_multibatch: ad.AnnData) -> tuple[np.ndarray, np.ndarray, dict]:
    return numpy_stats(pbmc_multibatch, "batch")


@pytest.mark.parametrize("algorithm", ["naive", "shifted_data"])
def test_matches_numpy_per_gene_and_per_batch(pbmc_shards: list[str], reference, algorithm: str) -> None:
    datamodule = ShardDataModule(pbmc_shards, batch_size=4000, batch_key="batch")
    collection = datamodule.collection
    model = OnePassMeanVarStd(collection.var_names_g, algorithm=algorithm, n_batch=collection.n_batch, output_path=None)
    build_trainer(accelerator="cpu", max_epochs=1).fit(CellariumModule(model), datamodule=datamodule)
    mean_g, var_g, per_batch = reference
    assert_relative(model.mean_g.numpy(), mean_g)
    assert_relative(model.var_g.numpy(), var_g)
    assert_relative(model.std_g.numpy(), np.sqrt(var_g))
    for b, name in enumerate(collection.batch_categories):
        n, batch_mean_g, batch_var_g = per_batch[name]
        assert model.n_cells_b[b] == n
        assert_relative(model.batch_mean_bg[b].numpy(), batch_mean_g)
        assert_relative(model.batch_var_bg[b].numpy(), batch_var_g)


def test_dense_and_sparse_batches_agree() -> None:
    rng = np.random.default_rng(0)
    x_ng = torch.tensor(rng.poisson(3.0, size=(50, 7)), dtype=torch.float32)
    batch_n = torch.tensor(rng.integers(0, 3, 50))
    names = np.array([f"g{i}" for i in range(7)])
    dense, sparse = (OnePassMeanVarStd(names, n_batch=3, output_path=None) for _ in range(2))
    dense(x_ng, names, batch_n)
    sparse(x_ng.to_sparse_csr(), names, batch_n)
    torch.testing.assert_close(dense.batch_var_bg, sparse.batch_var_bg, rtol=1e-12, atol=0)
    x64 = x_ng.double().numpy()
    for b in range(3):
        np.testing.assert_allclose(dense.batch_var_bg[b].numpy(), x64[batch_n.numpy() == b].var(0), rtol=1e-12)


def test_shifted_data_is_stable_for_large_offsets() -> None:
    """Data with mean 1e8 and unit spread: naive float64 sums lose the variance, shifted sums keep it."""
    rng = np.random.default_rng(1)
    x = 1e8 + rng.normal(size=(2000, 3))
    names = np.array(["a", "b", "c"])
    model = OnePassMeanVarStd(names, algorithm="shifted_data", output_path=None)
    for chunk in np.array_split(x, 10):
        model(torch.tensor(chunk), names)
    np.testing.assert_allclose(model.var_g.numpy(), x.var(0), rtol=1e-6)


def test_rejects_wrong_genes_and_out_of_range_batches() -> None:
    model = OnePassMeanVarStd(np.array(["a", "b"]), n_batch=2, output_path=None)
    with pytest.raises(ValueError, match="var_names_g"):
        model(torch.ones(2, 2), np.array(["a", "c"]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_index_n outside"):
        model(torch.ones(2, 2), np.array(["a", "b"]), torch.tensor([0, 2]))


@pytest.mark.ddp
def test_cli_same_result_on_1_2_3_processes(pbmc_shards: list[str], reference, tmp_path: Path) -> None:
    mean_g, var_g, per_batch = reference
    tables = []
    for devices in (1, 2, 3):
        output = tmp_path / f"d{devices}" / "mean_var.csv"
        run_cli("mean-var", "--input", *pbmc_shards, "--batch-key", "batch", "--output", str(output),
                "--devices", str(devices), "--accelerator", "cpu", "--batch-size", "3000", "--quiet")
        summary = pd.read_csv(output)
        assert_relative(summary["mean"].to_numpy(), mean_g)
        assert_relative(summary["var"].to_numpy(), var_g)
        per_batch_table = pd.read_parquet(output.with_suffix(".parquet"))
        n_cells = per_batch_table.groupby("batch", observed=True)["n_cells"].first()
        assert n_cells.sum() == 15493, "every cell counted exactly once across ranks"
        assert n_cells.to_dict() == {k: v[0] for k, v in per_batch.items()}
        tables.append(per_batch_table)
        provenance = read_provenance(output.with_suffix(".parquet"))
        assert provenance["config"]["devices"] == devices and "torch" in provenance["versions"]
        assert json.loads(Path(str(output) + ".provenance.json").read_text())["step"] == "mean-var"
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other)


@pytest.mark.ddp
def test_tdigest_cli_same_result_on_1_2_3_processes(pbmc_shards: list[str], pbmc_multibatch: ad.AnnData,
                                                    tmp_path: Path) -> None:
    x = pbmc_multibatch.X.tocsc()
    exact_g = np.array([np.median(x.data[x.indptr[j] : x.indptr[j + 1]]) for j in range(x.shape[1])])
    results = []
    for devices in (1, 2, 3):
        output = tmp_path / f"d{devices}" / "tdigest.csv"
        run_cli("tdigest", "--input", *pbmc_shards, "--output", str(output), "--devices", str(devices),
                "--accelerator", "cpu", "--batch-size", "3000", "--quiet")
        table = pd.read_csv(output)
        enough = table["n_nonzero"].to_numpy() >= 100
        assert np.all(np.abs(table["median"].to_numpy()[enough] - exact_g[enough]) <= 0.01 * exact_g[enough])
        assert table["n_nonzero"].sum() == x.nnz
        results.append(table)
    for other in results[1:]:
        # The exact histogram part is split-independent; t-digest merges of the tail depend on the split.
        pd.testing.assert_frame_equal(results[0][["gene", "n_nonzero", "median"]], other[["gene", "n_nonzero", "median"]])
        for q in ("q25", "q75"):
            np.testing.assert_allclose(other[q], results[0][q], rtol=0.01)
