"""ExactPCA, IncrementalPCA and the `pca` step against a float64 numpy eigendecomposition.

Convention: ``explained_variance_k`` is the population variance (ddof=0, divided by n), the
eigenvalues of ``Xc.T @ Xc / n``. scikit-learn's PCA divides by n - 1 (ddof=1); the reference
here divides by n, and ``test_ddof_convention_against_sklearn`` pins the factor n / (n - 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from cellarium_steps.outputs.tables import read_provenance
from cellarium_steps.models import ExactPCA, IncrementalPCA
from cellarium_steps.steps.cli import main
from cellarium_steps.outputs.genes import read_gene_list
from cellarium_steps.outputs.pca import output_paths, read_pca_state
from cellarium_steps.pipelines.pca import load_pca
from pca_reference import Reference, assert_accurate, fit_model, log_normalised, synthetic

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse:UserWarning"),
    pytest.mark.filterwarnings("ignore:Couldn't infer the batch indices"),
]

PBMC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pbmc_multibatch_15493x7152_raw.h5ad"
CLI = str(Path(sys.executable).parent / "cellarium-steps")
N_GENES = 2000
K = 50
BATCH_SIZE = 4000


class PBMCReference(Reference):
    """The reference PCA of the step's input, with the cells' names and the genes, in order."""

    def __init__(self, x_ng: np.ndarray, obs_names_n: np.ndarray, genes: list[str]) -> None:
        super().__init__(x_ng, K)
        self.obs_names_n = obs_names_n
        self.genes = genes


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, PBMCReference]:
    """Three shards of the PBMC file, an HVG table (scanpy seurat_v3) and the reference PCA."""
    if not PBMC.exists():
        pytest.skip(f"real test data not found: {PBMC} (shared data directory not mounted)")
    anndata = pytest.importorskip("anndata")
    scanpy = pytest.importorskip("scanpy")
    adata = anndata.read_h5ad(PBMC)
    counts = sp.csr_matrix(adata.X)
    hvg = adata.copy()
    scanpy.pp.highly_variable_genes(hvg, n_top_genes=N_GENES, flavor="seurat_v3")

    out = tmp_path_factory.mktemp("pca_shards")
    genes_path = out / "hvg.csv"
    # HVGs in a shuffled order: the step must keep the file's order, not the data's.
    table = pd.DataFrame({"gene": hvg.var_names, "highly_variable": hvg.var["highly_variable"].to_numpy()})
    table = table.sample(frac=1.0, random_state=0)
    table.to_csv(genes_path, index=False)
    genes = table.loc[table["highly_variable"], "gene"].tolist()

    paths = []
    bounds = np.linspace(0, adata.n_obs, 4).astype(int)
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        part = anndata.AnnData(X=counts[start:stop], obs=pd.DataFrame(index=adata.obs_names[start:stop]),
                               var=pd.DataFrame(index=adata.var_names))
        path = out / f"shard_{i}.h5ad"
        part.write_h5ad(path)
        paths.append(str(path))

    position = {g: i for i, g in enumerate(adata.var_names)}
    x_ng = log_normalised(counts, [position[g] for g in genes])
    return paths, genes_path, PBMCReference(x_ng, adata.obs_names.to_numpy(), genes)


def run_pca(paths: list[str], genes_path: Path, output: Path, *extra: str) -> None:
    argv = ["pca", "--input", *paths, "--genes", str(genes_path), "--output", str(output),
            "--n-components", str(K), "--batch-size", str(BATCH_SIZE), "--accelerator", "cpu", "--quiet", *extra]
    assert main(argv) == 0


def run_pca_cli(paths: list[str], genes_path: Path, output: Path, devices: int, *extra: str) -> None:
    """The console script in a subprocess: Lightning starts the DDP ranks by re-running it."""
    argv = [CLI, "pca", "--input", *paths, "--genes", str(genes_path), "--output", str(output),
            "--n-components", str(K), "--batch-size", str(BATCH_SIZE), "--accelerator", "cpu",
            "--devices", str(devices), "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def read_embeddings(path: Path) -> pd.DataFrame:
    table = ds.dataset(path, format="parquet").to_table()
    return pd.DataFrame({"cell_id": table["cell_id"].to_numpy(zero_copy_only=False),
                         "pca": list(table["pca"].combine_chunks().values.to_numpy().reshape(-1, K))})


@pytest.fixture(scope="module")
def exact_run(pbmc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths, genes_path, _ = pbmc
    output = tmp_path_factory.mktemp("exact1") / "pca.parquet"
    run_pca(paths, genes_path, output, "--embeddings", str(output.parent / "cells.parquet"))
    return output


@pytest.fixture(scope="module")
def incremental_run(pbmc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths, genes_path, _ = pbmc
    output = tmp_path_factory.mktemp("incremental1") / "pca.parquet"
    run_pca(paths, genes_path, output, "--method", "incremental")
    return output


def fitted(output: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """explained_variance_k, components_kg, mean_g (float64) of a run, from its <stem>.pt."""
    model, _ = load_pca(output_paths(str(output))["state"])
    return (model.explained_variance_k.numpy(), model.components_kg.numpy(), model.mean_g.numpy())


def abs_cosine_k(a_kg: np.ndarray, b_kg: np.ndarray) -> np.ndarray:
    return np.abs(np.einsum("kg,kg->k", a_kg, b_kg)) / (np.linalg.norm(a_kg, axis=1) * np.linalg.norm(b_kg, axis=1))


def test_exact_matches_numpy(pbmc, exact_run: Path) -> None:
    _, _, ref = pbmc
    variance_k, components_kg, mean_g = fitted(exact_run)
    relative_k = np.abs(variance_k / ref.eigenvalues_g[:K] - 1)
    assert relative_k.max() <= 1e-6, relative_k.max()
    np.testing.assert_allclose(mean_g, ref.mean_g, rtol=1e-6, atol=1e-9)
    separated = ref.separated_components()
    assert len(separated) >= 10 and {0, 1} <= set(separated)
    cos_k = abs_cosine_k(components_kg, ref.components_kg)
    assert (1 - cos_k[separated]).max() <= 1e-6
    assert ref.reconstruction_ratio(mean_g, components_kg) <= 1 + 1e-9


def test_exact_outputs_layout(pbmc, exact_run: Path) -> None:
    _, _, ref = pbmc
    paths = output_paths(str(exact_run))
    table = pq.read_table(paths["components"])
    assert table.column_names == ["gene", "mean", "loadings"]
    assert str(table.schema.field("loadings").type) == "fixed_size_list<element: float>[50]"
    assert table["gene"].to_pylist() == ref.genes  # the gene file's order
    variance_k, components_kg, _ = fitted(exact_run)
    loadings_gk = table["loadings"].combine_chunks().values.to_numpy().reshape(-1, K)
    np.testing.assert_allclose(loadings_gk.T, components_kg, atol=1e-7)
    # Sign convention: the largest-magnitude loading of each component is positive.
    rows_k = np.abs(components_kg).argmax(axis=1)
    assert (components_kg[np.arange(K), rows_k] > 0).all()

    variance = pd.read_csv(paths["variance"])
    assert list(variance.columns) == ["component", "explained_variance", "explained_variance_ratio"]
    assert variance["component"].tolist()[:2] == ["PC1", "PC2"]
    np.testing.assert_allclose(variance["explained_variance"], variance_k, rtol=1e-12)
    np.testing.assert_allclose(variance["explained_variance_ratio"], ref.eigenvalues_g[:K] / ref.trace, rtol=1e-6)
    assert read_provenance(paths["components"])["config"]["n_components"] == K
    assert json.loads(paths["provenance"].read_text())["step"] == "pca"


def test_embeddings_are_the_projection(pbmc, exact_run: Path) -> None:
    _, _, ref = pbmc
    cells = read_embeddings(exact_run.parent / "cells.parquet")
    assert len(cells) == ref.n and cells["cell_id"].is_unique
    assert set(cells["cell_id"]) == set(ref.obs_names_n)
    _, components_kg, mean_g = fitted(exact_run)
    order = pd.Index(cells["cell_id"]).get_indexer(ref.obs_names_n)
    z_nk = np.stack(cells["pca"].to_numpy())[order]
    expected_nk = (ref.x_ng - mean_g) @ components_kg.T
    # float32 output; the data went through float32 normalisation in the step.
    np.testing.assert_allclose(z_nk, expected_nk, rtol=0, atol=2e-4 * np.abs(expected_nk).max())
    assert read_provenance(next((exact_run.parent / "cells.parquet").glob("*.parquet")))["step"] == "pca"


def test_incremental_close_to_exact(pbmc, incremental_run: Path) -> None:
    """The step's incremental method at its defaults meets the acceptance of pca_reference, on
    shards that each hold a third of the file's sources (the hard case: see test_incremental_pca)."""
    _, _, ref = pbmc
    model, _ = load_pca(output_paths(str(incremental_run))["state"])
    accuracy = ref.accuracy(model)
    print(f"pca step, incremental, 1 process: {accuracy}")
    assert_accurate(accuracy)
    # Mean and total variance are exact sums, whatever the SVD's truncation.
    np.testing.assert_allclose(model.mean_g.numpy(), ref.mean_g, rtol=1e-6, atol=1e-9)
    ratio = pd.read_csv(output_paths(str(incremental_run))["variance"])["explained_variance_ratio"].to_numpy()
    np.testing.assert_allclose(ratio, model.explained_variance_k.numpy() / ref.trace, rtol=1e-6)


