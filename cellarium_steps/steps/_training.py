"""What the transformer training steps share: a trainer that checkpoints every epoch and resumes,
and the fit that publishes the checkpoint and its provenance."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cellarium_steps.export import write_json_atomically
from cellarium_steps.runner import build_trainer, epoch_checkpointing, publish_last_checkpoint

logger = logging.getLogger("cellarium_steps")


def resumable_trainer(args: argparse.Namespace) -> tuple[Any, str | None]:
    """A trainer for ``--max-epochs`` / ``--max-steps`` that checkpoints to ``<output>.d/last.ckpt``;
    and the checkpoint an interrupted run left there, to resume from (None for a fresh run)."""
    checkpointing, resume_from = epoch_checkpointing(args.output)
    trainer = build_trainer(
        devices=args.devices, accelerator=args.accelerator, max_epochs=args.max_epochs, trainable=True,
        callbacks=[checkpointing], default_root_dir=args.output + ".d",
        max_steps=args.max_steps if args.max_steps is not None else -1,
    )
    return trainer, resume_from


def fit_and_publish(
    trainer: Any, module: Any, datamodule: Any, resume_from: str | None, output: str, run_provenance: dict
) -> None:
    """Train (resuming when asked), then put the last checkpoint at ``output`` with its provenance."""
    if resume_from:
        logger.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.global_rank == 0:
        publish_last_checkpoint(output)
        write_json_atomically(run_provenance, output + ".provenance.json")
        logger.info("wrote %s", output)
