"""HVGSeuratV3 and `cellarium-steps hvg`: parity with scanpy's seurat_v3 on real files, one-pass reuse, DDP."""

from __future__ import annotations

import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from cellarium_steps.data import ShardDataModule, csr_to_torch
from cellarium_steps.models import HVGSeuratV3
from cellarium_steps.models.hvg_seurat_v3 import FLAVORS, HVGWarning, NoBatchLeftError
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.steps.cli import main
from conftest import PBMC4K, require, run_cli, split_into_shards

# The batches are sparse CSR tensors on purpose; torch's beta notice about them is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

N_TOP = 2000
BATCH_SIZE = 1000
# Batches of the merged file whose LOESS scanpy cannot fit (README of the shared data; all three need the jitter).
UNFITTABLE_BATCHES = {"sorted:Monocyte", "sorted:naivecytotoxic", "sorted:naivet"}


# ----------------------------------------------------------------------------- helpers


def run_model(paths: list[str], batch_key: str | None, flavor: str = "seurat_v3", **kwargs) -> HVGSeuratV3:
    """Both passes through the real data layer and runner, as a step runs them."""
    datamodule = ShardDataModule(paths, batch_size=BATCH_SIZE, batch_key=batch_key)
    collection = datamodule.collection
    model = HVGSeuratV3(
        collection.var_names_g,
        n_top_genes=kwargs.pop("n_top_genes", N_TOP),
        n_batch=collection.n_batch,
        flavor=flavor,
        use_batch_key=batch_key is not None,
        output_path=kwargs.pop("output_path", None),
        batch_names=list(collection.batch_categories) if batch_key else None,
        **kwargs,
    )
    trainer = build_trainer(devices=1, accelerator="cpu", max_epochs=2)
    trainer.fit(CellariumModule(model), datamodule=datamodule)
    return model


def scanpy_hvg(adata: ad.AnnData, flavor: str, batch_key: str | None, n_top_genes: int = N_TOP) -> pd.DataFrame:
    return sc.pp.highly_variable_genes(
        adata, flavor=flavor, n_top_genes=n_top_genes, batch_key=batch_key, inplace=False
    ).drop(columns="gene_name")


