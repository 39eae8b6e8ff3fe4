"""cellarium-steps train-scvi: train an scVI model on raw counts streamed from the shards."""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl
import numpy as np

from cellarium_steps.data import ShardDataModule
from cellarium_steps.export import write_json_atomically
from cellarium_steps.models.scvi import SingleCellVariationalInference, scvi_tools_default_architecture
from cellarium_steps.runner import CellariumModule, build_trainer, epoch_checkpointing, publish_last_checkpoint
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint, spec
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance, selected_genes
from cellarium_steps.transforms.filter import Filter

logger = logging.getLogger("cellarium_steps")

NAME = "train-scvi"
HELP = "train an scVI model (negative binomial VAE with batch correction) on raw counts, streamed"
#: the default KL warm-up: a quarter of the run's steps, at most this many.
MAX_DEFAULT_KL_WARMUP_STEPS = 5000
EPILOG = f"""model:
  scvi-tools' default scVI (scvi.model.SCVI with gene_likelihood="nb", dispersion="gene"): the encoder
  reads log1p counts, each decoder hidden layer also reads the one-hot batch (--batch-key), batch norm
  in both, dropout 0.1 in the encoder, observed library size. Counts stay raw: the model takes log1p
  itself. Non-integer values in X are an error.

KL warm-up:
  the KL weight rises linearly from 0 to 1 over --kl-warmup-steps optimizer steps. The default is a
  quarter of the run's steps (--max-epochs x batches per epoch per device), at most
  {MAX_DEFAULT_KL_WARMUP_STEPS}, so the weight reaches 1 within the run on a small dataset and within a few
  thousand steps on millions of cells (scvi-tools' 400-epoch default never ends on large data).

outputs:
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights, optimizer state, and the recipe
                            that rebuilds the pipeline (the --genes filter and the model's constructor
                            arguments), the shards' genes, --batch-key and its categories (batch index
                            i is category i), provenance. `cellarium-steps predict --checkpoint` and
                            CellariumModule.from_checkpoint() use it.
  OUTPUT.d/last.ckpt        checkpoint of the last finished epoch, written atomically every epoch; a run
                            started again with the same options resumes from it
  OUTPUT + .provenance.json the run's config and versions

example:
  cellarium-steps hvg --input 'shards/*.h5ad' --batch-key batch --n-top-genes 2000 --output out/hvg.csv
  cellarium-steps train-scvi --input 'shards/*.h5ad' --batch-key batch --genes out/hvg.csv \\
      --output out/scvi.ckpt"""


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
    group.add_argument("--n-latent", type=int, default=10, metavar="K", help="latent dimensions (default: 10)")
    group.add_argument("--n-hidden", type=int, default=128, metavar="N", help="units per hidden layer (default: 128)")
    group.add_argument(
        "--n-layers", type=int, default=1, metavar="N", help="hidden layers in encoder and decoder (default: 1)"
    )
    group.add_argument(
        "--learning-rate", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default: 1e-3)"
    )
    group.add_argument(
        "--kl-warmup-steps", type=int, default=None, metavar="N",
        help=f"optimizer steps over which the KL weight rises to 1 (default: a quarter of the run, at most "
        f"{MAX_DEFAULT_KL_WARMUP_STEPS})",
    )


def default_kl_warmup_steps(max_epochs: int, steps_per_epoch: int) -> int:
    return max(1, min(MAX_DEFAULT_KL_WARMUP_STEPS, (max_epochs * steps_per_epoch) // 4))


def _check_options(args: argparse.Namespace) -> None:
    for name in ("max_epochs", "n_latent", "n_hidden", "n_layers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {args.learning_rate}")
    if args.kl_warmup_steps is not None and args.kl_warmup_steps < 0:
        raise ConfigError(f"--kl-warmup-steps: must be 0 or more, got {args.kl_warmup_steps}")
    if not str(args.output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {args.output!r}")


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, batch_key=args.batch_key, num_workers=args.num_workers,
        shuffle=True, seed=args.seed,
    )
    collection = datamodule.collection
    genes = selected_genes(args.genes, collection.var_names_g, collection.shards[0].path)
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g)
    n_batch = collection.n_batch if args.batch_key else 1

    checkpointing, resume_from = epoch_checkpointing(args.output)
    trainer = build_trainer(
        devices=args.devices, accelerator=args.accelerator, max_epochs=args.max_epochs, trainable=True,
        callbacks=[checkpointing], default_root_dir=args.output + ".d",
    )
    datamodule.dataset.set_distributed(0, trainer.world_size)
    steps_per_epoch = len(datamodule.dataset)
    kl_warmup_steps = args.kl_warmup_steps
    if kl_warmup_steps is None and resume_from:
        # A resumed run keeps the interrupted run's schedule, even if --max-epochs changed.
        kl_warmup_steps = load_checkpoint(resume_from)[RECIPE_KEY]["model"]["init_args"]["kl_warmup_steps"]
    if kl_warmup_steps is None:
        kl_warmup_steps = default_kl_warmup_steps(args.max_epochs, steps_per_epoch)
    logger.info(
        "%d cells, %d genes, %d batches; %d steps per epoch per device, KL warm-up over %d steps",
        collection.n_obs, len(var_names_g), n_batch, steps_per_epoch, kl_warmup_steps,
    )

    pl.seed_everything(args.seed, workers=True, verbose=False)
    encoder, decoder = scvi_tools_default_architecture(args.n_hidden, args.n_layers)
    run_provenance = provenance(NAME, args)
    recipe = {
        "model": spec(
            SingleCellVariationalInference, var_names_g=var_names_g, encoder=encoder, decoder=decoder,
            n_batch=n_batch, n_latent=args.n_latent, gene_likelihood="nb", dispersion="gene",
            kl_warmup_epochs=None, kl_warmup_steps=kl_warmup_steps,
        ),
        "transforms": [spec(Filter, filter_list=genes)] if genes is not None else [],
        "data": {
            "input_var_names_g": collection.var_names_g,
            "batch_key": args.batch_key,
            "batch_categories": collection.batch_categories,
            "prediction": {"key": "x_ng", "column": "scvi_latent", "dim": args.n_latent},
        },
        "provenance": run_provenance,
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": args.learning_rate}, seed=args.seed)

    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.global_rank == 0:
        publish_last_checkpoint(args.output)
        write_json_atomically(run_provenance, args.output + ".provenance.json")
        logger.info("wrote %s", args.output)
