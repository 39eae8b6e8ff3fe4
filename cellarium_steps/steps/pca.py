"""cellarium-steps pca: principal components of log-normalised expression on a gene list."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.pca import METHODS, fit_pca
from cellarium_steps.steps.common import add_common_arguments, call_pipeline, provenance

NAME = "pca"
HELP = "principal components of normalised, log1p counts on a gene list (exact or incremental), and cell embeddings"
EPILOG = """pipeline (one pass over the cells):
  NormalizeTotal(--target-count) -> Log1p (unless --no-log1p) -> keep --genes -> PCA

outputs:
  OUTPUT (Parquet)           one row per gene: gene, mean (float64), loadings (fixed-size list of
                             float32, one entry per component); config and versions in the metadata
  <stem>_variance.csv        component, explained_variance (population, ddof=0),
                             explained_variance_ratio (of the total variance of the kept genes)
  <stem>.pt                  the fitted model as a recipe checkpoint (transforms, model, weights): predict
                             --checkpoint takes it, as does cellarium_steps.pipelines.pca.load_pca
  OUTPUT + .provenance.json  the run's config and versions
  --embeddings DIR           one Parquet part per device: cell_id, pca (fixed-size list of float32)

methods:
  exact        float64 gene x gene covariance summed over the pass, then an eigendecomposition;
               memory 8 g^2 bytes (2,000 genes: 32 MB), exact whatever the batch size or devices
  incremental  rank-k incremental SVD (memory ~ k x g); approximate, best with cells in random order
  auto         exact up to --exact-max-genes genes, incremental above

example:
  cellarium-steps pca --input 'shards/*.h5ad' --genes out/hvg.csv --output out/pca.parquet \\
      --embeddings out/pca_cells.parquet"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("pca options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to use: a CSV/TSV/Parquet table with a 'gene' column (and, if present, only the rows whose "
        "'highly_variable' is true), or a text file with one gene per line; file order is kept (default: all genes)",
    )
    group.add_argument("--n-components", type=int, default=50, metavar="K", help="principal components (default: 50)")
    group.add_argument(
        "--method", choices=METHODS, default="exact",
        help="exact: the G x G covariance, exact to float64 and fastest up to a few thousand genes; incremental: "
        "a streamed SVD whose memory grows with genes x (K + 1000), for more genes than --exact-max-genes "
        "(all genes rather than HVGs); auto: exact up to --exact-max-genes, else incremental (default: exact)",
    )
    group.add_argument(
        "--exact-max-genes", type=int, default=5000, metavar="G",
        help="most genes the exact method takes (memory 8 G^2 bytes) (default: 5000)",
    )
    group.add_argument(
        "--target-count", type=float, default=10_000, metavar="T",
        help="total count every cell is scaled to before log1p (default: 10000)",
    )
    group.add_argument("--no-log1p", action="store_true", help="skip log1p after normalisation")
    group.add_argument(
        "--svd-niter", type=int, default=2, metavar="N",
        help="power iterations of each low-rank SVD update (incremental only; default: 2)",
    )
    group.add_argument(
        "--embeddings", metavar="DIR",
        help="also write every cell's coordinates: a directory of Parquet parts with cell_id and pca",
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(fit_pca, args, log1p=not args.no_log1p, provenance=provenance(NAME, args))
