"""cellarium-steps train-scvi: train an scVI model on raw counts streamed from the shards."""

from __future__ import annotations

import argparse

from cellarium_steps.pipelines.scvi import MAX_DEFAULT_KL_WARMUP_STEPS, train_scvi
from cellarium_steps.pipelines.scvi_model import ARCHITECTURE_DEFAULTS as DEFAULTS
from cellarium_steps.steps.common import add_common_arguments, add_missing_genes_arguments, call_pipeline, provenance

NAME = "train-scvi"
HELP = "train an scVI model (negative binomial VAE with batch correction) on raw counts, streamed"
EPILOG = f"""model:
  scvi-tools' default scVI (scvi.model.SCVI with gene_likelihood="nb", dispersion="gene"): the encoder
  reads log1p counts, each decoder hidden layer also reads the one-hot batch (--batch-key), batch norm
  in both, dropout 0.1 in the encoder, observed library size. Counts stay raw: the model takes log1p
  itself. Non-integer values in the counts matrix (--counts) are an error. The architecture options
  change it as scvi-tools' arguments of the same names do; --encode-covariates is encode_covariates=True
  with deeply_inject_covariates=False (the batch and categorical covariates enter the first hidden layer
  of encoder and decoder).
  scArches' recommended reference for mapping: --encode-covariates --use-layer-norm both --use-batch-norm none.
  --model-config YAML sets any other SingleCellVariationalInference argument by its own name (a mapping,
  or cellarium-ml's class_path/init_args), e.g. encoder and decoder dicts, input_gene_dropout_rate,
  z_kl_weight_max, kl_warmup_epochs; an option given on the command line must agree with it.

covariates:
  --categorical-covariate-keys a,b   obs columns the decoder also reads, one-hot (scvi-tools'
                                     categorical_covariate_keys); each is coded like a one-column batch
                                     key, consistently across shards, and its categories are recorded in
                                     the checkpoint: predict codes new cells with them, and a value the
                                     model never saw stops predict before the pass, naming file, column
                                     and value
  --continuous-covariate-keys c,d    numeric obs columns the decoder also reads (scvi-tools'
                                     continuous_covariate_keys), as float64; a missing or NaN value is an
                                     error naming file, column and row

reference mapping (--reference REF.ckpt):
  maps the --input query onto a trained train-scvi checkpoint, as scvi-tools' load_query_data and
  scArches do: the reference's architecture, genes and weights are kept, the query's batches that the
  reference did not see are added after the reference's (whose codes stay), and only the new batches'
  parameters are trained (their columns in every layer that reads the batch, or their rows of the
  batch embedding; also, as scvi-tools, the decoder's batch norm), streamed like any training, without
  weight decay, and with dropout and batch norm as at prediction time (as scvi-tools' query training,
  which keeps the model in evaluation mode). The query checkpoint embeds reference and query cells in
  one latent space; reference cells keep their latent means (to float rounding). --batch-key defaults
  to the reference's; the covariates' columns, the counts matrix and gene names are the reference's,
  and new categories of its categorical covariates are added (and trained) as new batches are.
  Reference genes the query lacks: an error, or --missing-genes zero (read as zeros). The architecture
  options, --genes, --model-config and the covariate options do not combine with --reference.

KL warm-up:
  the KL weight rises linearly from 0 to 1 over --kl-warmup-steps optimizer steps. The default is a
  quarter of the run's steps (--max-epochs x batches per epoch per device), at most
  {MAX_DEFAULT_KL_WARMUP_STEPS}, so the weight reaches 1 within the run on a small dataset and within a few
  thousand steps on millions of cells (scvi-tools' 400-epoch default never ends on large data).

validation (only with --val-fraction):
  a fraction of the cells, chosen by a hash of the cell's obs name and --seed (the same cells in every
  epoch, on any number of devices), is held out of training; after each epoch the model logs on them
  val_loss, val_reconstruction_loss and val_kl_divergence_z. With --cell-type-key (an obs column of
  Cell Ontology ids; 'unknown' or missing = unlabelled) it also logs
    val_cell_type_classifier_accuracy  a logistic regression fitted on the latent means of labelled
                                       held-out cells of even validation batches, scored on those of
                                       odd batches (each side at most --val-reservoir-size cells,
                                       reservoir-sampled)
    val_ontology_spearman              per cell type, Spearman's correlation between the latent
                                       distances of the type centroids and their Cell Ontology
                                       distances, averaged with the types' cell counts as weights
  The validation pass reads every cell (and keeps the held-out ones), so it costs a read of the data.

outputs:
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights, optimizer state, and the recipe
                            that rebuilds the pipeline (the --genes filter and the model's constructor
                            arguments), the shards' genes, --batch-key and its categories (batch index
                            i is category i), the covariates' columns and categories, the counts matrix
                            and gene names read (--counts, --var-names), provenance; with --reference also
                            data.reference (its path, a fingerprint of its weights, its batches, the new
                            batches' cell counts, the genes read as zeros). `cellarium-steps predict --checkpoint` and
                            CellariumModule.from_checkpoint() use it.
  OUTPUT.d/last.ckpt        checkpoint of the last finished epoch, written atomically every epoch; a run
                            started again with the same options resumes from it
  OUTPUT + .metrics.csv     epoch, step, train_loss (the epoch's mean training loss; with --val-fraction
                            also val_loss and every other val_* metric above), one row per epoch;
                            OUTPUT.d/metrics.csv grows epoch by epoch
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps hvg --input 'shards/*.h5ad' --batch-key batch --n-top-genes 2000 --output out/hvg.csv
  cellarium-steps train-scvi --input 'shards/*.h5ad' --batch-key batch --genes out/hvg.csv \\
      --encode-covariates --use-layer-norm both --use-batch-norm none --output out/scvi.ckpt
  cellarium-steps train-scvi --reference out/scvi.ckpt --input 'query/*.h5ad' --batch-key batch \\
      --missing-genes zero --max-epochs 100 --output out/query_scvi.ckpt"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # scvi-tools trains on 128 cells a step; larger batches stream faster and keep batch norm stable.
    add_common_arguments(parser, batch_size=1024)
    group = parser.add_argument_group("train-scvi options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to model: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output; the "
        "highly variable ones are used) or a text file with one gene per line (default: all genes)",
    )
    group.add_argument("--max-epochs", type=int, default=20, metavar="N", help="passes over the data (default: 20)")
    arch = parser.add_argument_group("train-scvi architecture (default: scvi-tools' SCVI)")
    arch.add_argument("--n-latent", type=int, metavar="K", help=f"latent dimensions (default: {DEFAULTS['n_latent']})")
    arch.add_argument("--n-hidden", type=int, metavar="N",
                      help=f"units per hidden layer (default: {DEFAULTS['n_hidden']})")
    arch.add_argument("--n-layers", type=int, metavar="N",
                      help=f"hidden layers in encoder and decoder (default: {DEFAULTS['n_layers']})")
    arch.add_argument("--encode-covariates", action=argparse.BooleanOptionalAction, default=None,
                      help="the encoder's first hidden layer also reads the batch (default: off)")
    for name in ("use_layer_norm", "use_batch_norm"):
        arch.add_argument(f"--{name.replace('_', '-')}", choices=("none", "encoder", "decoder", "both"),
                          help=f"where hidden layers get {'LayerNorm' if 'layer' in name else 'BatchNorm1d'} "
                          f"(default: {DEFAULTS[name]})")
    arch.add_argument("--dropout-rate", type=float, metavar="P",
                      help=f"dropout after each encoder hidden layer (default: {DEFAULTS['dropout_rate']})")
    arch.add_argument("--dispersion", choices=("gene", "gene-batch", "gene-cell"),
                      help="the negative binomial's inverse dispersion: per gene, per gene and batch, or decoded "
                      "per cell (default: gene)")
    arch.add_argument("--gene-likelihood", choices=("nb", "poisson"), help="count distribution (default: nb)")
    arch.add_argument("--use-flow", action=argparse.BooleanOptionalAction, default=None,
                      help="a spline flow prior on the latent instead of N(0, I) (default: off)")
    arch.add_argument("--batch-embedded", action=argparse.BooleanOptionalAction, default=None,
                      help="a learned batch embedding instead of the one-hot batch (default: off)")
    arch.add_argument("--model-config", metavar="YAML",
                      help="any other SingleCellVariationalInference arguments, by their own names")
    mapping = parser.add_argument_group("reference mapping")
    mapping.add_argument("--reference", metavar="CKPT",
                         help="map the --input query onto this train-scvi checkpoint (see 'reference mapping')")
    add_missing_genes_arguments(mapping)
    group.add_argument(
        "--learning-rate", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default: 1e-3)"
    )
    group.add_argument(
        "--kl-warmup-steps", type=int, default=None, metavar="N",
        help=f"optimizer steps over which the KL weight rises to 1 (default: a quarter of the run, at most "
        f"{MAX_DEFAULT_KL_WARMUP_STEPS})",
    )
    group.add_argument(
        "--categorical-covariate-keys", nargs="+", metavar="COLUMN[,COLUMN...]", default=None,
        help="obs columns of categorical covariates besides the batch (default: none)",
    )
    group.add_argument(
        "--continuous-covariate-keys", nargs="+", metavar="COLUMN[,COLUMN...]", default=None,
        help="numeric obs columns of continuous covariates (default: none)",
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.0, metavar="F",
        help="hold out this fraction of the cells (by a hash of their obs names) and validate on them after "
        "every epoch (default: 0, no validation)",
    )
    group.add_argument(
        "--cell-type-key", metavar="COLUMN", default=None,
        help="obs column of Cell Ontology ids for the validation cell type metrics (needs --val-fraction)",
    )
    group.add_argument(
        "--val-reservoir-size", type=int, default=50_000, metavar="N",
        help="most held-out cells per side (train/test) of the validation classifier (default: 50000)",
    )


def run(args: argparse.Namespace) -> None:
    call_pipeline(train_scvi, args, provenance=provenance(NAME, args))
