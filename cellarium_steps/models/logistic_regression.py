"""Multinomial logistic regression with a Laplace (L1) prior on the weights, fit by MAP in Pyro."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from cellarium_steps.models._laplace_linear import LaplaceLinearClassifier
from cellarium_steps.models._tensors import global_count
from cellarium_steps.models.base import PredictMixin, ValidateMixin, check_var_names
from cellarium_steps.ontology import is_unlabelled

if TYPE_CHECKING:
    import lightning.pytorch as pl


class LogisticRegression(LaplaceLinearClassifier, PredictMixin, ValidateMixin):
    """Logistic regression model.

    Generative model (:meth:`model`, in Pyro): ``W_gc ~ Laplace(0, W_prior_scale)``,
    ``y_n ~ Categorical(logits=x_ng @ W_gc + b_c)`` in a plate of ``n_obs`` cells subsampled by the
    batch, with a flat prior on the bias ``b_c``. The guide (:meth:`guide`) is a point mass on
    ``W_gc`` (MAP, as an AutoDelta guide would be). The loss is ``Trace_ELBO``'s for that pair,
    computed directly as the negative log joint at the point estimate (the same number, without
    Pyro's tracing overhead per step); up to a constant it is

        (n_obs / m) * sum over the batch's m labelled cells of -log p(y | x) + sum |W_gc| / W_prior_scale

    which is scikit-learn's L1-penalised multinomial objective ``C * sum loss + ||W||_1`` divided
    by ``C``, with ``C = W_prior_scale`` when the likelihood is summed over ``n_obs`` cells
    (full batch) and the intercept is not penalised (``solver="saga"``).

    Args:
        n_obs: Number of labelled observations (the likelihood is scaled to them).
        var_names_g: The variable names schema for the input data validation.
        y_categories: The categories for the target data; column c of the logits is ``y_categories[c]``.
        W_prior_scale: The scale of the Laplace prior for the weights.
        W_init_scale: Initialization scale for the W_gc parameter.
        seed: Random seed used to initialize parameters.
        log_metrics: Whether to log the histogram of the W_gc parameter (each epoch end, to a
            logger that can draw histograms; silently skipped otherwise).
    """

    def __init__(
        self,
        n_obs: int,
        var_names_g: np.ndarray,
        y_categories: np.ndarray,
        W_prior_scale: float = 1.0,
        W_init_scale: float = 1.0,
        seed: int = 0,
        log_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.y_categories = np.asarray([str(c) for c in y_categories], dtype=object)
        if len(self.y_categories) < 2:
            raise ValueError(f"y_categories must have at least 2 categories, got {list(self.y_categories)}")
        if len(set(self.y_categories)) != len(self.y_categories):
            raise ValueError("y_categories has duplicates")
        self.n_categories = len(self.y_categories)
        self._category_index = {c: i for i, c in enumerate(self.y_categories)}
        self._init_laplace_linear(n_obs, var_names_g, self.n_categories, W_prior_scale, W_init_scale, seed, log_metrics)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_laplace_linear()

    # -- targets ----------------------------------------------------------------------------------

    def targets_to_indices(self, y_n: Any, y_categories: Sequence[Any] | None) -> torch.Tensor:
        """The model's category index of each cell; -1 for an unlabelled cell.

        ``y_n`` is either integer codes into ``y_categories`` (negative: unlabelled), or the
        category names themselves (``y_categories`` then unused; None, NaN and ``"unknown"`` are
        unlabelled). Categories of the batch map to the model's by name.

        Raises:
            ValueError: naming a category that the model does not have.
        """
        if isinstance(y_n, torch.Tensor) and not y_n.is_floating_point() or (
            isinstance(y_n, np.ndarray) and np.issubdtype(y_n.dtype, np.integer)
        ):
            codes_n = torch.as_tensor(y_n, dtype=torch.long).cpu()
            if y_categories is None:
                batch_to_model = torch.arange(self.n_categories)
            else:
                batch_categories = [str(c) for c in y_categories]
                if codes_n.numel() and int(codes_n.max()) >= len(batch_categories):
                    raise ValueError(f"y_n has code {int(codes_n.max())} but y_categories has {len(batch_categories)} entries")
                batch_to_model = torch.tensor([self._model_index(c) for c in batch_categories] + [-1], dtype=torch.long)
            labelled_n = codes_n >= 0
            out = torch.full_like(codes_n, -1)
            out[labelled_n] = batch_to_model[codes_n[labelled_n]]
            return out
        return torch.tensor([self._model_index(v) for v in np.asarray(y_n, dtype=object)], dtype=torch.long)

    def _model_index(self, value: Any) -> int:
        if is_unlabelled(value):
            return -1
        index = self._category_index.get(str(value))
        if index is None:
            raise ValueError(
                f"target category {value!r} is not one of the model's {self.n_categories} y_categories: "
                f"{list(self.y_categories[:20])}"
            )
        return index

    # -- Pyro model and guide -----------------------------------------------------------------------

    def model(self, x_mg: torch.Tensor, y_m: torch.Tensor) -> None:
        W_gc = pyro.sample(
            "W_gc",
            dist.Laplace(torch.zeros((), device=x_mg.device), self.W_prior_scale)
            .expand([self.n_vars, self.n_categories])
            .to_event(2),
        )
        m = y_m.shape[0]
        if m == 0:
            return
        # The plate scales the batch's likelihood by n_obs / m; the subsample is the batch itself.
        with pyro.plate("cells", size=max(self.n_obs, m), subsample=torch.arange(m, device=x_mg.device)):
            logits_mc = x_mg @ W_gc + self.b_c
            pyro.sample("y", dist.Categorical(logits=logits_mc), obs=y_m)

    def guide(self, x_mg: torch.Tensor, y_m: torch.Tensor) -> None:
        pyro.sample("W_gc", dist.Delta(self.W_gc).to_event(2))

    def _labelled(self, x_ng: torch.Tensor, var_names_g: np.ndarray, y_n: Any, y_categories: Any):
        check_var_names(self.var_names_g, var_names_g)
        if len(y_n) != x_ng.shape[0]:
            raise ValueError(f"y_n has {len(y_n)} entries for {x_ng.shape[0]} cells")
        target_n = self.targets_to_indices(y_n, y_categories).to(self.W_gc.device)
        x_ng = x_ng.to(self.W_gc.dtype)
        if x_ng.layout != torch.strided:
            x_ng = x_ng.to_dense()
        labelled_n = target_n >= 0
        if bool(labelled_n.all()):
            return x_ng, target_n
        return x_ng[labelled_n], target_n[labelled_n]

    def log_joint(self, x_mg: torch.Tensor, y_m: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
        """log p(W_gc) + (n_obs / m) log p(y | x, W_gc, b_c) at the point estimate: what ``model``
        scores under ``guide``, so ``-log_joint`` equals ``Trace_ELBO().differentiable_loss(model, guide)``
        (the Delta guide adds nothing), computed without tracing.

        With ``across_ranks`` (training under DDP) ``m`` counts the labelled cells of every rank's
        batch and the likelihood is scaled by ``world_size * n_obs / m``: DDP averages gradients, so
        the step is the one a single process takes on the union of the batches, however the
        labelled cells fall between ranks.
        """
        log_prior = dist.Laplace(torch.zeros((), device=x_mg.device), self.W_prior_scale).log_prob(self.W_gc).sum()
        m, world_size = global_count(y_m.shape[0], self.W_gc.device) if across_ranks else (y_m.shape[0], 1)
        if y_m.shape[0] == 0 or m == 0:
            # b_c stays in the graph, with a zero gradient: under DDP every rank must reduce every parameter
            return log_prior + 0.0 * self.b_c.sum()
        log_likelihood = dist.Categorical(logits=x_mg @ self.W_gc + self.b_c).log_prob(y_m).sum()
        return log_prior + log_likelihood * (world_size * max(self.n_obs, m) / m)

    def forward(
        self, x_ng: torch.Tensor, var_names_g: np.ndarray, y_n: torch.Tensor, y_categories: np.ndarray | None = None
    ) -> dict[str, torch.Tensor | None]:
        """
        Args:
            x_ng: The input data.
            var_names_g: The variable names for the input data.
            y_n: The target data: codes into ``y_categories`` (negative: unlabelled) or names.
            y_categories: The categories for the input target data (None: the model's own).

        Returns:
            A dictionary with the loss value: the negative log joint of the MAP estimate, with the
            likelihood scaled to ``n_obs`` cells.
        """
        x_mg, y_m = self._labelled(x_ng, var_names_g, y_n, y_categories)
        return {"loss": -self.log_joint(x_mg, y_m, across_ranks=self.training)}

    def validate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        y_n: torch.Tensor,
        y_categories: np.ndarray | None = None,
    ) -> None:
        """Log ``val_loss`` and ``val_accuracy`` (argmax of the logits) over the labelled cells."""
        x_mg, y_m = self._labelled(x_ng, var_names_g, y_n, y_categories)
        if y_m.shape[0] == 0:
            return
        loss = -self.log_joint(x_mg, y_m)
        accuracy = ((x_mg @ self.W_gc + self.b_c).argmax(-1) == y_m).float().mean()
        pl_module.log("val_loss", loss, sync_dist=True, on_epoch=True, batch_size=y_m.shape[0])
        pl_module.log("val_accuracy", accuracy, sync_dist=True, on_epoch=True, batch_size=y_m.shape[0])

    def predict(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Predict the target logits.

        Returns:
            ``y_logits_nc``, shape (n, len(y_categories)); column c is ``y_categories[c]``.
        """
        check_var_names(self.var_names_g, var_names_g)
        with torch.no_grad():
            logits_nc = x_ng.to(self.W_gc.dtype) @ self.W_gc + self.b_c
        return {"y_logits_nc": logits_nc}
