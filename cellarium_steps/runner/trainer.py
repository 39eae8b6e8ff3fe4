"""Trainer set-up shared by every step: devices, DDP strategy, progress reporting."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from cellarium_steps.atomic import atomic_path
from cellarium_steps.runner.devices import device_count, resolve_accelerator

logger = logging.getLogger("cellarium_steps")

# Resuming writes into the checkpoint directory of the interrupted run on purpose.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

# Expected for statistics steps and for our IterableDataset (whose __len__ is exact per rank).
for _message in (
    "You defined a `validation_step` but have no `val_dataloader`",
    "`LightningModule.configure_optimizers` returned `None`",
    "Your `IterableDataset` has `__len__` defined",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "The 'train_dataloader' does not have many workers",
    "The 'predict_dataloader' does not have many workers",
):
    warnings.filterwarnings("ignore", message=re.escape(_message))


class ParameterFreeDDPStrategy(DDPStrategy):
    """DDP process group without the DistributedDataParallel wrapper.

    Statistics models have no trainable parameters, which DistributedDataParallel refuses;
    they only need the process group, to all-reduce their buffers at epoch end.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:  # type: ignore[override]
        return model


class ProgressLog(pl.Callback):
    """One log line every ``every_s`` seconds: batches, cells and cells per second (rank 0)."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # every rank says where it runs: a launch that lost ranks shows in the log
            logger.info("%s: DDP rank %d of %d (node %d, local rank %d)", getattr(stage, "value", stage),
                        trainer.global_rank, trainer.world_size, trainer.node_rank, trainer.local_rank)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._cells = 0

    on_predict_epoch_start = on_train_epoch_start  # type: ignore[assignment]

    def _advance(self, trainer: pl.Trainer, batch: dict, batch_idx: int, total: Any) -> None:
        self._cells += batch["x_ng"].shape[0]
        now = time.monotonic()
        if trainer.global_rank == 0 and now - self._last >= self.every_s:
            self._last = now
            rate = self._cells * trainer.world_size / max(now - self._start, 1e-9)
            logger.info(
                "epoch %d: batch %d/%s, ~%d cells, %.0f cells/s",
                trainer.current_epoch, batch_idx + 1, total, self._cells * trainer.world_size, rate,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._advance(trainer, batch, batch_idx, trainer.num_training_batches)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance(trainer, batch, batch_idx, "?")


def build_trainer(
    *,
    devices: int | str = 1,
    accelerator: str = "auto",
    num_nodes: int = 1,
    max_epochs: int = 1,
    trainable: bool = False,
    callbacks: Sequence[pl.Callback] = (),
    default_root_dir: str | None = None,
    progress_every_s: float = 30.0,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer for one step; DDP (gloo on CPU, nccl on GPU) when more than one process: ``devices`` on
    each of ``num_nodes`` machines (there a launcher such as ``srun`` starts every process; Lightning
    reads the ranks from its environment)."""
    accelerator = resolve_accelerator(accelerator)
    n_devices = device_count(devices, accelerator)
    strategy: Any = "auto"
    if n_devices * num_nodes > 1:
        backend = "nccl" if accelerator in ("gpu", "cuda") else "gloo"
        strategy = (
            DDPStrategy(process_group_backend=backend, broadcast_buffers=False)
            if trainable
            else ParameterFreeDDPStrategy(process_group_backend=backend)
        )
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    if trainer_kwargs["enable_checkpointing"]:
        trainer_kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_epochs=max_epochs,
        callbacks=[*callbacks, ProgressLog(progress_every_s)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
        **trainer_kwargs,
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint under a temporary name and rename it, so a killed run never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def epoch_checkpointing(output: str) -> tuple[ModelCheckpoint, str | None]:
    """Checkpoint every epoch to ``<output>.d/last.ckpt``; return the callback and the checkpoint to resume from."""
    checkpoint_dir = output + ".d"
    callback = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="epoch{epoch:04d}", auto_insert_metric_name=False,
        save_last=True, save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False,
    )
    last = os.path.join(checkpoint_dir, "last.ckpt")
    return callback, (last if os.path.isfile(last) else None)


def publish_last_checkpoint(output: str) -> None:
    """Copy the last epoch's checkpoint to the step's output path, atomically."""
    last = os.path.join(output + ".d", "last.ckpt")
    if not os.path.isfile(last):
        raise RuntimeError(f"training ended without a checkpoint at {last}")
    with atomic_path(output) as tmp:
        shutil.copyfile(last, tmp)