@pytest.mark.ddp
@pytest.mark.slow
def test_exact_ddp_matches_one_process(pbmc, exact_run: Path, tmp_path: Path) -> None:
    paths, genes_path, ref = pbmc
    output = tmp_path / "pca.parquet"
    run_pca_cli(paths, genes_path, output, 2, "--embeddings", str(tmp_path / "cells.parquet"))
    variance_k, components_kg, mean_g = fitted(output)
    single_variance_k, single_components_kg, single_mean_g = fitted(exact_run)
    np.testing.assert_allclose(variance_k, single_variance_k, rtol=1e-9)
    np.testing.assert_allclose(mean_g, single_mean_g, rtol=1e-9, atol=1e-12)
    separated = ref.separated_components()
    np.testing.assert_allclose(components_kg[separated], single_components_kg[separated], atol=1e-7)

    parts = sorted(p.name for p in (tmp_path / "cells.parquet").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob(".*parts-tmp"))
    cells = read_embeddings(tmp_path / "cells.parquet")
    single = read_embeddings(exact_run.parent / "cells.parquet")
    assert len(cells) == ref.n and cells["cell_id"].is_unique
    assert cells["cell_id"].tolist() == single["cell_id"].tolist()  # rank 0's cells, then rank 1's
    np.testing.assert_allclose(np.stack(cells["pca"]), np.stack(single["pca"]), atol=1e-4)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3, 5])
