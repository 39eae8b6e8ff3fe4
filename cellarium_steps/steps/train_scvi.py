"""cellarium-steps train-scvi: train an scVI model on raw counts streamed from the shards."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cellarium_steps.atomic import write_csv_atomically
from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.dataset import ShardedCellDataset, collate_identity
from cellarium_steps.export import write_json_atomically
from cellarium_steps.models.scvi import SingleCellVariationalInference, scvi_tools_default_architecture
from cellarium_steps.ontology import compute_cl_distance_matrix, is_unlabelled, ontology_version
from cellarium_steps.runner import CellariumModule, build_trainer, epoch_checkpointing, publish_last_checkpoint
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint, spec
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance, selected_genes
from cellarium_steps.steps.train_socam import require_labels, scan_labels
from cellarium_steps.transforms._sparse import select_rows
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
                            i is category i), provenance. `cellarium-steps predict --checkpoint` and
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


class EpochMetricsCSV(pl.Callback):
    """Each finished epoch's logged losses as a row of ``path`` (rank 0), rewritten atomically.

    Rows of later epochs (from an interrupted run that is being resumed) are replaced, so the table
    always ends at the epoch the checkpoint holds.
    """

    COLUMNS = ("train_loss", "val_loss")

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key in self.COLUMNS:
            if key in metrics:
                row[key] = float(metrics[key])
        # With --val-fraction: every validation metric the model logged (loss terms, cell type metrics).
        validation = {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val_")}
        row.update(validation)
        if validation:
            logger.info("epoch %d: %s", trainer.current_epoch, ", ".join(f"{k} {v:.4g}" for k, v in validation.items()))
        table = pd.read_csv(self.path) if os.path.isfile(self.path) else pd.DataFrame()
        if "epoch" in table.columns:
            table = table[table["epoch"] < trainer.current_epoch]
        write_csv_atomically(pd.concat([table, pd.DataFrame([row])], ignore_index=True), self.path)


def publish_metrics(output: str) -> None:
    """Copy the per-epoch metrics beside the checkpoint (``OUTPUT.metrics.csv``), atomically."""
    source = os.path.join(output + ".d", "metrics.csv")
    table = pd.read_csv(source) if os.path.isfile(source) else pd.DataFrame(columns=["epoch", "step", "train_loss"])
    write_csv_atomically(table, output + ".metrics.csv")


def optimizer_kwargs(learning_rate: float) -> dict[str, Any]:
    """scvi-tools' training plan's Adam (eps 0.01, weight decay 1e-6), as one fused kernel per step."""
    return {"lr": learning_rate, "eps": 0.01, "weight_decay": 1e-6, "fused": True}


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
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
    if args.cell_type_key and args.val_fraction <= 0:
        raise ConfigError("--cell-type-key: the cell type metrics are computed on held-out cells; give --val-fraction")
    if args.val_reservoir_size < 1:
        raise ConfigError(f"--val-reservoir-size: must be at least 1, got {args.val_reservoir_size}")
    if not str(args.output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {args.output!r}")


# -- validation: held-out cells, their loader, the module that routes them, the metrics table ----------


class HeldOutCells:
    """Cells held out of training: those whose obs name hashes (SipHash, keyed by the seed) below ``fraction``.

    A function of the name and seed alone, so the split is the same in every epoch, after a resume, and
    on any number of devices or loader workers, and needs no pass over the data to set up.
    """

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction = float(fraction)
        self.hash_key = f"{seed % 10**16:016d}"

    def mask(self, obs_names_n: np.ndarray) -> np.ndarray:
        """True for held-out (validation) cells."""
        names = np.asarray(obs_names_n, dtype=object).astype(str).astype(object)
        hashes = pd.util.hash_array(names, hash_key=self.hash_key, categorize=False)
        return hashes.astype(np.float64) / 2.0**64 < self.fraction


def select_cells(batch: dict[str, Any], keep_n: np.ndarray) -> dict[str, Any]:
    """The batch restricted to the cells where ``keep_n`` is True, on the batch's device (CSR stays CSR)."""
    if keep_n.all():
        return batch
    x_ng = batch["x_ng"]
    index_n = torch.from_numpy(np.flatnonzero(keep_n)).to(x_ng.device)
    if x_ng.layout == torch.sparse_csr:
        x_ng = select_rows(x_ng, index_n)
    else:
        x_ng = x_ng[index_n]
    out = {**batch, "x_ng": x_ng}
    for key, value in batch.items():
        if key.endswith("_n"):
            out[key] = value[index_n.to(value.device)] if isinstance(value, torch.Tensor) else value[index_n.cpu().numpy()]
    return out