def assert_scanpy_parity(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    """Same columns, same selected genes (Jaccard 1), same ranks and nbatches, variances_norm to 1e-6."""
    assert list(ours.index) == list(ref.index)
    assert set(ours.columns) == set(ref.columns)
    selected, expected = set(ours.index[ours.highly_variable]), set(ref.index[ref.highly_variable])
    assert len(selected & expected) / len(selected | expected) == 1.0
    np.testing.assert_allclose(ours.variances_norm, ref.variances_norm, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(ours.highly_variable_rank.to_numpy(), ref.highly_variable_rank.to_numpy())
    if "highly_variable_nbatches" in ref:
        np.testing.assert_array_equal(ours.highly_variable_nbatches, ref.highly_variable_nbatches)
    np.testing.assert_allclose(ours.means, ref.means, rtol=1e-12)
    np.testing.assert_allclose(ours.variances, ref.variances, rtol=1e-12)


def run_main(*args: str) -> None:
    """The CLI in this process (the console script's own entry point), which spares a Python start-up."""
    code = main(list(args))
    assert code == 0, f"cellarium-steps {' '.join(args)} exited with {code}"


def read_table(csv_path: Path) -> pd.DataFrame:
    """The step's exact table (Parquet beside the CSV), indexed by gene."""
    return pd.read_parquet(csv_path.with_suffix(".parquet")).set_index("gene")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pbmc4k() -> ad.AnnData:
    return ad.read_h5ad(require(PBMC4K))


@pytest.fixture(scope="module")
def pbmc4k_shards(pbmc4k: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return split_into_shards(pbmc4k, tmp_path_factory.mktemp("pbmc4k_shards"), 3)


@pytest.fixture(scope="module")
def source_models(pbmc_shards: list[str]) -> dict[str, HVGSeuratV3]:
    return {flavor: run_model(pbmc_shards, "source", flavor) for flavor in FLAVORS}


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hvg_cli")


@pytest.fixture(scope="module")
def cli_two_pass(pbmc_shards: list[str], cli_dir: Path) -> Path:
    """`cellarium-steps hvg --batch-key source` in one process: the reference of the one-pass and DDP runs."""
    output = cli_dir / "two_pass" / "hvg.csv"
    run_main("hvg", "--input", *pbmc_shards, "--batch-key", "source", "--output", str(output), "--accelerator", "cpu")
    return output


@pytest.fixture(scope="module")
def mean_var_csv(pbmc_shards: list[str], cli_dir: Path) -> Path:
    output = cli_dir / "mean_var" / "mean_var.csv"
    run_main("mean-var", "--input", *pbmc_shards, "--batch-key", "source", "--output", str(output),
             "--accelerator", "cpu")
    return output


# ----------------------------------------------------------------------------- parity with scanpy


@pytest.mark.parametrize("flavor", FLAVORS)
def test_matches_scanpy_without_batch_key(flavor: str, pbmc4k: ad.AnnData, pbmc4k_shards: list[str]) -> None:
    model = run_model(pbmc4k_shards, None, flavor)
    assert list(model.hvg_df.columns) == [
        "means", "variances", "variances_norm", "highly_variable_rank", "highly_variable"
    ]
    assert_scanpy_parity(model.hvg_df, scanpy_hvg(pbmc4k, flavor, None))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_matches_scanpy_with_batch_key(
    flavor: str, pbmc_multibatch: ad.AnnData, source_models: dict[str, HVGSeuratV3]
) -> None:
    df = source_models[flavor].hvg_df
    assert list(df.columns) == [
        "means", "variances", "variances_norm", "highly_variable_rank", "highly_variable_nbatches", "highly_variable"
    ]
    assert_scanpy_parity(df, scanpy_hvg(pbmc_multibatch, flavor, "source"))


def test_use_batch_key_false_ignores_batch_index(pbmc4k: ad.AnnData, pbmc4k_shards: list[str]) -> None:
    """The shards' batch column is read, but with use_batch_key=False all cells are one batch."""
    datamodule = ShardDataModule(pbmc4k_shards, batch_size=BATCH_SIZE, batch_key="batch")
    model = HVGSeuratV3(datamodule.collection.var_names_g, N_TOP, n_batch=datamodule.collection.n_batch,
                        use_batch_key=False, output_path=None)
    build_trainer(devices=1, accelerator="cpu", max_epochs=2).fit(CellariumModule(model), datamodule=datamodule)
    assert model.n_batch == 1
    assert_scanpy_parity(model.hvg_df, scanpy_hvg(pbmc4k, "seurat_v3", None))


def test_n_batch_minimum_keeps_genes_found_in_enough_batches(source_models: dict[str, HVGSeuratV3]) -> None:
    """Only the batch combination changes, so no refit is needed: recombine the fitted model's ranks."""
    for flavor, model in source_models.items():
        default = model.hvg_df
        try:
            model.n_batch_minimum = 2
            at_least_2 = model.compute_hvg_dfs()[0]
            model.n_batch_minimum = 3
            with pytest.warns(HVGWarning, match="n_batch_minimum=3"):
                at_least_3 = model.compute_hvg_dfs()[0]
        finally:
            model.n_batch_minimum = 1
        chosen = at_least_2[at_least_2.highly_variable]
        assert len(chosen) == N_TOP and (chosen.highly_variable_nbatches >= 2).all()
        # Genes the default picked from 2+ batches stay picked; only picks from one batch are replaced.
        kept = default.index[default.highly_variable & (default.highly_variable_nbatches >= 2)]
        assert set(kept) <= set(chosen.index)
        # Fewer than N_TOP genes are in the top N_TOP of 3+ batches: all of them, and only them, are selected.
        eligible = default.highly_variable_nbatches >= 3
        assert eligible.sum() < N_TOP
        pd.testing.assert_series_equal(at_least_3.highly_variable, eligible, check_names=False)
        pd.testing.assert_series_equal(at_least_3.variances_norm, default.variances_norm)


def _fit_by_hand(model: HVGSeuratV3, batches: list[tuple[torch.Tensor, torch.Tensor]], var_names_g: np.ndarray) -> None:
    """The runner's hook sequence, for a layout test that must feed tensors the data layer never makes."""
    trainer = types.SimpleNamespace(world_size=1, global_rank=0, strategy=None)
    model.on_train_start(trainer)
    for _ in range(model.n_epochs_needed):
        model.on_train_epoch_start(trainer)
        for x_ng, batch_index_n in batches:
            model(x_ng, var_names_g, batch_index_n)
        model.on_train_epoch_end(trainer)
    model.on_train_end(trainer)


def test_dense_coo_and_csr_batches_give_the_same_table() -> None:
    """CSR on CPU goes through numpy (runs of one batch, or per-entry gathers when batches interleave);
    COO and dense go through torch, the path GPU batches take. Sums are exact, so tables are identical."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 600, 300
    scale_g = rng.gamma(0.5, 2.0, n_genes)
    counts_ng = rng.negative_binomial(2, 2 / (2 + scale_g[None, :] * rng.gamma(2.0, 0.5, (n_cells, 1))))
    counts_ng[rng.random((n_cells, n_genes)) < 0.002] += 200  # outliers, so that clipping happens
    var_names_g = np.array([f"g{i}" for i in range(n_genes)])
    batch_sorted_n = np.repeat([0, 1, 2], n_cells // 3)
    batch_mixed_n = rng.integers(0, 3, n_cells)

    starts = range(0, n_cells, 200)
    dense_ng = [torch.from_numpy(counts_ng[a : a + 200].astype(np.float32)) for a in starts]
    minibatches = {
        "csr": [csr_to_torch(sp.csr_matrix(x.numpy())) for x in dense_ng],
        "coo": [x.to_sparse_coo() for x in dense_ng],
        "dense": dense_ng,
    }

    def table(layout: str, batch_n: np.ndarray) -> pd.DataFrame:
        batches = [(x_ng, torch.from_numpy(batch_n[a : a + 200])) for x_ng, a in zip(minibatches[layout], starts)]
        model = HVGSeuratV3(var_names_g, 50, n_batch=3, use_batch_key=True, output_path=None)
        _fit_by_hand(model, batches, var_names_g)
        assert model.n_clipped_bg.sum() > 0
        return model.hvg_df

    for batch_n in (batch_sorted_n, batch_mixed_n):
        reference = table("csr", batch_n)
        for layout in ("coo", "dense"):
            pd.testing.assert_frame_equal(table(layout, batch_n), reference, check_exact=True)


def test_set_batch_statistics_needs_one_epoch() -> None:
    rng = np.random.default_rng(1)
    counts_ng = rng.poisson(rng.gamma(0.5, 2.0, 200)[None, :], (300, 200)).astype(np.float32)
    var_names_g = np.array([f"g{i}" for i in range(200)])
    batches = [(torch.from_numpy(counts_ng[a : a + 100]).to_sparse_csr(), None) for a in range(0, 300, 100)]
    two_pass = HVGSeuratV3(var_names_g, 30, output_path=None)
    _fit_by_hand(two_pass, batches, var_names_g)
    one_pass = HVGSeuratV3(var_names_g, 30, output_path=None)
    mean_g, var_g = counts_ng.mean(0, dtype=np.float64), counts_ng.var(0, dtype=np.float64)
    one_pass.set_batch_statistics([300], mean_g[None], var_g[None])
    assert one_pass.n_epochs_needed == 1
    _fit_by_hand(one_pass, batches, var_names_g)
    pd.testing.assert_series_equal(one_pass.hvg_df.highly_variable, two_pass.hvg_df.highly_variable)
    np.testing.assert_allclose(one_pass.hvg_df.variances_norm, two_pass.hvg_df.variances_norm, rtol=1e-12)
    with pytest.raises(RuntimeError, match="max_epochs=1"):
        one_pass(batches[0][0], var_names_g)


# ----------------------------------------------------------------------------- batches left out / LOESS fallback


def test_merged_file_with_batch_key_batch_completes_with_jitter_fallback(pbmc_shards: list[str]) -> None:
    """scanpy stops here ('reciprocal condition number'); the model refits the three failing batches with jitter."""
    with pytest.warns(HVGWarning, match="LOESS fit of batch") as record:
        model = run_model(pbmc_shards, "batch", "seurat_v3")
    messages = [str(w.message) for w in record if issubclass(w.category, HVGWarning)]
    assert set(model.loess_fallbacks) == UNFITTABLE_BATCHES
    for name in UNFITTABLE_BATCHES:
        assert any(repr(name) in m and "jittered" in m for m in messages)
        assert "span widened" not in model.loess_fallbacks[name]
    assert model.excluded_batches == {}
    df = model.hvg_df
    assert df.highly_variable.sum() == N_TOP
    assert df.highly_variable_nbatches.max() <= 23
    assert np.isfinite(df.variances_norm).all()
    # Documented result: every one of the 23 batches is ranked; selected genes were found in at least one batch.
    assert (df.loc[df.highly_variable, "highly_variable_nbatches"] >= 1).all()


def test_single_cell_batch_is_left_out_with_a_warning(pbmc4k: ad.AnnData, tmp_path: Path) -> None:
    """A one-cell batch has no variance (scanpy divides by zero): it is excluded and named; the rest matches scanpy."""
    adata = pbmc4k.copy()
    adata.obs["lane"] = pd.Categorical(["a"] * 1085 + ["b"] * 1084 + ["lonely"])
    paths = split_into_shards(adata, tmp_path, 2)
    with pytest.warns(HVGWarning, match=r"batch 'lonely' is left out of the ranking: it has 1 cell, fewer than"):
        model = run_model(paths, "lane", n_top_genes=500)
    assert set(model.excluded_batches) == {"lonely"}
    ref = scanpy_hvg(adata[adata.obs.lane != "lonely"].copy(), "seurat_v3", "lane", n_top_genes=500)
    ours = model.hvg_df
    assert set(ours.index[ours.highly_variable]) == set(ref.index[ref.highly_variable])
    np.testing.assert_allclose(ours.variances_norm, ref.variances_norm, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(ours.highly_variable_rank.to_numpy(), ref.highly_variable_rank.to_numpy())
    # means and variances stay those of all cells, the excluded one included (as scanpy's are of all cells).
    np.testing.assert_allclose(ours.means, np.asarray(adata.X.mean(axis=0)).ravel(), rtol=1e-12)


def test_no_batch_left_is_an_error(pbmc4k: ad.AnnData, tmp_path: Path) -> None:
    adata = pbmc4k[:3].copy()
    adata.obs["lane"] = pd.Categorical(["a", "b", "c"])
    paths = split_into_shards(adata, tmp_path, 1)
    with pytest.raises(NoBatchLeftError, match="no batch left"), pytest.warns(HVGWarning):
        run_model(paths, "lane", n_top_genes=10)


# ----------------------------------------------------------------------------- bad input


def test_n_top_genes_larger_than_the_genes() -> None:
    with pytest.raises(ValueError, match="larger than the number of genes"):
        HVGSeuratV3(np.array(["g0", "g1", "g2"]), n_top_genes=4)
    with pytest.raises(ValueError, match="larger than the number of genes"):
        HVGSeuratV3(np.array(["g0", "g1", "g2"]), n_top_genes=[2, 5])


def test_cli_n_top_genes_larger_than_the_genes(
    pbmc_shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["hvg", "--input", *pbmc_shards, "--output", str(tmp_path / "hvg.csv"), "--n-top-genes", "9000"])
    assert code == 2
    assert "--n-top-genes 9000 is larger than the number of genes (7152)" in capsys.readouterr().err
    assert not (tmp_path / "hvg.csv").exists()


def test_cli_mean_var_with_other_genes_is_an_input_error(
    pbmc_shards: list[str], mean_var_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pd.read_parquet(mean_var_csv.with_suffix(".parquet"))
    table.loc[table.gene == "A1BG", "gene"] = "NOT_A_GENE"
    bad_csv = tmp_path / "bad_mean_var.csv"
    table.to_parquet(bad_csv.with_suffix(".parquet"))
    code = main(["hvg", "--input", *pbmc_shards, "--batch-key", "source", "--mean-var", str(bad_csv),
                 "--output", str(tmp_path / "hvg.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad_csv.with_suffix(".parquet")) in err and "differ from the shards'" in err
    assert "'NOT_A_GENE'" in err and "same --batch-key" in err


def test_cli_mean_var_with_other_batch_key_is_an_input_error(
    pbmc_shards: list[str], mean_var_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["hvg", "--input", *pbmc_shards, "--batch-key", "batch", "--mean-var", str(mean_var_csv),
                 "--output", str(tmp_path / "hvg.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert "made with --batch-key 'source'" in err and "per-batch LOESS" in err


# ----------------------------------------------------------------------------- CLI: one pass after mean-var, DDP


def test_cli_mean_var_path_gives_the_two_pass_result(
    pbmc_multibatch: ad.AnnData, pbmc_shards: list[str], mean_var_csv: Path, cli_two_pass: Path, cli_dir: Path
) -> None:
    output = cli_dir / "one_pass" / "hvg.csv"
    run_cli("hvg", "--input", *pbmc_shards, "--batch-key", "source", "--mean-var", str(mean_var_csv),
            "--n-top-genes", str(N_TOP), "500", "--output", str(output), "--accelerator", "cpu")
    one_pass, two_pass = read_table(output), read_table(cli_two_pass)
    pd.testing.assert_series_equal(one_pass.highly_variable, two_pass.highly_variable)
    pd.testing.assert_series_equal(one_pass.highly_variable_rank, two_pass.highly_variable_rank)
    pd.testing.assert_series_equal(one_pass.highly_variable_nbatches, two_pass.highly_variable_nbatches)
    # The LOESS sees ddof=0 variances rescaled instead of scanpy's own expression: last-bit differences.
    np.testing.assert_allclose(one_pass.variances_norm, two_pass.variances_norm, rtol=1e-12)
    np.testing.assert_allclose(one_pass.means, two_pass.means, rtol=1e-15)

    csv = pd.read_csv(output)
    assert csv.columns[0] == "gene" and csv.highly_variable.sum() == N_TOP
    second = output.with_name("hvg_500.csv")
    assert second.exists() and second.with_suffix(".parquet").exists()
    assert Path(str(second) + ".provenance.json").exists()
    ref_500 = scanpy_hvg(pbmc_multibatch, "seurat_v3", "source", n_top_genes=500)
    table_500 = read_table(second)
    assert set(table_500.index[table_500.highly_variable]) == set(ref_500.index[ref_500.highly_variable])


@pytest.mark.ddp
@pytest.mark.parametrize("devices", [2, 3])
def test_cli_ddp_gives_the_one_process_table(
    devices: int, pbmc_shards: list[str], cli_two_pass: Path, cli_dir: Path
) -> None:
    output = cli_dir / f"ddp_{devices}" / "hvg.csv"
    run_cli("hvg", "--input", *pbmc_shards, "--batch-key", "source", "--output", str(output),
            "--devices", str(devices), "--accelerator", "cpu")
    pd.testing.assert_frame_equal(read_table(output), read_table(cli_two_pass), check_exact=True)


def test_cli_with_a_loader_worker_gives_the_same_table(pbmc_shards: list[str], cli_two_pass: Path, cli_dir: Path) -> None:
    """Batches read in a DataLoader worker process: the same table, and the step ends (it once replayed
    the worker-transfer warning inside its own warning recorder, looping until out of memory)."""
    output = cli_dir / "worker" / "hvg.csv"
    run_cli("hvg", "--input", *pbmc_shards, "--batch-key", "source", "--output", str(output),
            "--num-workers", "1", "--accelerator", "cpu", timeout=300)
    pd.testing.assert_frame_equal(read_table(output), read_table(cli_two_pass), check_exact=True)
