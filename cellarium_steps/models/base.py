"""Base classes of the cellarium ML model API."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cellarium_steps._batch import check_var_names

__all__ = ["CellariumModel", "PredictMixin", "TestMixin", "ValidateMixin", "check_var_names"]

if TYPE_CHECKING:
    import lightning.pytorch as pl


class CellariumModel(nn.Module, metaclass=ABCMeta):
    """Base class for Cellarium ML compatible models."""

    @abstractmethod
    def reset_parameters(self) -> None:
        """Reset the parameters and buffers constructed in ``__init__``."""


class PredictMixin:
    """Abstract mixin class for models that can perform prediction."""

    @abstractmethod
    def predict(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray | torch.Tensor]:
        """Perform prediction."""


class ValidateMixin:
    """Mixin class for models that can perform validation."""

    def validate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Log the validation loss. Override to customize validation."""
        loss = self(*args, **kwargs)["loss"]  # type: ignore[operator]
        pl_module.log("val_loss", loss, sync_dist=True, on_epoch=True)


class TestMixin:
    """Abstract mixin class for models that can perform testing."""

    @abstractmethod
    def test(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Perform testing."""
