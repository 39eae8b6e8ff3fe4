"""Open a set of .h5ad shards lazily and validate their schema before any pass starts.

Only metadata is read here (shapes, gene names, the batch column's categories); the
matrix itself is read in row ranges by :mod:`cellarium_steps.data.reader`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from cellarium_steps.data.errors import InputError

logger = logging.getLogger(__name__)

SUPPORTED_X_ENCODINGS = ("csr_matrix", "array")


@dataclass(frozen=True)
class Shard:
    """One .h5ad file: where it is, how many cells, and how to map its batch codes."""

    path: str
    n_obs: int
    x_encoding: str
    x_is_integer: bool
    #: this shard's batch category codes -> the collection's batch index (None: plain column or no batch key)
    batch_code_map: np.ndarray | None = None


@dataclass(frozen=True)
class ShardCollection:
    """Validated shards that share one gene list and one set of batch categories."""

    shards: tuple[Shard, ...]
    var_names_g: np.ndarray
    batch_key: str | None
    batch_categories: np.ndarray
    obs_columns: tuple[str, ...]
    x_key: str

    @property
    def n_obs(self) -> int:
        return sum(s.n_obs for s in self.shards)

    @property
    def n_vars(self) -> int:
        return len(self.var_names_g)

    @property
    def n_batch(self) -> int:
        return max(len(self.batch_categories), 1)

    @property
    def shard_sizes(self) -> np.ndarray:
        return np.array([s.n_obs for s in self.shards], dtype=np.int64)


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Expand globs and plain paths into a sorted, de-duplicated list of existing files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for pattern in inputs:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input: no file matches {pattern!r}")
        for path in matches:
            if not os.path.isfile(path):
                raise InputError(f"--input: {path}: no such file")
            if path not in paths:
                paths.append(path)
    if not paths:
        raise InputError("--input: no input files given")
    return paths


def read_array(elem: h5py.Dataset | h5py.Group) -> np.ndarray:
    """A 1-D .h5ad array element as numpy.

    Plain and string datasets are read with h5py; anndata (seconds to import) only for the
    rarer encodings stored as groups, such as nullable integers.
    """
    if isinstance(elem, h5py.Dataset):
        return elem.asstr()[()] if h5py.check_string_dtype(elem.dtype) else elem[()]
    from anndata.io import read_elem

    return np.asarray(read_elem(elem))


def _read_index(group: h5py.Group, path: str, name: str) -> np.ndarray:
    index_key = group.attrs.get("_index", "_index")
    if index_key not in group:
        raise InputError(f"{path}: {name} has no index")
    return read_array(group[index_key]).astype(str)


def obs_column_encoding(obs: h5py.Group, key: str) -> str:
    elem = obs[key]
    return str(elem.attrs.get("encoding-type", "array"))


def _read_categories(obs: h5py.Group, key: str) -> np.ndarray | None:
    """The categories of a categorical obs column, or None for a plain column."""
    if obs_column_encoding(obs, key) == "categorical":
        return read_array(obs[key]["categories"]).astype(str)
    return None


def _x_encoding(f: h5py.File, x_key: str, path: str) -> tuple[str, bool, int]:
    if x_key not in f:
        raise InputError(f"{path}: no matrix at {x_key!r}")
    elem = f[x_key]
    encoding = str(elem.attrs.get("encoding-type", "array"))
    if encoding == "csc_matrix":
        raise InputError(
            f"{path}: {x_key} is stored as CSC; cells can only be streamed from CSR "
            "(rewrite it with adata.X = adata.X.tocsr())"
        )
    if encoding not in SUPPORTED_X_ENCODINGS:
        raise InputError(f"{path}: {x_key} has unsupported encoding {encoding!r}")
    data = elem["data"] if encoding == "csr_matrix" else elem
    n_obs = int(elem.attrs["shape"][0]) if encoding == "csr_matrix" else int(elem.shape[0])
    return encoding, np.issubdtype(data.dtype, np.integer), n_obs


def open_shards(
    inputs: str | Sequence[str],
    batch_key: str | None = None,
    obs_columns: Iterable[str] = (),
    x_key: str = "X",
    batch_categories: Sequence[str] | None = None,
) -> ShardCollection:
    """Read and cross-check every shard's metadata; raise :class:`InputError` on a mismatch.

    Every shard must have the first shard's genes in the same order and the obs columns
    asked for. Batch codes are made consistent across shards: a categorical ``batch_key``
    keeps the first shard's category order, with categories that only later shards have
    (AnnData drops unused categories when a subset is written) appended in order of
    appearance; a plain text column maps onto the sorted set of its values. Shards without
    cells are skipped with a warning.

    ``batch_categories`` fixes the batch codes instead (a trained model's batches, in its
    order); a cell whose batch is not among them is an error when it is read.
    """
    paths = expand_inputs(inputs)
    obs_columns = tuple(obs_columns)
    required_obs = ((batch_key,) if batch_key else ()) + obs_columns

    var_names_g: np.ndarray | None = None
    first_path = ""
    categories: list[str] = []
    any_categorical = False
    plain_batch_values: list[np.ndarray] = []
    metas = []
    for path in paths:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise InputError(f"{path}: not a readable .h5ad file ({e})") from None
        with f:
            if "obs" not in f or "var" not in f:
                raise InputError(f"{path}: not an AnnData file (no obs or var)")
            shard_var = _read_index(f["var"], path, "var")
            encoding, is_integer, n_obs = _x_encoding(f, x_key, path)
            if var_names_g is None:
                var_names_g, first_path = shard_var, path
            elif len(shard_var) != len(var_names_g) or not np.array_equal(shard_var, var_names_g):
                raise InputError(_describe_gene_mismatch(path, shard_var, first_path, var_names_g))
            obs = f["obs"]
            for key in required_obs:
                if key not in obs:
                    raise InputError(f"{path}: obs has no column {key!r}")
            shard_categories = None
            if batch_key:
                shard_categories = _read_categories(obs, batch_key)
                if shard_categories is None:
                    plain_batch_values.append(np.unique(read_array(obs[batch_key]).astype(str)))
                else:
                    any_categorical = True
                    new = [c for c in shard_categories if c not in set(categories)]
                    if categories and new:
                        logger.info(
                            "%s: obs[%r] adds categories %s not in earlier shards; codes follow the union",
                            path, batch_key, [str(c) for c in new[:5]],
                        )
                    categories.extend(str(c) for c in new)
        metas.append((path, n_obs, encoding, is_integer, shard_categories))

    assert var_names_g is not None
    if any_categorical and plain_batch_values:
        raise InputError(f"obs[{batch_key!r}] is categorical in some shards and plain text in others")
    if plain_batch_values:
        categories = sorted(set(np.concatenate(plain_batch_values).tolist()))
    if batch_categories is not None:
        categories = [str(c) for c in batch_categories]
    position = {c: i for i, c in enumerate(categories)}
    batch_categories = np.array(categories, dtype=object)

    shards = []
    for path, n_obs, encoding, is_integer, shard_categories in metas:
        if n_obs == 0:
            logger.warning("%s: no cells; skipped", path)
            continue
        code_map = None
        if shard_categories is not None:
            code_map = np.array([position.get(str(c), -1) for c in shard_categories], dtype=np.int64)
        shards.append(Shard(path, n_obs, encoding, is_integer, code_map))
    if not shards:
        raise InputError("--input: every shard is empty")
    return ShardCollection(tuple(shards), var_names_g, batch_key, batch_categories, obs_columns, x_key)


def _describe_gene_mismatch(path: str, genes: np.ndarray, first_path: str, first_genes: np.ndarray) -> str:
    if len(genes) != len(first_genes):
        return f"{path}: var_names has {len(genes)} genes, {first_path} has {len(first_genes)}"
    i = int(np.flatnonzero(genes != first_genes)[0])
    return f"{path}: var_names differ from {first_path}'s at gene {i} ({str(genes[i])!r} vs {str(first_genes[i])!r})"
