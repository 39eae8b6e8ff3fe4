"""cellarium-steps train-scvi: train an scVI model on raw counts streamed from the shards."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cellarium_steps.atomic import atomic_path
from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import InputError
from cellarium_steps.export import write_json_atomically
from cellarium_steps.models.scvi import SingleCellVariationalInference, scvi_tools_default_architecture
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.steps.common import ConfigError, add_common_arguments, provenance
from cellarium_steps.transforms.filter import Filter

logger = logging.getLogger("cellarium_steps")

# Resuming writes into the checkpoint directory of the interrupted run on purpose.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

NAME = "train-scvi"
HELP = "train an scVI model (negative binomial VAE with batch correction) on raw counts, streamed"
CHECKPOINT_KEY = "cellarium_steps"
CHECKPOINT_FORMAT = "cellarium-steps train-scvi checkpoint v1"
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
  OUTPUT (.ckpt)            the final Lightning checkpoint: weights, optimizer state, and under the key
                            '{CHECKPOINT_KEY}' what predicting needs: the model's constructor arguments
                            (hyper_parameters, with var_names_g), the --genes list, the shards' genes,
                            --batch-key and its categories (batch index i is category i), provenance.
                            load_scvi_checkpoint() in cellarium_steps.steps.train_scvi rebuilds the model.
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


def read_gene_list(path: str) -> list[str]:
    """Genes from an HVG table (its highly variable rows) or from a text file, in the file's order."""
    if not os.path.isfile(path):
        raise InputError(f"--genes: {path}: no such file")
    if path.lower().endswith((".csv", ".csv.gz")):
        try:
            table = pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as e:
            raise InputError(f"--genes: {path}: not a readable CSV ({e})") from None
        if "gene" not in table.columns:
            raise InputError(f"--genes: {path}: no 'gene' column (columns: {list(table.columns)})")
        if "highly_variable" in table.columns:
            flags = table["highly_variable"]
            if flags.dtype != bool:
                flags = flags.astype(str).str.lower().isin(("true", "1"))
            table = table[flags.to_numpy()]
        genes = table["gene"].astype(str).tolist()
    else:
        with open(path) as f:
            genes = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not genes:
        raise InputError(f"--genes: {path}: no genes selected")
    return genes


def default_kl_warmup_steps(max_epochs: int, steps_per_epoch: int) -> int:
    return max(1, min(MAX_DEFAULT_KL_WARMUP_STEPS, (max_epochs * steps_per_epoch) // 4))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint under a temporary name and rename it, so a killed run never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class SCVITrainingModule(CellariumModule):
    """CellariumModule that stores what prediction needs inside every checkpoint it writes."""

    def __init__(self, model: SingleCellVariationalInference, transforms: Sequence[torch.nn.Module],
                 optim_kwargs: dict[str, Any], metadata: dict[str, Any]) -> None:
        super().__init__(model, transforms=transforms, optim_kwargs=optim_kwargs)
        self.checkpoint_metadata = metadata

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata


def _checkpoint_metadata(path: str, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    if checkpoint is None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    metadata = checkpoint.get(CHECKPOINT_KEY)
    if not metadata or metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path}: not a train-scvi checkpoint (no '{CHECKPOINT_KEY}' entry of format {CHECKPOINT_FORMAT!r})"
        )
    return metadata


def load_scvi_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[CellariumModule, dict[str, Any]]:
    """Rebuild the trained pipeline (gene filter + model, in eval mode) and return it with the checkpoint's metadata."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    metadata = _checkpoint_metadata(path, checkpoint)
    model = SingleCellVariationalInference(**metadata["hyper_parameters"])
    model_state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(model_state)
    transforms = [Filter(metadata["genes"])] if metadata["genes"] is not None else []
    module = CellariumModule(model, transforms=transforms)
    module.eval()
    return module, metadata


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
    genes = read_gene_list(args.genes) if args.genes else None
    if genes is not None:
        known = set(collection.var_names_g)
        missing = [g for g in genes if g not in known]
        if missing:
            raise InputError(
                f"--genes: {len(missing)} of {len(genes)} genes are not in {collection.shards[0].path}, "
                f"e.g. {missing[:5]}"
            )
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g)
    n_batch = collection.n_batch if args.batch_key else 1

    checkpoint_dir = args.output + ".d"
    checkpointing = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="epoch{epoch:04d}", auto_insert_metric_name=False,
        save_last=True, save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False,
    )
    trainer = build_trainer(
        devices=args.devices, accelerator=args.accelerator, max_epochs=args.max_epochs, trainable=True,
        callbacks=[checkpointing], enable_checkpointing=True, default_root_dir=checkpoint_dir,
        plugins=[AtomicCheckpointIO()],
    )
    datamodule.dataset.set_distributed(0, trainer.world_size)
    steps_per_epoch = len(datamodule.dataset)
    last_path = os.path.join(checkpoint_dir, "last.ckpt")
    resume_from = last_path if os.path.isfile(last_path) else None
    kl_warmup_steps = args.kl_warmup_steps
    if kl_warmup_steps is None and resume_from:
        # A resumed run keeps the interrupted run's schedule, even if --max-epochs changed.
        kl_warmup_steps = _checkpoint_metadata(resume_from)["hyper_parameters"]["kl_warmup_steps"]
    if kl_warmup_steps is None:
        kl_warmup_steps = default_kl_warmup_steps(args.max_epochs, steps_per_epoch)
    logger.info(
        "%d cells, %d genes, %d batches; %d steps per epoch per device, KL warm-up over %d steps",
        collection.n_obs, len(var_names_g), n_batch, steps_per_epoch, kl_warmup_steps,
    )

    pl.seed_everything(args.seed, workers=True, verbose=False)
    encoder, decoder = scvi_tools_default_architecture(args.n_hidden, args.n_layers)
    model = SingleCellVariationalInference(
        var_names_g=var_names_g, encoder=encoder, decoder=decoder, n_batch=n_batch, n_latent=args.n_latent,
        gene_likelihood="nb", dispersion="gene", kl_warmup_epochs=None, kl_warmup_steps=kl_warmup_steps,
    )
    run_provenance = provenance(NAME, args)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model_class": f"{SingleCellVariationalInference.__module__}.{SingleCellVariationalInference.__name__}",
        "hyper_parameters": model.hyper_parameters,
        "genes": None if genes is None else list(genes),
        "input_var_names_g": [str(g) for g in collection.var_names_g],
        "batch_key": args.batch_key,
        "batch_categories": [str(c) for c in collection.batch_categories],
        "provenance": run_provenance,
    }
    module = SCVITrainingModule(
        model, transforms=[Filter(genes)] if genes is not None else [], optim_kwargs={"lr": args.learning_rate},
        metadata=_plain(metadata),
    )

    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.global_rank == 0:
        if not os.path.isfile(last_path):
            raise RuntimeError(f"training ended without a checkpoint at {last_path}")
        with atomic_path(args.output) as tmp:
            shutil.copyfile(last_path, tmp)
        write_json_atomically(run_provenance, args.output + ".provenance.json")
        logger.info("wrote %s", args.output)


def _plain(value: Any) -> Any:
    """JSON-like values only, so the checkpoint loads with torch.load(weights_only=True)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)

