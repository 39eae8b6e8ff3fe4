"""cellarium-steps report: the plots a user looks at first, as PNGs for `snakemake --report`."""

from __future__ import annotations

import argparse

from cellarium_steps.outputs.report import PLOTS, QUERY_PLOTS, write_report
from cellarium_steps.steps.common import call_pipeline, provenance

NAME = "report"
HELP = "plot the run's first-look figures (HVG, PCA variance, scVI loss, latent, cell types per batch) as PNGs"
REQUIRED = ("output",)
EPILOG = f"""outputs (in the --output directory; a plot whose input is not given says so in the image):
{chr(10).join(f"  {name:28s} from {flag}" for name, flag in PLOTS.items())}
  provenance.json              the run's config and versions
with --query-cells (a query mapped onto the --cells reference: train-scvi --reference, then its export),
instead:
{chr(10).join(f"  {name:32s} {what}" for name, what in QUERY_PLOTS.items())}
  the first's title gives the query's mixing: the share of reference cells among each query cell's 15
  nearest neighbours in the latent (reference and query drawn at the same rate), beside the reference's
  share of the cells drawn (what a perfectly mixed query would reach)

per-cell data:
  the export (--cells) is streamed once: the cell-type counts per batch are exact over every cell; the
  2-D views use a uniform sample of at most --sample-size cells (a reservoir, seeded by --seed), so
  memory does not grow with the number of cells. The 2-D view is the first two principal components
  of the scVI latent (--layout pca) or a UMAP of the sample (--layout umap, needs umap-learn).

example:
  cellarium-steps report --hvg out/hvg.csv --pca-variance out/pca_variance.csv \\
      --scvi-metrics out/scvi.ckpt.metrics.csv --cells out/export/cells.parquet --output out/report"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="DIR", help="directory for the PNGs (required)")
    parser.add_argument("--hvg", metavar="CSV", help="hvg's table (gene, means, variances, variances_norm, highly_variable)")
    parser.add_argument("--pca-variance", metavar="CSV", help="pca's <stem>_variance.csv")
    parser.add_argument("--scvi-metrics", metavar="CSV", help="train-scvi's OUTPUT.metrics.csv (epoch, train_loss, val_loss)")
    parser.add_argument("--cells", metavar="DIR", help="the export's Parquet dataset (scvi_latent, batch, cell_type)")
    parser.add_argument("--query-cells", metavar="DIR",
                        help="a mapped query's export: plot it beside the --cells reference (the query report)")
    parser.add_argument("--latent-column", default="scvi_latent", metavar="COLUMN",
                        help="the embedding to draw in 2-D (default: scvi_latent)")
    parser.add_argument("--sample-size", type=int, default=20_000, metavar="N",
                        help="cells drawn in the 2-D views (default: 20000)")
    parser.add_argument("--layout", choices=("pca", "umap"), default="pca",
                        help="2-D layout of the latent sample: its first two principal components, or UMAP (default: pca)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of UMAP (default: 0)")
    parser.add_argument("--config", metavar="YAML", help="a YAML file with these options' long names as keys")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")


def run(args: argparse.Namespace) -> None:
    call_pipeline(write_report, args, provenance=provenance(NAME, args))