def test_incremental_ddp(pbmc, devices: int, tmp_path: Path) -> None:
    """Real gloo: the ranks read unequal parts of the three shards (with 3, one shard each), and their
    partial SVDs are merged; the result meets the same acceptance as one process."""
    paths, genes_path, ref = pbmc
    output = tmp_path / "pca.parquet"
    run_pca_cli(paths, genes_path, output, devices, "--method", "incremental")
    model, _ = load_pca(output_paths(str(output))["state"])
    accuracy = ref.accuracy(model)
    print(f"pca step, incremental, {devices} processes: {accuracy}")
    assert_accurate(accuracy)
    np.testing.assert_allclose(model.mean_g.numpy(), ref.mean_g, rtol=1e-6, atol=1e-9)


# --- model-level tests on synthetic data -------------------------------------------------


def numpy_pca(x_ng: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    centred = x_ng - x_ng.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(x_ng))
    return eigenvalues[::-1][:k], eigenvectors[:, ::-1][:, :k].T


def test_models_on_synthetic_data() -> None:
    x_ng = synthetic()
    names = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    x32_ng = x_ng.astype(np.float32).astype(np.float64)
    expected_k, components_kg = numpy_pca(x32_ng, 8)
    for model in (ExactPCA(names, 8), IncrementalPCA(names, 8)):
        fit_model(model, x_ng, sparse=isinstance(model, ExactPCA))
        # At its defaults the incremental model keeps all 120 directions here, so it is exact too.
        np.testing.assert_allclose(model.explained_variance_k.numpy(), expected_k, rtol=1e-9)
        assert (1 - abs_cosine_k(model.components_kg.numpy(), components_kg)).max() < 1e-4
        z_nk = model.predict(torch.from_numpy(x_ng[:7]).float(), names)["x_ng"]
        expected_nk = (x32_ng[:7] - x32_ng.mean(axis=0)) @ model.components_kg.numpy().T
        np.testing.assert_allclose(z_nk.numpy(), expected_nk, rtol=1e-4, atol=1e-4)
        sparse_z_nk = model.predict(torch.from_numpy(x_ng[:7]).float().to_sparse_csr(), names)["x_ng"]
        np.testing.assert_allclose(sparse_z_nk.numpy(), z_nk.numpy(), rtol=1e-6, atol=1e-6)
        assert list(model.predict(torch.ones(1, len(names)), names)["var_names_g"][:2]) == ["PC1", "PC2"]


