"""SOCAM: logistic regression over Cell Ontology terms with hierarchical probability propagation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cellarium_steps.models._laplace_linear import LaplaceLinearClassifier
from cellarium_steps.models._tensors import global_count
from cellarium_steps.models.base import PredictMixin, ValidateMixin, check_var_names
from cellarium_steps.ontology import is_unlabelled

if TYPE_CHECKING:
    import lightning.pytorch as pl


def expand_with_ancestors(cl_name_subset: Sequence[str], cl_names: Sequence[str], descendant_cc: torch.Tensor) -> list[str]:
    """``cl_name_subset`` plus every ancestor of its terms within ``cl_names``, sorted.

    ``descendant_cc[k, j] == 1`` says j is a descendant of k, so the ancestors of j are the ones of column j.
    """
    position = {name: i for i, name in enumerate(cl_names)}
    expanded: set[str] = set()
    for name in cl_name_subset:
        column = descendant_cc[:, position[name]]
        expanded.update(cl_names[k] for k in torch.nonzero(column > 0).flatten().tolist())
    return sorted(expanded)


def propagate_probs(probs_nc: torch.Tensor, descendant_cc: torch.Tensor) -> torch.Tensor:
    """p_prop[n, i] = sum of p[n, j] over the descendants j of i (itself included): ``p @ D^T``.

    With ``probs_nc`` a distribution over the terms each value is at most 1, and a term is never
    less likely than any of its descendants (its descendant set contains theirs).
    """
    return probs_nc @ descendant_cc.T.to(probs_nc.dtype)


def label_log_probs(logits_nc: torch.Tensor, y_n: torch.Tensor, descendant_cc: torch.Tensor | None) -> torch.Tensor:
    """log p of each cell's label: log p_prop[n, y_n] with ``descendant_cc``, log softmax[n, y_n] without.

    log p_prop[n, i] = logsumexp over the descendants j of i of logits[n, j] - logsumexp_j logits[n, j],
    in log space, so a confidently wrong cell keeps a finite loss and a gradient; memory O(n c).
    """
    log_z_n = torch.logsumexp(logits_nc, dim=-1)
    if descendant_cc is None:
        return logits_nc.gather(1, y_n[:, None]).squeeze(1) - log_z_n
    in_label_nc = descendant_cc[y_n] > 0  # [n, j]: j is the label or one of its descendants
    return torch.logsumexp(logits_nc.masked_fill(~in_label_nc, float("-inf")), dim=-1) - log_z_n


class SOCAM(LaplaceLinearClassifier, PredictMixin, ValidateMixin):
    """Logistic regression model for cell type ontology classification.

    A linear map ``logits_nc = x_ng @ W_gc + b_c`` over the *active* terms, a softmax over them,
    and, with ``probability_propagation_flag``, probability propagation along the ontology:
    ``p_prop = softmax(logits) @ D^T`` where ``D`` is the active terms' descendant matrix. The
    softmax is over mutually exclusive "this term and none of its listed descendants" events (as
    in cellarium-ml, not independent sigmoids), so a term's propagated probability is the
    probability that the cell is that term or any descendant of it, and an ancestor is never less
    likely than a descendant.

    Mixed-depth labels: a cell labelled with a parent term (CL:0000624 CD4 T) is a positive for
    that term, whichever of its descendants it is: the likelihood of label ``i`` is
    ``p_prop[i]`` (the raw probabilities of ``i`` and all its descendants, summed), so the loss
    ``-log p_prop[label]`` never pushes its descendants' raw probabilities down relative to each
    other or to the parent. Without propagation the loss is the flat cross-entropy ``-log p[label]``.

    Training objective (MAP): ``(n_obs / m) * sum_labelled -log p_prop[label] + sum |W_gc| / W_prior_scale``
    where ``m`` is the number of labelled cells in the batch (under DDP, in the global batch: see
    ``_loss``) and ``n_obs`` the number of labelled cells in the dataset (the Laplace(0, W_prior_scale) prior's negative log density, less a
    constant). Cells with no label (None, NaN, ``"unknown"``, see
    :data:`cellarium_steps.ontology.UNLABELLED_VALUES`) are masked out of the likelihood.

    Args:
        n_obs: Number of labelled observations in the dataset (scales the cross-entropy).
        var_names_g: The variable-name schema for the input data; used for validation.
        descendant_tensor: Binary (c, c) tensor; row i marks the descendants of ``cl_names[i]``
            (itself included). Also accepted: a nested list or numpy array.
        cl_names: The category identifiers of the rows/columns of ``descendant_tensor``.
        cl_name_subset: Categories (from ``cl_names``) to train and predict on; sorted internally.
            ``None``: all of ``cl_names``, in their order.
        probability_propagation_flag: Propagate probabilities up the hierarchy (see above).
        W_prior_scale: Scale ``b`` of the Laplace prior on ``W_gc``.
        W_init_scale: Standard deviation of the normal initialisation of ``W_gc``.
        seed: Random seed for the initialisation.
        log_metrics: Log a histogram of ``W_gc`` to the trainer's logger at each epoch end
            (skipped silently when there is no logger or it cannot draw histograms).
        include_ancestors_of_cl_name_subset: Add to ``cl_name_subset`` every ancestor (within
            ``cl_names``) of its terms.
    """

    def __init__(
        self,
        n_obs: int,
        var_names_g: np.ndarray,
        descendant_tensor: torch.Tensor,
        cl_names: list[str],
        cl_name_subset: list[str] | None = None,
        probability_propagation_flag: bool = True,
        W_prior_scale: float = 0.01,
        W_init_scale: float = 1.0,
        seed: int = 0,
        log_metrics: bool = True,
        include_ancestors_of_cl_name_subset: bool = True,
    ) -> None:
        super().__init__()
        self.cl_names = [str(c) for c in cl_names]
        descendant_cc = torch.as_tensor(np.asarray(descendant_tensor, dtype=np.float32))
        c = len(self.cl_names)
        if descendant_cc.ndim != 2 or descendant_cc.shape[0] != descendant_cc.shape[1]:
            raise ValueError(f"descendant_tensor must be a square matrix, got shape {tuple(descendant_cc.shape)}")
        if descendant_cc.shape[0] != c:
            raise ValueError(f"descendant_tensor has {descendant_cc.shape[0]} rows but cl_names has {c} names")
        if not torch.all(torch.diagonal(descendant_cc) == 1):
            raise ValueError("descendant_tensor must have ones on its diagonal (each term is its own descendant)")
        if len(set(self.cl_names)) != c:
            raise ValueError("cl_names has duplicates")

        if cl_name_subset is not None:
            subset = [str(name) for name in cl_name_subset]
            if not subset:
                raise ValueError("cl_name_subset is empty: give at least one category, or None for all of cl_names")
            unknown = sorted(set(subset) - set(self.cl_names))
            if unknown:
                raise ValueError(f"cl_name_subset has names that are not in cl_names: {unknown[:10]}")
            if include_ancestors_of_cl_name_subset:
                subset = expand_with_ancestors(subset, self.cl_names, descendant_cc)
            cl_name_subset = sorted(set(subset))
        self.cl_name_subset = cl_name_subset
        self.include_ancestors_of_cl_name_subset = include_ancestors_of_cl_name_subset
        self.probability_propagation_flag = probability_propagation_flag

        self.active_cl_names: list[str] = list(cl_name_subset) if cl_name_subset is not None else list(self.cl_names)
        self.n_active_cats = len(self.active_cl_names)
        self.label_lookup = {name: i for i, name in enumerate(self.active_cl_names)}
        position = {name: i for i, name in enumerate(self.cl_names)}
        index = torch.tensor([position[name] for name in self.active_cl_names], dtype=torch.long)
        self._descendant_cc = descendant_cc
        self._active_descendant_cc = descendant_cc[index][:, index].contiguous()

        self.descendant_tensor: torch.Tensor
        self.active_descendant_tensor_cc: torch.Tensor
        self.register_buffer("descendant_tensor", torch.empty(c, c))
        self.register_buffer("active_descendant_tensor_cc", torch.empty(self.n_active_cats, self.n_active_cats))
        self._init_laplace_linear(n_obs, var_names_g, self.n_active_cats, W_prior_scale, W_init_scale, seed, log_metrics)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.descendant_tensor.copy_(self._descendant_cc)
            self.active_descendant_tensor_cc.copy_(self._active_descendant_cc)
        self._reset_laplace_linear()

    # -- labels -----------------------------------------------------------------------------------

    def labels_to_indices(self, cl_names_n: Sequence[Any]) -> torch.Tensor:
        """Index of each label among the active terms; -1 for an unlabelled cell.

        Raises:
            ValueError: naming a label that is not an active term.
        """
        codes = np.empty(len(cl_names_n), dtype=np.int64)
        for k, name in enumerate(cl_names_n):
            if is_unlabelled(name):
                codes[k] = -1
                continue
            code = self.label_lookup.get(str(name))
            if code is None:
                raise ValueError(
                    f"label {name!r} is not one of the model's {self.n_active_cats} categories "
                    f"(cl_name_subset): {self.active_cl_names[:20]}"
                )
            codes[k] = code
        return torch.from_numpy(codes)

    # -- model ------------------------------------------------------------------------------------

    def logits(self, x_ng: torch.Tensor) -> torch.Tensor:
        """x_ng @ W_gc + b_c; a sparse CSR batch is multiplied without densifying."""
        return x_ng.to(self.W_gc.dtype) @ self.W_gc + self.b_c

    def _labelled(self, x_ng: torch.Tensor, var_names_g: np.ndarray, cl_names_n: Sequence[Any]):
        """Logits and active-term indices of the labelled cells of the batch."""
        check_var_names(self.var_names_g, var_names_g)
        if len(cl_names_n) != x_ng.shape[0]:
            raise ValueError(f"cl_names_n has {len(cl_names_n)} labels for {x_ng.shape[0]} cells")
        y_n = self.labels_to_indices(cl_names_n).to(self.W_gc.device)
        labelled_n = y_n >= 0
        return self.logits(x_ng)[labelled_n], y_n[labelled_n]

    def _loss(self, logits_mc: torch.Tensor, y_m: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
        """The batch's NLL scaled to ``n_obs`` labelled cells, plus the prior.

        With ``across_ranks`` (training under DDP), ``m`` is the labelled cells of the *global* batch
        (all ranks' counts summed) and each rank's NLL is scaled by ``world_size * n_obs / m``: DDP
        averages the ranks' gradients, so the step is exactly the one a single process takes on the
        union of the ranks' batches, however the labelled cells fall between ranks.
        """
        prior = self.W_gc.abs().sum() / self.W_prior_scale
        m, world_size = global_count(y_m.shape[0], self.W_gc.device) if across_ranks else (y_m.shape[0], 1)
        if y_m.shape[0] == 0 or m == 0:
            # b_c stays in the graph, with a zero gradient: under DDP every rank must reduce every parameter
            return prior + 0.0 * self.b_c.sum()
        descendant_cc = self.active_descendant_tensor_cc if self.probability_propagation_flag else None
        nll = -label_log_probs(logits_mc, y_m, descendant_cc).sum()
        return nll * (world_size * self.n_obs / m) + prior

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray, cl_names_n: np.ndarray) -> dict[str, torch.Tensor | None]:
        """Negative log posterior (up to a constant) of the batch, scaled to ``n_obs`` labelled cells.

        Args:
            x_ng: The input data (dense or sparse CSR).
            var_names_g: The variable names for the input data.
            cl_names_n: Each cell's CL id; unlabelled values are masked out, any other value
                must be an active category.
        """
        return {"loss": self._loss(*self._labelled(x_ng, var_names_g, cl_names_n), across_ranks=self.training)}

    def validate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        cl_names_n: np.ndarray,
    ) -> None:
        """Log ``val_loss`` (the forward's loss) and ``val_accuracy`` over the labelled cells.

        A prediction (the term of highest raw probability, the most specific guess) counts as
        correct when it is the label or one of the label's descendants: a cell labelled CD4 T
        and predicted naive CD4 T is right.
        """
        logits_mc, y_m = self._labelled(x_ng, var_names_g, cl_names_n)
        m = y_m.shape[0]
        if m == 0:
            return
        loss = self._loss(logits_mc, y_m)
        correct_m = self.active_descendant_tensor_cc[y_m, logits_mc.argmax(-1)] > 0
        pl_module.log("val_loss", loss, sync_dist=True, on_epoch=True, batch_size=m)
        pl_module.log("val_accuracy", correct_m.float().mean(), sync_dist=True, on_epoch=True, batch_size=m)

    def predict(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Logits and (propagated) probabilities, each of shape (n, n_active_cats).

        Returns:
            ``y_logits_nc``: the raw logits; ``cell_type_probs_nc``: ``softmax(logits) @ D^T`` with
            propagation, the softmax without. Column k is ``active_cl_names[k]``.
        """
        check_var_names(self.var_names_g, var_names_g)
        with torch.no_grad():
            logits_nc = self.logits(x_ng)
            probs_nc = torch.softmax(logits_nc, dim=-1)
            if self.probability_propagation_flag:
                probs_nc = propagate_probs(probs_nc, self.active_descendant_tensor_cc).clamp(max=1.0)
        return {"y_logits_nc": logits_nc, "cell_type_probs_nc": probs_nc}
