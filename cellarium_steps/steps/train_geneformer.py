"""cellarium-steps train-geneformer: masked-language-model training of Geneformer on streamed shards."""

from __future__ import annotations

import argparse
import logging
import os

import lightning.pytorch as pl
import numpy as np
import pandas as pd

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.models.geneformer import Geneformer
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import spec
from cellarium_steps.steps._training import fit_and_publish, resumable_trainer
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance, selected_genes
from cellarium_steps.transforms.filter import Filter

logger = logging.getLogger("cellarium_steps")

NAME = "train-geneformer"
HELP = "train a Geneformer (BERT over rank-value encoded cells) by masked language modelling, streamed"
EPILOG = """model:
  each cell becomes the list of its expressed genes ordered by decreasing count / total / factor (the
  gene's non-zero median from --tdigest, else 1), cut at --max-position-embeddings genes; a BERT encoder
  learns to recover --mlm-probability of them from the others (80% MASK, 10% a random gene, 10% kept).
  The defaults are a small model that trains on a CPU; Geneformer's paper used 6 layers of 256.

outputs:
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights (the per-gene factor included), optimizer
                            state, and the recipe (the --genes filter and the model's constructor arguments);
                            CellariumModule.from_checkpoint() rebuilds the model from it
  OUTPUT.d/last.ckpt        checkpoint of the last finished epoch, written atomically every epoch; a run
                            started again with the same options resumes from it
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps tdigest --input 'shards/*.h5ad' --output out/tdigest.csv
  cellarium-steps train-geneformer --input 'shards/*.h5ad' --tdigest out/tdigest.csv --output out/geneformer.ckpt"""

#: (option, default, help) of the model's size; small enough to train on a CPU.
MODEL_OPTIONS = (
    ("hidden_size", 64, "width of the encoder"),
    ("num_hidden_layers", 2, "encoder layers"),
    ("num_attention_heads", 2, "attention heads per layer (must divide --hidden-size)"),
    ("intermediate_size", 128, "width of each layer's feed-forward block"),
    ("max_position_embeddings", 512, "genes per cell: the top-ranked ones are kept"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every cell is a sequence of up to --max-position-embeddings tokens: batches are small.
    add_common_arguments(parser, batch_size=32)
    group = parser.add_argument_group("train-geneformer options")
    group.add_argument(
        "--tdigest", metavar="PATH",
        help="the tdigest step's table (CSV or Parquet, 'gene' and 'median' columns): each gene's non-zero "
        "median divides its normalized counts before ranking (default: no per-gene factor)",
    )
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to model: a CSV with 'gene' and 'highly_variable' columns (the hvg step's output) or a text "
        "file with one gene per line (default: all genes)",
    )
    for name, default, text in MODEL_OPTIONS:
        group.add_argument(
            "--" + name.replace("_", "-"), type=int, default=default, metavar="N", help=f"{text} (default: {default})"
        )
    group.add_argument(
        "--mlm-probability", type=float, default=0.15, metavar="P",
        help="fraction of each cell's genes masked for the loss (default: 0.15)",
    )
    group.add_argument("--max-epochs", type=int, default=1, metavar="N", help="passes over the data (default: 1)")
    group.add_argument(
        "--max-steps", type=int, default=None, metavar="N",
        help="stop after this many optimizer steps, even within an epoch (default: no limit)",
    )
    group.add_argument(
        "--learning-rate", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default: 1e-3)"
    )


def _check_options(args: argparse.Namespace) -> None:
    for name in ("max_epochs", *(option[0] for option in MODEL_OPTIONS)):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: must be at least 1, got {args.max_steps}")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(
            f"--hidden-size ({args.hidden_size}) must be a multiple of --num-attention-heads ({args.num_attention_heads})"
        )
    if not 0 < args.mlm_probability < 1:
        raise ConfigError(f"--mlm-probability: must be between 0 and 1, got {args.mlm_probability}")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {args.learning_rate}")
    if not str(args.output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {args.output!r}")


def read_norm_factor(path: str, var_names_g: np.ndarray) -> np.ndarray:
    """Each gene's non-zero median from the tdigest table, in var_names_g order.

    A gene with no non-zero count in the table has no median: its factor is 1 (it cannot be
    ranked in the data the table summarises anyway).
    """
    if not os.path.isfile(path):
        raise InputError(f"--tdigest: {path}: no such file")
    try:
        table = pd.read_parquet(path) if path.lower().endswith(".parquet") else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise InputError(f"--tdigest: {path}: not a readable table ({e})") from None
    for column in ("gene", "median"):
        if column not in table.columns:
            raise InputError(f"--tdigest: {path}: no {column!r} column (columns: {list(table.columns)})")
    genes = table["gene"].astype(str)
    if genes.duplicated().any():
        raise InputError(f"--tdigest: {path}: genes are listed more than once, e.g. {genes[genes.duplicated()].iloc[0]!r}")
    median = pd.to_numeric(table["median"], errors="coerce").set_axis(genes)
    missing = [g for g in var_names_g if g not in median.index]
    if missing:
        raise InputError(f"--tdigest: {path}: {len(missing)} of the model's genes are not in the table, e.g. {missing[:5]}")
    factor_g = median.reindex(var_names_g).to_numpy(dtype=np.float64)
    if (factor_g <= 0).any() or np.isinf(factor_g).any():
        bad = np.asarray(var_names_g)[(factor_g <= 0) | np.isinf(factor_g)]
        raise InputError(f"--tdigest: {path}: medians must be positive, e.g. gene {bad[0]!r}")
    n_undefined = int(np.isnan(factor_g).sum())
    if n_undefined:
        logger.info("--tdigest: %d genes have no non-zero count in the table; their factor is 1", n_undefined)
    return np.where(np.isnan(factor_g), 1.0, factor_g)


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=True, seed=args.seed,
    )
    collection = datamodule.collection
    genes = selected_genes(args.genes, collection.var_names_g, collection.shards[0].path)
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g)
    factor_g = read_norm_factor(args.tdigest, var_names_g) if args.tdigest else None

    trainer, resume_from = resumable_trainer(args)
    datamodule.dataset.set_distributed(0, trainer.world_size)
    logger.info(
        "%d cells, %d genes; %d steps per epoch per device, up to %d genes per cell",
        collection.n_obs, len(var_names_g), len(datamodule.dataset), args.max_position_embeddings,
    )

    pl.seed_everything(args.seed, workers=True, verbose=False)
    run_provenance = provenance(NAME, args)
    recipe = {
        "model": spec(
            Geneformer, var_names_g=var_names_g, mlm_probability=args.mlm_probability,
            **{name: getattr(args, name) for name, _, _ in MODEL_OPTIONS},
        ),
        "transforms": [spec(Filter, filter_list=genes)] if genes is not None else [],
        # No per-cell "prediction": Geneformer's outputs are per token (hidden states, attentions).
        "data": {"input_var_names_g": collection.var_names_g, "norm_factor_source": args.tdigest},
        "provenance": run_provenance,
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": args.learning_rate}, seed=args.seed)
    if factor_g is not None:
        # A buffer, so the factor travels in the checkpoint's weights.
        module.model.set_norm_factor(factor_g)

    fit_and_publish(trainer, module, datamodule, resume_from, args.output, run_provenance)
