"""Reference for the mean-var benchmark: what a user would write with anndata + scipy.sparse.

Loads every shard into memory (``anndata.read_h5ad`` + ``anndata.concat``), then computes the
per-gene mean and population variance per batch and over all cells in float64, and saves
them to an ``.npz`` so that the work cannot be skipped. Run by ``bench_mean_var.py``; by hand::

    .venv/bin/python benchmarks/reference_mean_var.py --input benchmarks/out/shards_200000/*.h5ad \\
        --batch-key source --output benchmarks/out/mean_var_200000/reference.npz
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import scipy.sparse as sp


def mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population variance, E[x^2] - E[x]^2, in float64."""
    mean = np.asarray(x.mean(axis=0, dtype=np.float64)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0, dtype=np.float64)).ravel() - mean**2
    return mean, var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="the .h5ad shards")
    parser.add_argument("--batch-key", required=True, help="obs column with each cell's batch")
    parser.add_argument("--output", required=True, help="the .npz to write")
    args = parser.parse_args()

    adata = ad.concat([ad.read_h5ad(path) for path in args.input])
    x = sp.csr_matrix(adata.X)
    batches = adata.obs[args.batch_key].astype("category")
    names = np.asarray(batches.cat.categories, dtype=str)
    codes = batches.cat.codes.to_numpy()

    mean_g, var_g = mean_var(x)
    n_cells_b = np.zeros(len(names), dtype=np.int64)
    mean_bg = np.full((len(names), x.shape[1]), np.nan)
    var_bg = np.full((len(names), x.shape[1]), np.nan)
    for b in range(len(names)):
        xb = x[codes == b]
        n_cells_b[b] = xb.shape[0]
        if xb.shape[0]:
            mean_bg[b], var_bg[b] = mean_var(xb)

    np.savez(
        args.output,
        genes=np.asarray(adata.var_names, dtype=str),
        batches=names,
        n_cells_b=n_cells_b,
        mean_g=mean_g,
        var_g=var_g,
        mean_bg=mean_bg,
        var_bg=var_bg,
    )


if __name__ == "__main__":
    main()
