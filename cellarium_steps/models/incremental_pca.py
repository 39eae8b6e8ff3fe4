"""Distributed and incremental PCA: one pass, memory independent of the number of cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from cellarium_steps.models._tensors import densify
from cellarium_steps.models.base import CellariumModel, PredictMixin, check_var_names

if TYPE_CHECKING:
    import lightning.pytorch as pl


def orient_components(components_kg: torch.Tensor) -> torch.Tensor:
    """Flip each component so that its entry of largest magnitude is positive.

    Eigen- and singular vectors are defined up to sign; fixing the sign makes outputs of
    different runs, methods and world sizes comparable entry by entry.
    """
    if components_kg.shape[0] == 0:
        return components_kg
    index_k = components_kg.abs().argmax(dim=1, keepdim=True)
    sign_k = torch.sign(components_kg.gather(1, index_k))
    sign_k[sign_k == 0] = 1
    return components_kg * sign_k


def component_names(n_components: int) -> np.ndarray:
    return np.array([f"PC{i + 1}" for i in range(n_components)], dtype=object)


def project(x_ng: torch.Tensor, mean_g: torch.Tensor, components_kg: torch.Tensor) -> torch.Tensor:
    """(x_ng - mean_g) @ components_kg.T in float64, returned in x's float dtype (float32 for counts).

    ``x @ V.T - mean @ V.T`` equals the centred product but never materialises the centred
    batch, and a sparse CSR batch is multiplied as it is (several times faster than densifying).
    """
    x64_ng = x_ng.to(torch.float64) if x_ng.layout == torch.sparse_csr else densify(x_ng).to(torch.float64)
    z_nk = x64_ng @ components_kg.T - mean_g @ components_kg.T
    out_dtype = x_ng.dtype if x_ng.dtype.is_floating_point else torch.float32
    return z_nk.to(out_dtype)


class IncrementalPCA(CellariumModel, PredictMixin):
    """Distributed and incremental PCA.

    Each batch updates a rank-k partial SVD (Ross et al.): the current ``S_k * V_kg`` rows,
    the batch centred on its own mean, and one mean-correction row are stacked and their
    leading k right singular vectors kept. Stacking everything into one low-rank SVD (rather
    than first truncating the batch to k, then merging) loses less of each batch's spectrum.
    At the end of the epoch the ranks' partial SVDs are merged pairwise up a binary tree
    (Iwen et al.) and the result broadcast, so every rank can predict.

    All state is float64: it is k x g, so precision costs little, and the randomized SVD of
    float32 data would otherwise round the smaller components. ``torch.svd_lowrank`` is seeded
    per update, so a run is reproducible whatever the global RNG state.

    Besides the SVD the model keeps the total sum of squared deviations from the mean
    (merged with Chan's formula), so the fraction of variance each component explains is
    known without a second pass.

    References:
        1. A Distributed and Incremental SVD Algorithm for Agglomerative Data Analysis on
           Large Networks (Iwen et al.).
        2. Incremental Learning for Robust Visual Tracking (Ross et al.).

    Args:
        var_names_g: The variable names schema for the input data validation.
        n_components: Number of principal components.
        svd_lowrank_niter: Number of power iterations of the low-rank SVD algorithm.
        perform_mean_correction: If True the data are centred (batch means plus the
            mean-correction row of each merge). If False the data are assumed to be centred
            already and are used as they come.
        oversample: Extra dimensions of the randomized range finder beyond ``n_components``;
            they are discarded after each update but make the kept k more accurate.
    """

    def __init__(
        self,
        var_names_g: Sequence[str] | np.ndarray,
        n_components: int,
        svd_lowrank_niter: int = 2,
        perform_mean_correction: bool = True,
        oversample: int = 10,
    ) -> None:
        super().__init__()
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        if not 1 <= n_components <= self.n_vars:
            raise ValueError(
                f"n_components must be between 1 and the number of genes ({self.n_vars}), got {n_components}"
            )
        if svd_lowrank_niter < 0 or oversample < 0:
            raise ValueError("svd_lowrank_niter and oversample must be non-negative")
        self.n_components = n_components
        self.svd_lowrank_niter = svd_lowrank_niter
        self.perform_mean_correction = perform_mean_correction
        self.oversample = oversample
        k, g = n_components, self.n_vars
        self.V_kg: torch.Tensor
        self.S_k: torch.Tensor
        self.x_mean_g: torch.Tensor
        self.x_size: torch.Tensor
        self.x_m2: torch.Tensor
        self.register_buffer("V_kg", torch.zeros(k, g, dtype=torch.float64))
        self.register_buffer("S_k", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("x_mean_g", torch.zeros(g, dtype=torch.float64))
        self.register_buffer("x_size", torch.zeros((), dtype=torch.float64))
        self.register_buffer("x_m2", torch.zeros((), dtype=torch.float64))
        self._n_updates = 0
        self._merged = False

    def reset_parameters(self) -> None:
        for buffer in (self.V_kg, self.S_k, self.x_mean_g, self.x_size, self.x_m2):
            buffer.zero_()
        self._n_updates = 0
        self._merged = False

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | None]:
        """Incrementally update the partial SVD with a batch of cells; returns an empty dict."""
        check_var_names(self.var_names_g, var_names_g)
        n = x_ng.shape[0]
        if n == 0:
            return {}
        k = self.n_components
        # One float64 buffer holds the current rows, the batch and the mean-correction row,
        # so the (possibly large) batch is copied once.
        joined_mg = torch.zeros(k + n + 1, self.n_vars, dtype=torch.float64, device=self.V_kg.device)
        joined_mg[:k] = self.S_k[:, None] * self.V_kg
        batch_ng = joined_mg[k : k + n]
        batch_ng.copy_(densify(x_ng))
        if self.perform_mean_correction:
            batch_mean_g = batch_ng.mean(dim=0)
            batch_ng.sub_(batch_mean_g)
        else:
            batch_mean_g = torch.zeros_like(self.x_mean_g)
        batch_m2 = torch.linalg.vector_norm(batch_ng).square()
        self._update(joined_mg, batch_mean_g, float(n), batch_m2)
        return {}

    def _update(
        self, joined_mg: torch.Tensor, other_mean_g: torch.Tensor, other_size: float, other_m2: torch.Tensor
    ) -> None:
        """Merge another partial result whose rows are already in ``joined_mg[k:-1]``.

        ``joined_mg[:k]`` must hold this model's ``S_k * V_kg`` and its last row is the
        mean-correction row, filled here: sqrt(n_a n_b / n) (mean_a - mean_b). Its norm squared
        is the between-group term of the scatter, exactly what centring on the joint mean adds.
        """
        self_size = float(self.x_size)
        total = self_size + other_size
        delta_g = self.x_mean_g - other_mean_g
        if self.perform_mean_correction and self_size > 0:
            joined_mg[-1] = math.sqrt(self_size * other_size / total) * delta_g
        q = min(self.n_components + self.oversample, *joined_mg.shape)
        _, S_q, V_gq = self._svd_lowrank(joined_mg, q)
        self.S_k.copy_(S_q[: self.n_components])
        self.V_kg.copy_(orient_components(V_gq[:, : self.n_components].T))
        if self.perform_mean_correction:
            self.x_m2.add_(other_m2 + (self_size * other_size / total) * delta_g.square().sum())
            self.x_mean_g.sub_(delta_g * (other_size / total))
        else:
            self.x_m2.add_(other_m2)
        self.x_size.fill_(total)

    def _svd_lowrank(self, a_mg: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``torch.svd_lowrank`` with its random test matrix seeded by the update count."""
        device = a_mg.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(1_000_003 * self._n_updates + 17)
            self._n_updates += 1
            return torch.svd_lowrank(a_mg, q=q, niter=self.svd_lowrank_niter)

    def on_train_start(self, trainer: pl.Trainer) -> None:
        self.reset_parameters()

    def on_train_epoch_end(self, trainer: pl.Trainer) -> None:
        """Merge the ranks' partial SVDs hierarchically, then give every rank the result.

        At level ``step`` (1, 2, 4, ...) rank r with r % (2 step) == 0 receives the partial SVD
        of rank r + step, if that rank exists, and merges it into its own; rank r with
        r % (2 step) == step sends its own and takes no further part. The depth is
        ceil(log2(world size)) for any world size, not only powers of two. Rank 0 ends with
        the full result and broadcasts it, since prediction runs on every rank.
        """
        if self._merged or trainer.world_size <= 1 or not dist.is_initialized():
            self._merged = True
            return
        rank, world_size = trainer.global_rank, trainer.world_size
        step = 1
        while step < world_size:
            if rank % (2 * step) == 0 and rank + step < world_size:
                packed = torch.empty_like(self._pack())
                dist.recv(packed, src=rank + step)
                self._merge_packed(packed)
            elif rank % (2 * step) == step:
                dist.send(self._pack(), dst=rank - step)
            step *= 2
        packed = self._pack()
        dist.broadcast(packed, src=0)
        self._unpack(packed)
        self._merged = True

    def _pack(self) -> torch.Tensor:
        """The whole partial result as one flat float64 tensor, for send/recv/broadcast."""
        return torch.cat(
            [self.x_size.view(1), self.x_m2.view(1), self.S_k, self.x_mean_g, self.V_kg.reshape(-1)]
        ).contiguous()

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k, g = self.n_components, self.n_vars
        size, m2, S_k, mean_g, V_flat = torch.split(packed, [1, 1, k, g, k * g])
        return size[0], m2[0], S_k, mean_g, V_flat.view(k, g)

    def _unpack(self, packed: torch.Tensor) -> None:
        size, m2, S_k, mean_g, V_kg = self._split(packed)
        buffers = (self.x_size, self.x_m2, self.S_k, self.x_mean_g, self.V_kg)
        for buffer, value in zip(buffers, (size, m2, S_k, mean_g, V_kg)):
            buffer.copy_(value)

    def _merge_packed(self, packed: torch.Tensor) -> None:
        size, m2, S_k, mean_g, V_kg = self._split(packed)
        if float(size) == 0:
            return
        if float(self.x_size) == 0:
            self._unpack(packed)
            return
        k = self.n_components
        joined_mg = torch.zeros(2 * k + 1, self.n_vars, dtype=torch.float64, device=self.V_kg.device)
        joined_mg[:k] = self.S_k[:, None] * self.V_kg
        joined_mg[k : 2 * k] = S_k[:, None] * V_kg
        self._update(joined_mg, mean_g, float(size), m2)

    @property
    def explained_variance_k(self) -> torch.Tensor:
        """Variance along each component, with ``x_size`` degrees of freedom (population).

        Approximates the ``n_components`` largest eigenvalues of the data's covariance matrix.
        """
        return self.S_k.square() / self.x_size

    @property
    def components_kg(self) -> torch.Tensor:
        """Principal axes (right singular vectors of the centred data), by decreasing variance.

        Each is oriented so that its entry of largest magnitude is positive.
        """
        return self.V_kg

    @property
    def mean_g(self) -> torch.Tensor:
        return self.x_mean_g

    @property
    def total_variance(self) -> torch.Tensor:
        """Sum of the per-gene population variances: the denominator of explained ratios."""
        return self.x_m2 / self.x_size

    @property
    def explained_variance_ratio_k(self) -> torch.Tensor:
        return self.explained_variance_k / self.total_variance

    def predict(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Centre ``x_ng`` on the fitted mean and project it onto the components.

        Returns:
            ``x_ng``: the embedding, cells x components; ``var_names_g``: PC1, PC2, ...
        """
        check_var_names(self.var_names_g, var_names_g)
        return {
            "x_ng": project(x_ng, self.x_mean_g, self.V_kg),
            "var_names_g": component_names(self.n_components),
        }
