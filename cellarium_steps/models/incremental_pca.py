"""Distributed and incremental PCA: one pass, memory independent of the number of cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from cellarium_steps.models._tensors import densify, row_range
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


# Directions the partial SVD keeps beyond n_components (see IncrementalPCA).
DEFAULT_OVERSAMPLE = 1000
# The stacked matrix's SVD is exact when its smaller side is at most this (an eigendecomposition
# of that side's Gram matrix); larger ones go through the seeded randomized SVD.
EXACT_SVD_MAX = 4096
# Extra columns of the randomized range finder beyond the rank kept.
RANDOMIZED_OVERSAMPLE = 10


class IncrementalPCA(CellariumModel, PredictMixin):
    """Distributed and incremental PCA.

    The model keeps a rank-r partial SVD, ``S_r * V_rg``, of the cells seen so far (Ross et
    al.), r = min(genes, n_components + oversample). Cells are merged ``chunk_size`` = max(r, 256)
    at a time, whatever the batch size (4 x genes when r + max(r, 256) + 1 rows would outnumber
    the genes; the epoch's last chunk is smaller): the current rows, the chunk centred on its own
    mean and one mean-correction row are stacked and their leading r right singular vectors kept. At the end
    of the epoch the ranks' partial SVDs are merged pairwise up a binary tree (Iwen et al.), each
    merge stacking two states and the mean-correction row, and the result is broadcast, so every
    rank can predict. The first n_components rows are the reported components.

    The SVD of the stacked matrix is exact (float64 eigendecomposition of the Gram matrix of its
    smaller side) whenever that side has at most ``EXACT_SVD_MAX`` = 4,096 rows or columns, which
    the chunking guarantees for r <= 2,047 or genes <= 4,096 (n_components up to 1,047 at the
    default oversample). Beyond it ``torch.svd_lowrank`` takes over, seeded, with
    ``svd_lowrank_niter`` power iterations and 10 extra columns.

    Accuracy. What an exact SVD does not remove is the loss of each truncation to r: the energy
    a chunk has outside the kept directions is dropped, and some of it lies along directions that
    later become leading ones, so components come out low and tilted. On the merged PBMC file
    (15,493 cells, 2,000 HVGs, 30 components, random order) keeping only the k reported directions
    gives a variance error of 4e-3 of the largest with an exact SVD and 6e-3 with the randomized
    one: the truncation, not the randomized SVD, is what limits it. The directions kept beyond k are
    what helps, and the hard case sets how many: cells sorted by source (a collection's shards one
    after another, or one per DDP rank), where a direction separating later cells is not tracked
    while the earlier ones go by. In file order, 50 components, the largest principal angle of the
    top-10 subspace against the exact one is 1.4e-2 rad with 500 extra directions and 2.6e-3 with
    1,000 on 2,000 HVGs (variance errors 3.9e-4 and 4.2e-5 of the largest); on 5,000 HVGs, where
    each chunk is truncated more, 3.0e-2 and 1.4e-2 (8.5e-4 and 3.7e-4). Cells in random order (a
    shuffled collection) do far better. For many genes in sorted shards, raise ``oversample``.

    Cost: about 12 r g + 70 r^2 flops a cell (20,000 genes, r = 1,050: 330 Mflop against the exact
    covariance's g^2 = 400 Mflop; on 2,000 genes r + chunk_size exceeds the genes and the update
    works on the g x g side), and (r + chunk_size + 1) x g float64 of memory for the update's
    workspace, where cells wait for their chunk (20,000 genes: 0.34 GB against the covariance's
    3.2 GB).

    All state is float64: it is r x g, so precision costs little. The randomized SVD is seeded
    per update, so a run is reproducible whatever the global RNG state. Besides the SVD the
    model keeps the total sum of squared deviations from the mean (merged with Chan's formula),
    so the fraction of variance each component explains is known without a second pass.

    References:
        1. A Distributed and Incremental SVD Algorithm for Agglomerative Data Analysis on
           Large Networks (Iwen et al.).
        2. Incremental Learning for Robust Visual Tracking (Ross et al.).

    Args:
        var_names_g: The variable names schema for the input data validation.
        n_components: Number of principal components.
        svd_lowrank_niter: Number of power iterations of the randomized SVD, used for stacked
            matrices whose smaller side exceeds ``EXACT_SVD_MAX``.
        perform_mean_correction: If True the data are centred (chunk means plus the
            mean-correction row of each merge). If False the data are assumed to be centred
            already and are used as they come.
        oversample: Directions kept beyond ``n_components``; they are not reported but make the
            reported ones accurate (see Accuracy). Time grows about as r^2 to r g, memory as r g.
    """

    def __init__(
        self,
        var_names_g: Sequence[str] | np.ndarray,
        n_components: int,
        svd_lowrank_niter: int = 2,
        perform_mean_correction: bool = True,
        oversample: int = DEFAULT_OVERSAMPLE,
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
        self.svd_rank = min(self.n_vars, n_components + oversample)
        self.chunk_size = max(self.svd_rank, 256)
        if self.svd_rank + self.chunk_size + 1 > self.n_vars:
            # The stacked matrix is taller than wide, so its SVD works on the g x g side at ~g^3 a
            # chunk whatever its height: larger chunks spread that cost over more cells.
            self.chunk_size = max(self.chunk_size, 4 * self.n_vars)
        r, g = self.svd_rank, self.n_vars
        self.V_rg: torch.Tensor
        self.S_r: torch.Tensor
        self.x_mean_g: torch.Tensor
        self.x_size: torch.Tensor
        self.x_m2: torch.Tensor
        self.register_buffer("V_rg", torch.zeros(r, g, dtype=torch.float64))
        self.register_buffer("S_r", torch.zeros(r, dtype=torch.float64))
        self.register_buffer("x_mean_g", torch.zeros(g, dtype=torch.float64))
        self.register_buffer("x_size", torch.zeros((), dtype=torch.float64))
        self.register_buffer("x_m2", torch.zeros((), dtype=torch.float64))
        self._n_updates = 0
        self._merged = False
        # Scratch for an update, (r + chunk_size + 1) x g float64: cells wait in its rows r, r + 1,
        # ... until a whole chunk has come (see forward). Not state: pending cells are merged first.
        self._joined_mg: torch.Tensor | None = None
        self._n_pending = 0

    def reset_parameters(self) -> None:
        for buffer in (self.V_rg, self.S_r, self.x_mean_g, self.x_size, self.x_m2):
            buffer.zero_()
        self._n_updates = 0
        self._merged = False
        self._n_pending = 0

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Also accept a state with only the k reported rows (``V_kg``, ``S_k``), as this model
        saved before it kept extra directions: the extra rows start empty."""
        if prefix + "V_kg" in state_dict and prefix + "V_rg" not in state_dict:
            V_kg, S_k = state_dict.pop(prefix + "V_kg"), state_dict.pop(prefix + "S_k")
            k = V_kg.shape[0]
            state_dict[prefix + "V_rg"] = torch.cat([V_kg, V_kg.new_zeros(self.svd_rank - k, V_kg.shape[1])])
            state_dict[prefix + "S_r"] = torch.cat([S_k, S_k.new_zeros(self.svd_rank - k)])
        self._n_pending = 0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._merge_pending()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | None]:
        """Incrementally update the partial SVD with a batch of cells; returns an empty dict."""
        check_var_names(self.var_names_g, var_names_g)
        # Cells wait until chunk_size of them have come, then merge in one update: every update
        # truncates to r directions and loses the energy outside them, so the number of updates,
        # and the result, must not depend on the loader's batch size (batches of 128 cells would
        # truncate several times as often, and be slower). Rows are densified a part at a time (a
        # sparse batch of 10,000 cells x 20,000 genes would take 800 MB dense).
        n, start = x_ng.shape[0], 0
        while start < n:
            stop = min(n, start + self.chunk_size - self._n_pending)
            first = self.svd_rank + self._n_pending
            self._workspace()[first : first + stop - start].copy_(densify(row_range(x_ng, start, stop)))
            self._n_pending += stop - start
            start = stop
            if self._n_pending == self.chunk_size:
                self._merge_pending()
        return {}

    def _workspace(self) -> torch.Tensor:
        if self._joined_mg is None:
            rows = self.svd_rank + self.chunk_size + 1
            self._joined_mg = torch.zeros(rows, self.n_vars, dtype=torch.float64, device=self.V_rg.device)
        elif self._joined_mg.device != self.V_rg.device:  # the model was moved: waiting cells move too
            self._joined_mg = self._joined_mg.to(self.V_rg.device)
        return self._joined_mg

    def _merge_pending(self) -> None:
        """Merge the cells waiting in the workspace into the partial SVD."""
        r, n = self.svd_rank, self._n_pending
        if n == 0:
            return
        self._n_pending = 0
        # The current rows, the cells (already in place) and the mean-correction row, stacked.
        joined_mg = self._workspace()[: r + n + 1]
        torch.mul(self.S_r[:, None], self.V_rg, out=joined_mg[:r])
        joined_mg[-1].zero_()
        cells_ng = joined_mg[r : r + n]
        if self.perform_mean_correction:
            cells_mean_g = cells_ng.mean(dim=0)
            cells_ng.sub_(cells_mean_g)
        else:
            cells_mean_g = torch.zeros_like(self.x_mean_g)
        cells_m2 = torch.linalg.vector_norm(cells_ng).square()
        self._update(joined_mg, cells_mean_g, float(n), cells_m2)

    def _update(
        self, joined_mg: torch.Tensor, other_mean_g: torch.Tensor, other_size: float, other_m2: torch.Tensor
    ) -> None:
        """Merge another partial result whose rows are already in ``joined_mg[r:-1]``.

        ``joined_mg[:r]`` must hold this model's ``S_r * V_rg`` and its last row is the
        mean-correction row, filled here: sqrt(n_a n_b / n) (mean_a - mean_b). Its norm squared
        is the between-group term of the scatter, exactly what centring on the joint mean adds.
        """
        self_size = float(self.x_size)
        total = self_size + other_size
        delta_g = self.x_mean_g - other_mean_g
        if self.perform_mean_correction and self_size > 0:
            joined_mg[-1] = math.sqrt(self_size * other_size / total) * delta_g
        S_r, V_rg = self._truncated_svd(joined_mg)
        self.S_r.copy_(S_r)
        self.V_rg.copy_(orient_components(V_rg))
        if self.perform_mean_correction:
            self.x_m2.add_(other_m2 + (self_size * other_size / total) * delta_g.square().sum())
            self.x_mean_g.sub_(delta_g * (other_size / total))
        else:
            self.x_m2.add_(other_m2)
        self.x_size.fill_(total)

    def _truncated_svd(self, a_mg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The r leading singular values and right singular vectors of ``a_mg``, zero-padded.

        Exact when the smaller side is at most ``EXACT_SVD_MAX``: the eigendecomposition of
        ``a a^T`` (m <= g) or ``a^T a`` in float64, half the work of an SVD of ``a``. Squaring
        costs little precision here: an eigenvalue's error is ~eps times the largest, so even a
        singular value 1e-3 of the largest (the kept ones are larger on real data) keeps ~10
        digits. Eigenvalues below max(m, g) eps times the largest are numerical zeros; their rows
        stay zero, as a rank-deficient start (fewer cells than r) needs.
        """
        m, g = a_mg.shape
        r = self.svd_rank
        S_r = a_mg.new_zeros(r)
        V_rg = a_mg.new_zeros(r, g)
        if min(m, g) > EXACT_SVD_MAX:
            _, S_q, V_gq = self._svd_lowrank(a_mg, min(r + RANDOMIZED_OVERSAMPLE, m, g))
            q = min(r, S_q.shape[0])
            S_r[:q], V_rg[:q] = S_q[:q], V_gq[:, :q].T
            return S_r, V_rg
        if m <= g:
            eigenvalues_m, U_mm = torch.linalg.eigh(a_mg @ a_mg.T)
        else:
            eigenvalues_m, U_mm = torch.linalg.eigh(a_mg.T @ a_mg)
        top = min(r, eigenvalues_m.shape[0])
        eigenvalues_t, U_mt = eigenvalues_m.flip(0)[:top], U_mm.flip(1)[:, :top]
        q = int((eigenvalues_t > eigenvalues_t[0].clamp_min(0) * max(m, g) * torch.finfo(a_mg.dtype).eps).sum())
        S_r[:q] = eigenvalues_t[:q].sqrt()
        if m <= g:
            V_rg[:q] = (U_mt[:, :q].T @ a_mg) / S_r[:q, None]
        else:
            V_rg[:q] = U_mt[:, :q].T
        return S_r, V_rg

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
        self._merge_pending()
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
            [self.x_size.view(1), self.x_m2.view(1), self.S_r, self.x_mean_g, self.V_rg.reshape(-1)]
        ).contiguous()

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, g = self.svd_rank, self.n_vars
        size, m2, S_r, mean_g, V_flat = torch.split(packed, [1, 1, r, g, r * g])
        return size[0], m2[0], S_r, mean_g, V_flat.view(r, g)

    def _unpack(self, packed: torch.Tensor) -> None:
        size, m2, S_r, mean_g, V_rg = self._split(packed)
        buffers = (self.x_size, self.x_m2, self.S_r, self.x_mean_g, self.V_rg)
        for buffer, value in zip(buffers, (size, m2, S_r, mean_g, V_rg)):
            buffer.copy_(value)

    def _merge_packed(self, packed: torch.Tensor) -> None:
        size, m2, S_r, mean_g, V_rg = self._split(packed)
        if float(size) == 0:
            return
        if float(self.x_size) == 0:
            self._unpack(packed)
            return
        r = self.svd_rank
        joined_mg = torch.zeros(2 * r + 1, self.n_vars, dtype=torch.float64, device=self.V_rg.device)
        joined_mg[:r] = self.S_r[:, None] * self.V_rg
        joined_mg[r : 2 * r] = S_r[:, None] * V_rg
        self._update(joined_mg, mean_g, float(size), m2)

    @property
    def V_kg(self) -> torch.Tensor:
        """The k reported rows of the partial SVD (cellarium-ml's attribute)."""
        self._merge_pending()
        return self.V_rg[: self.n_components]

    @property
    def S_k(self) -> torch.Tensor:
        self._merge_pending()
        return self.S_r[: self.n_components]

    @property
    def explained_variance_k(self) -> torch.Tensor:
        """Variance along each component, with ``x_size`` degrees of freedom (population).

        Approximates the ``n_components`` largest eigenvalues of the data's covariance matrix.
        """
        self._merge_pending()
        return self.S_r[: self.n_components].square() / self.x_size

    @property
    def components_kg(self) -> torch.Tensor:
        """Principal axes (right singular vectors of the centred data), by decreasing variance.

        Each is oriented so that its entry of largest magnitude is positive.
        """
        self._merge_pending()
        return self.V_rg[: self.n_components]

    @property
    def mean_g(self) -> torch.Tensor:
        self._merge_pending()
        return self.x_mean_g

    @property
    def total_variance(self) -> torch.Tensor:
        """Sum of the per-gene population variances: the denominator of explained ratios."""
        self._merge_pending()
        return self.x_m2 / self.x_size

    @property
    def explained_variance_ratio_k(self) -> torch.Tensor:
        return self.explained_variance_k / self.total_variance

    def predict(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Centre ``x_ng`` on the fitted mean and project it onto the components.

        Returns:
            ``x_ng``: the embedding, cells x components; ``var_names_g``: PC1, PC2, ...
        """
        self._merge_pending()
        check_var_names(self.var_names_g, var_names_g)
        return {
            "x_ng": project(x_ng, self.x_mean_g, self.components_kg),
            "var_names_g": component_names(self.n_components),
        }
