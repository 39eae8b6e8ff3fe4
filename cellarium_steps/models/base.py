"""Base classes of the cellarium ML model API."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

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


def check_var_names(expected_g: np.ndarray, actual_g: np.ndarray) -> None:
    """Raise a ValueError unless two gene lists are the same, in the same order."""
    if len(expected_g) != len(actual_g) or not np.array_equal(np.asarray(expected_g), np.asarray(actual_g)):
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(expected_g, actual_g)) if a != b),
            min(len(expected_g), len(actual_g)),
        )
        raise ValueError(
            f"var_names_g of the input ({len(actual_g)} genes) differ from the model's "
            f"({len(expected_g)} genes), first at position {mismatch}"
        )