def test_exact_sparse_and_dense_batches_agree() -> None:
    x_ng = np.abs(synthetic(n=800, g=40))
    x_ng[x_ng < 3] = 0
    names = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    sparse, dense = fit_model(ExactPCA(names, 5), x_ng, sparse=True), fit_model(ExactPCA(names, 5), x_ng)
    np.testing.assert_allclose(sparse.explained_variance_k.numpy(), dense.explained_variance_k.numpy(), rtol=1e-12)
    np.testing.assert_allclose(sparse.components_kg.numpy(), dense.components_kg.numpy(), atol=1e-10)


def test_incremental_without_mean_correction_uses_data_as_centred() -> None:
    x_ng = synthetic(n=1500, g=60)
    x_ng -= x_ng.mean(axis=0)
    names = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    model = fit_model(IncrementalPCA(names, 5, perform_mean_correction=False), x_ng)
    expected_k, _ = numpy_pca(x_ng, 5)
    assert torch.count_nonzero(model.mean_g) == 0
    # Exact up to the float32 batches' residual mean (the reference centres it away).
    np.testing.assert_allclose(model.explained_variance_k.numpy(), expected_k, rtol=1e-7)


def test_ddof_convention_against_sklearn() -> None:
    """explained_variance_k divides by n; scikit-learn's PCA divides by n - 1."""
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    x_ng = synthetic(n=400, g=30)
    names = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    model = fit_model(ExactPCA(names, 4), x_ng)
    sk = sklearn_decomposition.PCA(n_components=4, svd_solver="full").fit(x_ng.astype(np.float32).astype(np.float64))
    n = len(x_ng)
    np.testing.assert_allclose(model.explained_variance_k.numpy() * n / (n - 1), sk.explained_variance_, rtol=1e-8)


def test_state_dict_round_trip_and_reset() -> None:
    x_ng = synthetic(n=600, g=30)
    names = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    for cls in (ExactPCA, IncrementalPCA):
        model = fit_model(cls(names, 3), x_ng)
        restored = cls(names, 3)
        restored.load_state_dict(model.state_dict())
        assert torch.equal(restored.components_kg, model.components_kg)
        assert torch.equal(restored.explained_variance_k, model.explained_variance_k)
        model.on_train_start(types.SimpleNamespace(world_size=1))
        assert float(model.x_size) == 0


def test_invalid_models() -> None:
    names = np.array(["a", "b", "c"])
    for cls in (ExactPCA, IncrementalPCA):
        with pytest.raises(ValueError, match="n_components"):
            cls(names, 4)
        with pytest.raises(ValueError, match="var_names_g"):
            cls(names, 2)(torch.ones(2, 3), np.array(["a", "c", "b"]))


