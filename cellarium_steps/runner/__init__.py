"""The runners: Lightning (transforms + model in a LightningModule, trainer set-up) and a
Lightning-free single-process loop for parameter-free models (``fit_statistics``)."""

from cellarium_steps.runner._calls import apply_transforms, call_with_batch
from cellarium_steps.runner.local import fit_statistics

__all__ = [
    "AtomicCheckpointIO",
    "CellariumModule",
    "ParameterFreeDDPStrategy",
    "ProgressLog",
    "apply_transforms",
    "build_trainer",
    "call_with_batch",
    "epoch_checkpointing",
    "fit_statistics",
    "publish_last_checkpoint",
]

_LIGHTNING_NAMES = {
    "CellariumModule": "cellarium_steps.runner.module",
    "AtomicCheckpointIO": "cellarium_steps.runner.trainer",
    "ParameterFreeDDPStrategy": "cellarium_steps.runner.trainer",
    "ProgressLog": "cellarium_steps.runner.trainer",
    "build_trainer": "cellarium_steps.runner.trainer",
    "epoch_checkpointing": "cellarium_steps.runner.trainer",
    "publish_last_checkpoint": "cellarium_steps.runner.trainer",
}


def __getattr__(name: str):
    # Lightning costs seconds of start-up; import it only when a Lightning name is used.
    if name in _LIGHTNING_NAMES:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
