"""The LightningModule that runs transforms and then a model, trained or not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from cellarium_steps.models.base import CellariumModel, PredictMixin, ValidateMixin
from cellarium_steps.runner._calls import BatchDict, apply_transforms, call_with_batch
from cellarium_steps.runner.recipe import RECIPE_KEY, instantiate, load_checkpoint, plain


def training_step_seed(seed: int, global_step: int, rank: int) -> int:
    """The seed of torch's generator for one training step of one rank (see ``on_train_batch_start``)."""
    return (seed * 1_000_003 + global_step) * 1009 + rank


class CellariumModule(pl.LightningModule):
    """Transforms then a model; with an optimizer when the model has trainable parameters.

    Models without parameters (statistics) run with no optimizer: their ``forward`` accumulates
    buffers and their ``on_train_epoch_end`` reduces them across ranks. The model's own hooks
    (``on_train_start``, ``on_train_epoch_start``, ``on_train_batch_start``, ``on_train_epoch_end``,
    ``on_train_end``, ``on_validation_epoch_start``, ``on_validation_epoch_end``) receive the trainer;
    a model logs from them through ``trainer.lightning_module.log``.
    """

    def __init__(
        self,
        model: CellariumModel,
        transforms: Sequence[nn.Module] = (),
        optim_fn: type[torch.optim.Optimizer] = torch.optim.Adam,
        optim_kwargs: dict[str, Any] | None = None,
        scheduler_fn: Callable | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.seed = seed
        self.transforms = nn.ModuleList(transforms)
        self.optim_fn = optim_fn
        self.optim_kwargs = optim_kwargs or {"lr": 1e-3}
        self.scheduler_fn = scheduler_fn
        self.scheduler_kwargs = scheduler_kwargs or {}
        self.automatic_optimization = self.has_trainable_parameters

    @property
    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def _prepare(self, batch: BatchDict) -> BatchDict:
        return apply_transforms(self.transforms, batch)

    def forward(self, batch: BatchDict) -> dict[str, Any]:
        return call_with_batch(self.model.forward, self._prepare(batch))

    def training_step(self, batch: BatchDict, batch_idx: int) -> torch.Tensor | None:
        output = self(batch)
        loss = output.get("loss")
        if loss is not None:
            n_cells = batch["x_ng"].shape[0]
            # The epoch's mean only: per-step values would go to no logger, and under DDP each would
            # cost an all-reduce per step; the epoch's is reduced once, at its end.
            self.log("train_loss", loss, batch_size=n_cells, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: BatchDict, batch_idx: int) -> None:
        if isinstance(self.model, ValidateMixin):
            call_with_batch(self.model.validate, self._prepare(batch), trainer=self.trainer, pl_module=self,
                            batch_idx=batch_idx)

    def predict_step(self, batch: BatchDict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if not isinstance(self.model, PredictMixin):
            raise TypeError(f"{type(self.model).__name__} does not predict")
        prepared = self._prepare(batch)
        output = call_with_batch(self.model.predict, prepared)
        return {**{k: v for k, v in batch.items() if k.startswith("obs_") or k.endswith("_n")}, **output}

    def configure_optimizers(self) -> Any:
        if not self.has_trainable_parameters:
            return None
        optimizer = self.optim_fn(self.model.parameters(), **self.optim_kwargs)
        if self.scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_fn(optimizer, **self.scheduler_kwargs)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.recipe is not None:
            checkpoint[RECIPE_KEY] = plain(self.recipe)

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **module_kwargs: Any) -> CellariumModule:
        """Build transforms and model from a recipe (see :mod:`cellarium_steps.runner.recipe`)."""
        transforms = [instantiate(t) for t in recipe.get("transforms", [])]
        return cls(instantiate(recipe["model"]), transforms=transforms, recipe=recipe, **module_kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> CellariumModule:
        """Rebuild the pipeline a checkpoint was trained with and load its weights."""
        checkpoint = load_checkpoint(path, map_location)
        module = cls.from_recipe(checkpoint[RECIPE_KEY])
        module.load_state_dict(checkpoint["state_dict"])
        module.eval()
        return module

    def _model_hook(self, name: str) -> None:
        hook = getattr(self.model, name, None)
        if callable(hook):
            hook(self.trainer)

    def on_train_start(self) -> None:
        self._model_hook("on_train_start")

    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        self._model_hook("on_train_epoch_start")

    def on_train_batch_start(self, batch: BatchDict, batch_idx: int) -> None:
        if self.seed is not None:
            # Each step's random draws (dropout, sampling) depend on seed, step and rank only, so a run
            # resumed from a checkpoint continues exactly as the uninterrupted run would have.
            step_seed = training_step_seed(self.seed, self.global_step, self.global_rank)
            # What torch.manual_seed does for the generators in use: on CPU it would also queue a lazy
            # seeding of every uninitialised accelerator backend, formatting a stack trace each time
            # (~5 ms per step on CPU).
            torch.random.default_generator.manual_seed(step_seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(step_seed)
        self._model_hook("on_train_batch_start")

    def on_train_epoch_end(self) -> None:
        self._model_hook("on_train_epoch_end")

    def on_train_end(self) -> None:
        self._model_hook("on_train_end")

    def on_validation_epoch_start(self) -> None:
        self._model_hook("on_validation_epoch_start")

    def on_validation_epoch_end(self) -> None:
        self._model_hook("on_validation_epoch_end")
