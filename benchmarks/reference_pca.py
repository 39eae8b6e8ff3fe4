"""Reference for the PCA benchmark: what a user would write with anndata + scanpy.

Loads every shard into memory (``anndata.read_h5ad`` + ``anndata.concat``), then
``sc.pp.normalize_total(target_sum=1e4)``, ``sc.pp.log1p``, keeps the given genes (the highly
variable genes chosen by ``cellarium-steps hvg``, so that both sides use the same genes) and runs
``sc.pp.pca(n_comps=K)`` with scanpy's default solver for sparse input. Writes the explained
variances (scanpy's ``uns["pca"]["variance"]``, ddof=1) and ratios, the number of cells and the
solver scanpy resolved to, to an ``.npz``. Run by ``bench_hvg_pca.py``; by hand::

    .venv/bin/python benchmarks/reference_pca.py --input benchmarks/out/shards_200000/*.h5ad \\
        --genes benchmarks/out/hvg_pca_200000/hvg_given_mean_var.csv --n-components 50 \\
        --output benchmarks/out/hvg_pca_200000/reference_pca.npz
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp


def read_genes(path: str) -> list[str]:
    """The genes of a ``cellarium-steps hvg`` table: rows whose ``highly_variable`` is true, in file order."""
    table = pd.read_csv(path)
    if "highly_variable" in table.columns:
        table = table[table["highly_variable"].astype(bool)]
    return table["gene"].astype(str).tolist()


def default_sparse_solver() -> str:
    """The solver ``sc.pp.pca(svd_solver=None)`` resolves to for an in-memory sparse matrix.

    Asks scanpy's own resolver (private, so it may move); e.g. ``'arpack'`` (sklearn PCA with
    implicit centring of the sparse matrix) in scanpy 1.11 with scikit-learn >= 1.4.
    """
    try:
        from scanpy.preprocessing._pca import _handle_sklearn_args
        from sklearn.decomposition import PCA

        return f"sklearn PCA(svd_solver={_handle_sklearn_args(None, PCA, sparse=True)!r})"
    except Exception:  # noqa: BLE001 - a private helper; report rather than fail
        return "scanpy default for sparse input (unresolved)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="the .h5ad shards")
    parser.add_argument("--genes", required=True, help="a cellarium-steps hvg CSV (gene, highly_variable)")
    parser.add_argument("--n-components", type=int, default=50, help="principal components")
    parser.add_argument("--target-sum", type=float, default=1e4, help="total count per cell after normalisation")
    parser.add_argument("--output", required=True, help="the .npz to write")
    args = parser.parse_args()

    genes = read_genes(args.genes)
    adata = ad.concat([ad.read_h5ad(path) for path in args.input])
    sc.pp.normalize_total(adata, target_sum=args.target_sum)
    sc.pp.log1p(adata)
    adata = adata[:, genes].copy()
    if not sp.issparse(adata.X):
        raise SystemExit(f"expected a sparse matrix after loading, got {type(adata.X).__name__}")
    sc.pp.pca(adata, n_comps=args.n_components)  # svd_solver=None: scanpy's default for sparse input

    np.savez(
        args.output,
        genes=np.asarray(adata.var_names, dtype=str),
        n_cells=np.int64(adata.n_obs),
        x_dtype=np.str_(str(adata.X.dtype)),
        variance=np.asarray(adata.uns["pca"]["variance"], dtype=np.float64),
        variance_ratio=np.asarray(adata.uns["pca"]["variance_ratio"], dtype=np.float64),
        svd_solver=np.str_(default_sparse_solver()),
    )


if __name__ == "__main__":
    main()
