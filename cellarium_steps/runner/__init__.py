"""The Lightning runner: transforms + model in a LightningModule, and trainer set-up."""

from cellarium_steps.runner.module import CellariumModule, apply_transforms, call_with_batch
from cellarium_steps.runner.trainer import ParameterFreeDDPStrategy, ProgressLog, build_trainer

__all__ = [
    "CellariumModule",
    "ParameterFreeDDPStrategy",
    "ProgressLog",
    "apply_transforms",
    "build_trainer",
    "call_with_batch",
]
