"""The Lightning runner: transforms + model in a LightningModule, and trainer set-up."""

from cellarium_steps.runner.module import CellariumModule, apply_transforms, call_with_batch
from cellarium_steps.runner.trainer import (
    AtomicCheckpointIO,
    ParameterFreeDDPStrategy,
    ProgressLog,
    build_trainer,
    epoch_checkpointing,
    publish_last_checkpoint,
)

__all__ = [
    "AtomicCheckpointIO",
    "CellariumModule",
    "ParameterFreeDDPStrategy",
    "ProgressLog",
    "apply_transforms",
    "build_trainer",
    "call_with_batch",
    "epoch_checkpointing",
    "publish_last_checkpoint",
]
