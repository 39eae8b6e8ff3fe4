"""2-D layouts of a latent space for every cell, fitted on a bounded uniform sample.

The export's ``--layout-2d`` and the report's scatter plots share these pieces: a seeded uniform
sample of a vector column (:func:`sample_vectors`, by the shared :class:`ReservoirSampler`), the
first two principal components of a sample (:class:`PCALayout`) and UMAP (:class:`UMAPLayout`, when
umap-learn is installed). A layout is *fitted* on the sample and then *transforms* any number of
cells, chunk by chunk, so memory depends on the sample size only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cellarium_steps.data.errors import InputError
from cellarium_steps.models._reservoir import ReservoirSampler

LAYOUT_METHODS = ("auto", "umap", "pca")
#: the export's column for each method
LAYOUT_COLUMNS = {"umap": "umap_2d", "pca": "pc_2d"}


def sample_vectors(parts: Sequence[str], column: str, size: int, seed: int, batch_size: int = 65_536) -> np.ndarray:
    """A uniform sample (float32, at most ``size`` rows) of a fixed-size-list column, read alone from Parquet files."""
    reservoir = ReservoirSampler(size, seed)
    sample: np.ndarray | None = None
    for part in parts:
        with pq.ParquetFile(part, pre_buffer=False) as f:
            for batch in f.iter_batches(batch_size=batch_size, columns=[column], use_threads=False):
                vectors = vector_matrix(batch.column(0))
                if sample is None:
                    sample = np.empty((size, vectors.shape[1]), dtype=np.float32)
                rows, slots = reservoir.offer(len(vectors))
                sample[slots] = vectors[rows]
    if sample is None or reservoir.seen == 0:
        raise InputError(f"--layout-column {column}: {parts[0]}: no cells")
    return sample[: reservoir.fill]


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (n, k) array (nulls are not expected: every step writes every cell)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise InputError(f"expected a fixed-size list column (a vector per cell), got {column.type}")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


class PCALayout:
    """The first two principal components of a sample; a latent narrower than 2 is padded with zeros."""

    name = "pca"

    def __init__(self, sample_nk: np.ndarray) -> None:
        sample_nk = np.asarray(sample_nk, dtype=np.float64)
        self.mean_k = sample_nk.mean(axis=0)
        _, _, vt = np.linalg.svd(sample_nk - self.mean_k, full_matrices=False)
        components = vt[:2]
        # sign convention (scikit-learn's svd_flip): each component's largest loading is positive
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components = components * np.where(signs == 0, 1.0, signs)[:, None]
        self.components_2k = np.vstack([components, np.zeros((2 - len(components), sample_nk.shape[1]))])

    def transform(self, latent_nk: np.ndarray) -> np.ndarray:
        return ((np.asarray(latent_nk, dtype=np.float64) - self.mean_k) @ self.components_2k.T).astype(np.float32)


class UMAPLayout:
    """UMAP fitted on the sample (``random_state`` = seed); other cells are placed by ``UMAP.transform``."""

    name = "umap"

    def __init__(self, sample_nk: np.ndarray, seed: int) -> None:
        import umap

        # a seed makes umap-learn single-threaded anyway (n_jobs=1 said here to spare its warning)
        self.model = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit(sample_nk)

    def transform(self, latent_nk: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.transform(latent_nk), dtype=np.float32)


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def resolve_method(method: str) -> str:
    """``umap`` or ``pca``: auto is umap when umap-learn is installed."""
    if method not in LAYOUT_METHODS:
        raise InputError(f"--layout-method: expected one of {list(LAYOUT_METHODS)}, got {method!r}")
    if method == "auto":
        return "umap" if umap_available() else "pca"
    if method == "umap" and not umap_available():
        raise InputError("--layout-method umap needs umap-learn (pip install umap-learn); or use pca")
    return method


@dataclass(frozen=True)
class LayoutOptions:
    """What ``--layout-2d`` computes: from which latent column, on how large a sample, with which seed."""

    method: str = "auto"
    column: str = "scvi_latent"
    sample_size: int = 20_000
    seed: int = 0


def fit_layout(sample_nk: np.ndarray, method: str, seed: int) -> PCALayout | UMAPLayout:
    return UMAPLayout(sample_nk, seed) if resolve_method(method) == "umap" else PCALayout(sample_nk)
