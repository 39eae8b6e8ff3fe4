"""What the PCA tests compare fitted models with: the exact float64 PCA of a dense matrix and the
accuracy measures against it; log-normalised real counts, synthetic cells; a thread-backed
``torch.distributed`` for the merge of any number of ranks.

Convention: ``explained_variance_k`` is the population variance (ddof=0, divided by n), the
eigenvalues of ``Xc.T @ Xc / n``.
"""

from __future__ import annotations

import queue
import threading
import types
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

# Acceptance of an approximate (incremental) PCA: every component's variance within this much of
# the largest variance, residual variance at most this multiple of the optimum for k components,
# and the top TOP_SUBSPACE components spanning nearly the exact subspace (largest principal angle).
VARIANCE_TOL = 1e-3
RECONSTRUCTION_RATIO = 1.01
TOP_SUBSPACE = 10
ANGLE_TOL = 1e-2


def log_normalised(counts: sp.csr_matrix, columns: Sequence[int] | np.ndarray, target: float = 1e4) -> np.ndarray:
    """log1p(target * counts / cell total) on ``columns``, dense float64, totals over all genes
    (as the pca step: normalise, log1p, then keep the genes). Cells without counts stay zero."""
    total_n = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    scale_n = np.divide(target, total_n, out=np.zeros_like(total_n), where=total_n > 0)
    x = sp.diags(scale_n) @ counts[:, np.asarray(columns)].astype(np.float64)
    x.data = np.log1p(x.data)
    return x.toarray()


class Reference:
    """The exact PCA of ``x_ng`` (float64 ``numpy.linalg.eigh`` of the covariance), k components."""

    def __init__(self, x_ng: np.ndarray, n_components: int) -> None:
        self.x_ng = x_ng
        self.k = n_components
        self.mean_g = x_ng.mean(axis=0)
        centred_ng = x_ng - self.mean_g
        self.total_ss = float(np.einsum("ng,ng->", centred_ng, centred_ng))
        cov_gg = centred_ng.T @ centred_ng / x_ng.shape[0]
        eigenvalues_g, eigenvectors_gg = np.linalg.eigh(cov_gg)
        self.eigenvalues_g = eigenvalues_g[::-1]
        self.components_kg = eigenvectors_gg[:, ::-1][:, :n_components].T
        self.trace = float(np.trace(cov_gg))

    @property
    def n(self) -> int:
        return self.x_ng.shape[0]

    def reconstruction_ratio(self, mean_g: np.ndarray, components_kg: np.ndarray) -> float:
        """Residual variance after projecting onto the components, over the best possible."""
        k = components_kg.shape[0]
        z_nk = (self.x_ng - mean_g) @ components_kg.T
        shift_g = self.mean_g - mean_g
        residual = (self.total_ss + self.n * shift_g @ shift_g - np.einsum("nk,nk->", z_nk, z_nk)) / self.n
        return residual / self.eigenvalues_g[k:].sum()

    def separated_components(self, min_relative_gap: float = 1e-2) -> np.ndarray:
        """Components whose eigenvalue is well apart from both neighbours (so the vector is defined)."""
        k = self.k
        lam = self.eigenvalues_g[: k + 1]
        gaps = np.minimum(np.r_[np.inf, -np.diff(lam)][:k], -np.diff(lam)[:k])
        return np.flatnonzero(gaps / lam[:k] > min_relative_gap)

    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        """A fitted model's error measures: ``variance`` (largest |explained variance - eigenvalue|
        over the components, relative to the largest eigenvalue), ``reconstruction`` (ratio to the
        optimum) and ``angle`` (largest principal angle between the top-10 subspaces, radians)."""
        variance_k = model.explained_variance_k.cpu().numpy()
        components_kg = model.components_kg.cpu().numpy()
        k = len(variance_k)
        top = min(TOP_SUBSPACE, k)
        return {
            "variance": float(np.abs(variance_k - self.eigenvalues_g[:k]).max() / self.eigenvalues_g[0]),
            "reconstruction": float(self.reconstruction_ratio(model.mean_g.cpu().numpy(), components_kg)),
            "angle": float(scipy.linalg.subspace_angles(components_kg[:top].T, self.components_kg[:top].T).max()),
        }


def assert_accurate(accuracy: dict[str, float], variance_tol: float = VARIANCE_TOL,
                    angle_tol: float = ANGLE_TOL) -> None:
    assert accuracy["variance"] <= variance_tol, accuracy
    assert accuracy["reconstruction"] <= RECONSTRUCTION_RATIO, accuracy
    assert accuracy["angle"] <= angle_tol, accuracy


def synthetic(n: int = 3000, g: int = 120, seed: int = 0) -> np.ndarray:
    """Cells from a few programs plus noise, with distinct leading variances and a shifted mean."""
    rng = np.random.default_rng(seed)
    scales = np.array([6.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0, 0.8])
    loadings_pg = np.linalg.qr(rng.standard_normal((g, len(scales))))[0].T
    x_ng = (rng.standard_normal((n, len(scales))) * scales) @ loadings_pg
    return x_ng + 0.3 * rng.standard_normal((n, g)) + rng.uniform(1, 5, size=g)


def fit_model(model, x_ng: np.ndarray, batch_size: int = 500, sparse: bool = False):
    """Feed ``x_ng`` to a PCA model in float32 batches (sparse CSR or dense); returns the model."""
    for start in range(0, len(x_ng), batch_size):
        batch = torch.from_numpy(x_ng[start : start + batch_size]).float()
        model(batch.to_sparse_csr() if sparse else batch, model.var_names_g)
    return model


class ThreadedDist:
    """The point-to-point part of torch.distributed for ranks that are threads of this process.

    It runs the merge's real code for any world size in milliseconds (a process per rank costs
    seconds of imports each); the CLI tests cover gloo itself with 2 and 3 processes.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.local = threading.local()
        self.channels = {(a, b): queue.Queue() for a in range(world_size) for b in range(world_size)}
        self.sends: list[tuple[int, int]] = []

    def is_initialized(self) -> bool:
        return True

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.sends.append((self.local.rank, dst))
        self.channels[self.local.rank, dst].put(tensor.clone())

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        tensor.copy_(self.channels[src, self.local.rank].get(timeout=60))

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.local.rank == src:
            for rank in range(self.world_size):
                if rank != src:
                    self.channels[src, rank].put(tensor.clone())
        else:
            tensor.copy_(self.channels[src, self.local.rank].get(timeout=60))


def merge_on_threads(models: Sequence[torch.nn.Module], monkeypatch: object, calls: int = 1) -> ThreadedDist:
    """Run every rank's ``on_train_epoch_end`` (``calls`` times) on its own thread, with
    ``incremental_pca.dist`` replaced by a :class:`ThreadedDist`; returns it (its ``sends``)."""
    from cellarium_steps.models import incremental_pca

    world_size = len(models)
    fake = ThreadedDist(world_size)
    monkeypatch.setattr(incremental_pca, "dist", fake)  # type: ignore[attr-defined]
    errors: list[BaseException] = []

    def merge(rank: int) -> None:
        fake.local.rank = rank
        trainer = types.SimpleNamespace(world_size=world_size, global_rank=rank)
        try:
            for _ in range(calls):
                models[rank].on_train_epoch_end(trainer)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=merge, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return fake
