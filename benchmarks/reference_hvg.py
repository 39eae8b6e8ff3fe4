"""Reference for the HVG benchmark: what a user would write with anndata + scanpy.

Loads every shard into memory (``anndata.read_h5ad`` + ``anndata.concat``), then runs
``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N, batch_key=...)`` on the raw
counts and writes scanpy's per-gene table (gene, means, variances, variances_norm,
highly_variable_rank, highly_variable_nbatches, highly_variable) to a CSV, so that the work cannot
be skipped. Run by ``bench_hvg_pca.py``; by hand::

    .venv/bin/python benchmarks/reference_hvg.py --input benchmarks/out/shards_200000/*.h5ad \\
        --batch-key source --n-top-genes 2000 --output benchmarks/out/hvg_pca_200000/reference_hvg.csv
"""

from __future__ import annotations

import argparse

import anndata as ad
import scanpy as sc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="the .h5ad shards")
    parser.add_argument("--batch-key", required=True, help="obs column with each cell's batch")
    parser.add_argument("--n-top-genes", type=int, default=2000, help="number of highly variable genes")
    parser.add_argument("--output", required=True, help="the CSV to write")
    args = parser.parse_args()

    adata = ad.concat([ad.read_h5ad(path) for path in args.input])
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=args.n_top_genes, batch_key=args.batch_key)
    table = adata.var.copy()
    table.index = table.index.astype(str)
    table.index.name = "gene"
    table.to_csv(args.output)


if __name__ == "__main__":
    main()