# --- step input handling -----------------------------------------------------------------


def test_read_gene_list_formats(tmp_path: Path) -> None:
    (tmp_path / "genes.txt").write_text("B\nA\n\n# comment\nC\n")
    assert read_gene_list(str(tmp_path / "genes.txt")) == ["B", "A", "C"]
    hvg = pd.DataFrame({"gene": ["X", "Y", "Z"], "highly_variable": [True, False, True]})
    hvg.to_csv(tmp_path / "h.csv", index=False)
    assert read_gene_list(str(tmp_path / "h.csv")) == ["X", "Z"]
    hvg = pd.DataFrame({"gene": ["X", "Y"], "highly_variable": ["False", "True"]})
    hvg.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    assert read_gene_list(str(tmp_path / "s.tsv")) == ["Y"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from cellarium_steps.data.simulate import simulate_shards

    return simulate_shards(str(tmp_path_factory.mktemp("pca_sim")), n_cells=600, n_genes=80, n_shards=2, seed=3)


def test_step_rejects_bad_input(small_shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "genes.txt").write_text("NOT_A_GENE\nALSO_MISSING\nMT-CO1\n")
    common = ["pca", "--input", *small_shards, "--output", str(tmp_path / "pca.parquet"), "--quiet"]
    assert main([*common, "--genes", str(tmp_path / "genes.txt")]) == 2
    assert "2 genes of the list are not in the data" in capsys.readouterr().err
    assert main([*common, "--n-components", "81"]) == 2
    assert "exceeds the number of genes (80)" in capsys.readouterr().err
    assert main([*common, "--exact-max-genes", "50"]) == 2
    assert "--method incremental or auto" in capsys.readouterr().err
    assert not (tmp_path / "pca.parquet").exists()


def test_step_auto_method_and_no_log1p(small_shards: list[str], tmp_path: Path) -> None:
    output = tmp_path / "pca.parquet"
    common = ["pca", "--input", *small_shards, "--output", str(output), "--n-components", "5", "--quiet"]
    assert main([*common, "--method", "auto", "--exact-max-genes", "50", "--no-log1p"]) == 0
    state = read_pca_state(output_paths(str(output))["state"])
    assert state["model"] == "IncrementalPCA" and state["config"]["log1p"] is False
    model, transforms = load_pca(output_paths(str(output))["state"])
    assert [type(t).__name__ for t in transforms] == ["NormalizeTotal"]
    assert isinstance(model, IncrementalPCA) and model.n_components == 5


@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_filter_keeps_the_list_order_and_each_rows_order(order: str) -> None:
    """Filter's CSR output equals dense column selection whether or not the gene list follows the
    data's gene order; each row keeps its entries' order, so sorted rows stay sorted under a gene
    list in the data's order (consumers do not need sorted rows: files need not store them so)."""
    import scipy.sparse as sp

    from cellarium_steps.transforms import Filter

    rng = np.random.default_rng(0)
    x = sp.random(300, 500, density=0.1, format="csr", random_state=1, dtype=np.float32)
    genes_g = np.array([f"g{i}" for i in range(500)], dtype=object)
    index = rng.choice(500, 100, replace=False)
    index = np.sort(index) if order == "increasing" else index
    x_ng = torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr), torch.from_numpy(x.indices), torch.from_numpy(x.data), size=x.shape
    )
    out = Filter(list(genes_g[index]))(x_ng, genes_g)
    np.testing.assert_array_equal(out["x_ng"].to_dense().numpy(), x.toarray()[:, index])
    crow, col = out["x_ng"].crow_indices().numpy(), out["x_ng"].col_indices().numpy()
    for i in range(x.shape[0]):
        stored = x.indices[x.indptr[i] : x.indptr[i + 1]]
        np.testing.assert_array_equal(index[col[crow[i] : crow[i + 1]]], stored[np.isin(stored, index)])
    if order == "increasing":
        assert all((np.diff(col[crow[i] : crow[i + 1]]) > 0).all() for i in range(x.shape[0]))
    assert list(out["var_names_g"]) == list(genes_g[index])
