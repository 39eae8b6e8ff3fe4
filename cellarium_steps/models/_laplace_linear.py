"""What LogisticRegression and SOCAM share: a gene x category weight matrix under a Laplace prior."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cellarium_steps.models.base import CellariumModel

if TYPE_CHECKING:
    import lightning.pytorch as pl


class LaplaceLinearClassifier(CellariumModel):
    """``logits = x_ng @ W_gc + b_c`` with ``W_gc ~ Laplace(0, W_prior_scale)``: the checks, parameters,
    initialisation and weight histogram of the API's two linear classifiers. Subclasses call
    :meth:`_init_laplace_linear` in their constructor, then their ``reset_parameters``, which calls
    :meth:`_reset_laplace_linear`."""

    def _init_laplace_linear(self, n_obs: int, var_names_g: np.ndarray, n_categories: int, W_prior_scale: float,
                             W_init_scale: float, seed: int, log_metrics: bool) -> None:
        if n_obs < 1:
            raise ValueError(f"n_obs must be at least 1, got {n_obs}")
        if not W_prior_scale > 0:
            raise ValueError(f"W_prior_scale must be positive, got {W_prior_scale}")
        self.n_obs = int(n_obs)
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        self.seed = seed
        self.W_init_scale = W_init_scale
        self._W_prior_scale = float(W_prior_scale)
        self.log_metrics = log_metrics
        self.W_prior_scale: torch.Tensor
        self.register_buffer("W_prior_scale", torch.empty(()))
        self.W_gc = torch.nn.Parameter(torch.empty(self.n_vars, n_categories))
        self.b_c = torch.nn.Parameter(torch.empty(n_categories))

    def _reset_laplace_linear(self) -> None:
        """N(0, W_init_scale) weights from ``seed`` (the same whatever the global RNG), zero biases."""
        rng = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.W_prior_scale.fill_(self._W_prior_scale)
            self.W_gc.copy_(torch.randn(*self.W_gc.shape, generator=rng) * self.W_init_scale)
            self.b_c.zero_()

    def on_train_epoch_end(self, trainer: pl.Trainer) -> None:
        if self.log_metrics:
            log_histogram(trainer, "W_gc", self.W_gc)


def log_histogram(trainer: pl.Trainer, name: str, values: torch.Tensor) -> None:
    """A histogram of ``values`` to every logger that can draw one (TensorBoard); silent otherwise."""
    if trainer is None or getattr(trainer, "global_rank", 0) != 0:
        return
    for logger in getattr(trainer, "loggers", None) or ():
        experiment = getattr(logger, "experiment", None)
        add_histogram = getattr(experiment, "add_histogram", None)
        if callable(add_histogram):
            add_histogram(name, values.detach().cpu(), global_step=trainer.global_step)
