"""The one set-up of trained steps: a trainer that checkpoints every epoch and resumes, a per-epoch
metrics table, and the fit that publishes the checkpoint, the metrics and the provenance."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import pandas as pd

from cellarium_steps.atomic import write_csv_atomically, write_json_atomically
from cellarium_steps.runner.trainer import build_trainer, epoch_checkpointing, publish_last_checkpoint

logger = logging.getLogger("cellarium_steps")


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
        # With validation: every validation metric the model logged (loss terms, cell type metrics).
        validation = {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val_")}
        row.update(validation)
        if validation:
            logger.info("epoch %d: %s", trainer.current_epoch, ", ".join(f"{k} {v:.4g}" for k, v in validation.items()))
        table = pd.read_csv(self.path) if os.path.isfile(self.path) else pd.DataFrame()
        if "epoch" in table.columns:
            table = table[table["epoch"] < trainer.current_epoch]
        write_csv_atomically(pd.concat([table, pd.DataFrame([row])], ignore_index=True), self.path)


def metrics_path(output: str) -> str:
    """Where :class:`EpochMetricsCSV` grows the table during a run."""
    return os.path.join(output + ".d", "metrics.csv")


def publish_metrics(output: str) -> None:
    """Copy the per-epoch metrics beside the checkpoint (``OUTPUT.metrics.csv``), atomically."""
    source = metrics_path(output)
    table = pd.read_csv(source) if os.path.isfile(source) else pd.DataFrame(columns=["epoch", "step", "train_loss"])
    write_csv_atomically(table, output + ".metrics.csv")


def resumable_trainer(
    *, output: str, devices: int | str, accelerator: str, max_epochs: int, max_steps: int | None = None,
    metrics: bool = False, num_nodes: int = 1,
) -> tuple[pl.Trainer, str | None]:
    """A trainer for ``max_epochs`` / ``max_steps`` that checkpoints to ``<output>.d/last.ckpt`` (and, with
    ``metrics``, grows the per-epoch metrics table); and the checkpoint an interrupted run left there,
    to resume from (None for a fresh run)."""
    checkpointing, resume_from = epoch_checkpointing(output)
    # The metrics table is written before the epoch's checkpoint (Lightning runs ModelCheckpoint last).
    callbacks: Sequence[pl.Callback] = [EpochMetricsCSV(metrics_path(output)), checkpointing] if metrics else [checkpointing]
    trainer = build_trainer(
        devices=devices, accelerator=accelerator, num_nodes=num_nodes, max_epochs=max_epochs, trainable=True,
        callbacks=callbacks, default_root_dir=output + ".d", max_steps=max_steps if max_steps is not None else -1,
    )
    return trainer, resume_from


def fit_and_publish(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, resume_from: str | None, output: str,
    provenance: dict[str, Any],
) -> None:
    """Train (resuming when asked), then put the last checkpoint at ``output`` with its metrics table
    (when the trainer grew one) and provenance."""
    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.global_rank == 0:
        publish_last_checkpoint(output)
        if any(isinstance(c, EpochMetricsCSV) for c in trainer.callbacks):
            publish_metrics(output)
        write_json_atomically(provenance, output + ".provenance.json")
        logger.info("wrote %s", output)