class ScviDataModule(ShardDataModule):
    """The training shards, plus a validation loader over the same shards (in order; the module keeps held-out cells)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_dataset = ShardedCellDataset(
            self.collection, batch_size=self.dataset.batch_size, shuffle=False, seed=self.dataset.seed,
            require_counts=self.dataset.require_counts, with_totals=self.dataset.with_totals,
        )

    def select_genes(self, genes: Sequence[str]) -> None:
        super().select_genes(genes)
        self.val_dataset.select_genes(genes)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.trainer is not None:
            self.val_dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=None, num_workers=self.num_workers,
                          collate_fn=collate_identity, prefetch_factor=2 if self.num_workers else None)


class ScviTrainingModule(CellariumModule):
    """CellariumModule that trains on the cells not held out and validates on the held-out ones.

    Validation batches get ``validation_cell_type_index_n`` (index into ``cell_type_categories``, -1 when
    unlabelled) from the ``<cell_type_key>_n`` column. Only training uses this class: the checkpoint's
    recipe rebuilds a plain CellariumModule.
    """

    def __init__(self, model: torch.nn.Module, transforms: Sequence[torch.nn.Module] = (), *,
                 held_out: HeldOutCells | None = None, cell_type_key: str | None = None,
                 cell_type_categories: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(model, transforms=transforms, **kwargs)
        self.held_out = held_out
        self.cell_type_key = cell_type_key
        self._code = {str(c): i for i, c in enumerate(cell_type_categories)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.held_out is not None:
            batch = select_cells(batch, ~self.held_out.mask(batch["obs_names_n"]))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.held_out is not None:
            batch = select_cells(batch, self.held_out.mask(batch["obs_names_n"]))
        if batch["x_ng"].shape[0] == 0:
            return
        if self.cell_type_key is not None:
            values_n = batch[f"{self.cell_type_key}_n"]
            codes = [-1 if is_unlabelled(v) else self._code.get(str(v), -1) for v in values_n]
            batch = {**batch, "validation_cell_type_index_n": torch.tensor(codes, dtype=torch.long)}
        super().validation_step(batch, batch_idx)


def run(args: argparse.Namespace) -> None:
    _check_options(args)
    validating = args.val_fraction > 0
    datamodule = (ScviDataModule if validating else ShardDataModule)(
        args.input, batch_size=args.batch_size, batch_key=args.batch_key, num_workers=args.num_workers,
        shuffle=True, seed=args.seed, obs_columns=(args.cell_type_key,) if args.cell_type_key else (),
        # The model's library size is the observed one (no use_size_factor_key), and only the
        # held-out split names cells: neither column is read otherwise.
        with_totals=False, with_obs_names=validating,
    )
    collection = datamodule.collection
    cell_types: list[str] = []
    if args.cell_type_key:
        summary = scan_labels(collection, args.cell_type_key)
        require_labels(summary, args.input)
        cell_types = summary.labels
    genes = selected_genes(args.genes, collection.var_names_g, collection.shards[0].path)
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g)
    if genes is not None:
        datamodule.select_genes(genes)
    n_batch = collection.n_batch if args.batch_key else 1

    checkpointing, resume_from = epoch_checkpointing(args.output)
    trainer = build_trainer(
        devices=args.devices, accelerator=args.accelerator, max_epochs=args.max_epochs, trainable=True,
        # The metrics table is written before the epoch's checkpoint (Lightning runs ModelCheckpoint last).
        callbacks=[EpochMetricsCSV(os.path.join(args.output + ".d", "metrics.csv")), checkpointing],
        default_root_dir=args.output + ".d",
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
            "validation": {"val_fraction": args.val_fraction, "cell_type_key": args.cell_type_key,
                           "cell_types": cell_types, "ontology": ontology_version() if cell_types else None},
        },
        "provenance": run_provenance,
    }
    module_kwargs: dict[str, Any] = {"optim_kwargs": optimizer_kwargs(args.learning_rate), "seed": args.seed}
    if not validating:
        module = CellariumModule.from_recipe(recipe, **module_kwargs)
    else:
        # The validation metrics' settings stay out of the recipe: prediction needs none of them.
        model_args = dict(recipe["model"]["init_args"])
        if cell_types:
            model_args.update(
                cell_type_categories=cell_types, ontology_distance_matrix=compute_cl_distance_matrix(cell_types),
                val_cell_type_classifier_reservoir_size=args.val_reservoir_size,
            )
        module = ScviTrainingModule(
            SingleCellVariationalInference(**model_args), [Filter(filter_list=genes)] if genes is not None else [],
            held_out=HeldOutCells(args.val_fraction, args.seed), cell_type_key=args.cell_type_key,
            cell_type_categories=cell_types, recipe=recipe, **module_kwargs,
        )

    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.global_rank == 0:
        publish_last_checkpoint(args.output)
        publish_metrics(args.output)
        write_json_atomically(run_provenance, args.output + ".provenance.json")
        logger.info("wrote %s", args.output)
