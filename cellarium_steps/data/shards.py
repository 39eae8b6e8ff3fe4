"""Open a set of AnnData shards (.h5ad files, .zarr stores) lazily and validate them before any pass.

Only metadata is read here: matrix encodings and shapes, a bounded sample of stored values, gene
names, the obs columns that batch keys and ``obs_filter`` name, and row pointers when the filter
uses ``n_genes``. The matrix itself is read in row ranges by :mod:`cellarium_steps.data.reader`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cellarium_steps.data.batches import BatchCoding, assign_batches, parse_batch_key, parse_columns, survey_batches
from cellarium_steps.data.counts import check_counts_option, resolve_counts
from cellarium_steps.data.covariates import CATEGORICAL_OPTION, CONTINUOUS_OPTION, assign_covariates, survey_covariates
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.genes import align_genes, measured_genes, shard_gene_names
from cellarium_steps.data.obs_filter import evaluate_filter
from cellarium_steps.data.sources import ZARR_SUFFIX, Store, is_zarr_path, read_array

__all__ = ["Shard", "ShardCollection", "expand_inputs", "open_shards", "read_array"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One file: where it is, which of its rows and genes the collection takes, how to code its batches.

    Rows are addressed by *position* among the kept cells (0..n_obs-1) everywhere above the reader,
    which turns positions into the file's rows (:meth:`kept_rows`).
    """

    path: str
    #: cells the collection takes from this file (after ``obs_filter``)
    n_obs: int
    x_encoding: str
    #: whether the counts matrix has an integer dtype (then only negatives need checking)
    x_is_integer: bool
    #: how this shard's batch columns map to the collection's batch codes (None: no batch key)
    batch_coding: BatchCoding | None = None
    #: rows in the file
    n_rows: int = -1
    #: the kept rows as packed bits (``np.packbits``; None: every row), 1 bit a row in memory
    kept_bits: np.ndarray | None = None
    #: the file's genes -> the collection's columns (-1: not taken); None: the same genes, in order
    column_map: np.ndarray | None = None
    #: how this shard's categorical covariates map to the collection's codes, one per covariate
    covariate_codings: tuple[BatchCoding, ...] = ()

    def kept_rows(self) -> np.ndarray:
        """The file's rows of the kept cells, sorted (position i is row ``kept_rows()[i]``)."""
        if self.kept_bits is None:
            return np.arange(self.n_rows)
        return np.flatnonzero(np.unpackbits(self.kept_bits, count=self.n_rows))


@dataclass(frozen=True)
class ShardCollection:
    """Validated shards whose genes are aligned by name and whose batch codes agree."""

    shards: tuple[Shard, ...]
    var_names_g: np.ndarray
    #: the batch columns as given (comma-joined: reopening with it gives the same batches); None: none
    batch_key: str | None
    batch_categories: np.ndarray
    obs_columns: tuple[str, ...]
    #: the counts matrix's key in each file: "X", "raw/X" or "layers/NAME"
    x_key: str
    #: the resolved ``counts`` choice ("X", "raw" or "layers/NAME"), for checkpoints to record
    counts: str = "X"
    var_names: str = "index"
    gene_join: str = "same"
    obs_filter: str | None = None
    #: whether some shard lacks some gene (``gene_join="outer"``): batches then carry the measured mask
    partial_genes: bool = False
    #: obs columns coded as categorical covariates, and each one's categories (code i is category i)
    categorical_covariate_keys: tuple[str, ...] = ()
    covariate_categories: tuple[np.ndarray, ...] = ()
    #: numeric obs columns read as continuous covariates (float64)
    continuous_covariate_keys: tuple[str, ...] = ()

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

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return parse_batch_key(self.batch_key)

    def gene_measured_g(self, shard_index: int) -> np.ndarray:
        """Which of the collection's genes shard ``shard_index`` measured (bool, length n_vars)."""
        return measured_genes(self.shards[shard_index].column_map, self.n_vars)


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Expand globs and plain paths into a de-duplicated list of existing files or ``.zarr`` stores."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for pattern in inputs:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input: no file matches {pattern!r}")
        for path in matches:
            path = path.rstrip("/") if path.rstrip("/").endswith(ZARR_SUFFIX) else path
            if not (os.path.isfile(path) or is_zarr_path(path)):
                what = "a directory, not a .zarr store" if os.path.isdir(path) else "no such file"
                raise InputError(f"--input: {path}: {what}")
            if path not in paths:
                paths.append(path)
    if not paths:
        raise InputError("--input: no input files given")
    return paths


@dataclass
class _Survey:
    """What open_shards learns of one file before the collection-wide decisions."""

    path: str
    n_rows: int
    encoding: str
    is_integer: bool
    choice: str
    matrix_key: str
    genes: np.ndarray
    kept: np.ndarray | None
    batches: BatchCoding | None
    covariates: tuple[BatchCoding, ...] = ()

    @property
    def n_obs(self) -> int:
        return self.n_rows if self.kept is None else int(self.kept.sum())


def open_shards(
    inputs: str | Sequence[str],
    batch_key: str | Sequence[str] | None = None,
    obs_columns: Iterable[str] = (),
    *,
    batch_categories: Sequence[str] | None = None,
    counts: str = "X",
    var_names: str = "index",
    gene_join: str = "same",
    obs_filter: str | None = None,
    require_counts: bool = True,
    categorical_covariate_keys: str | Sequence[str] | None = None,
    continuous_covariate_keys: str | Sequence[str] | None = None,
    covariate_categories: Mapping[str, Sequence[str]] | None = None,
    allow_csc: bool = False,
) -> ShardCollection:
    """Read and cross-check every shard's metadata; raise :class:`InputError` on bad input.

    Args:
        inputs: Paths, globs, or a list of both; ``.h5ad`` files and ``.zarr`` stores may be mixed.
        batch_key: An obs column, or several (a list or ``"a,b,c"``): the batch is their combination,
            named ``a|b|c``. Codes are consistent across shards (see :mod:`~cellarium_steps.data.batches`).
        obs_columns: Obs columns the batches carry as ``<column>_n``.
        batch_categories: Fixed batch codes (a trained model's batches, in its order).
        counts: ``"X"``, ``"raw"`` (``raw/X``, genes from ``raw/var``), ``"layers/NAME"``, or
            ``"auto"``: ``X`` when it holds integer counts, else ``raw/X`` when it does, else an
            ``InputError`` saying what was found (see :func:`~cellarium_steps.data.counts.resolve_counts`).
            Every shard must resolve to the same choice; ``collection.counts`` records it.
        var_names: ``"index"`` or a column of the genes' dataframe (``var``, or ``raw/var`` for raw)
            whose values name the genes; duplicate names are an error.
        gene_join: ``"same"``, ``"inner"`` or ``"outer"`` (see :mod:`~cellarium_steps.data.genes`).
        obs_filter: A ``DataFrame.query`` expression over obs columns and ``n_genes``; only the
            cells it keeps are read (see :mod:`~cellarium_steps.data.obs_filter`).
        require_counts: Whether counts are needed; without, ``counts="auto"`` falls back to ``X``.
        categorical_covariate_keys: Obs columns coded as categorical covariates (as a one-column batch
            key; see :mod:`~cellarium_steps.data.covariates`); ``covariate_categories`` fixes each
            one's categories (a trained model's), and a value outside them is an ``InputError``.
        continuous_covariate_keys: Numeric obs columns read as float64 covariates.
        allow_csc: Accept counts stored as CSC (``Shard.x_encoding == "csc_matrix"``): only for a reader
            given their rows by :class:`~cellarium_steps.data.csc.CSCRows` (``convert``); every other
            step refuses them here, before any pass.

    Shards without cells (or without kept cells) are skipped with a warning.
    """
    paths = expand_inputs(inputs)
    keys = parse_batch_key(batch_key)
    covariates = (parse_columns(categorical_covariate_keys, CATEGORICAL_OPTION),
                  parse_columns(continuous_covariate_keys, CONTINUOUS_OPTION))
    check_counts_option(counts)
    obs_columns = tuple(obs_columns)
    surveys = [_survey(path, keys, obs_columns, counts, var_names, obs_filter, require_counts, allow_csc, covariates)
               for path in paths]
    first = surveys[0]
    for survey in surveys[1:]:
        if survey.choice != first.choice:
            raise InputError(f"{survey.path}: its counts are in {survey.matrix_key} but {first.path}'s in "
                             f"{first.matrix_key} (--counts {counts}); pass --counts to choose one")

    categories = np.array([], dtype=object)
    codings: list[BatchCoding | None] = [None] * len(surveys)
    if keys:  # every shard's categories count, an empty shard's too (as AnnData keeps them)
        categories, assigned = assign_batches(paths, [s.batches for s in surveys], keys, batch_categories)
        codings = list(assigned)
    covariate_categories_k, covariate_codings = assign_covariates(
        paths, [s.covariates for s in surveys], covariates[0], covariate_categories)
    with_cells = []
    for survey, coding, covariate_coding in zip(surveys, codings, covariate_codings):
        if obs_filter is not None:
            logger.info("%s: obs_filter keeps %d of %d cells", survey.path, survey.n_obs, survey.n_rows)
        if survey.n_obs == 0:
            logger.warning("%s: no cells%s; skipped", survey.path, " kept" if survey.n_rows else "")
        else:
            with_cells.append((survey, coding, covariate_coding))
    if not with_cells:
        if obs_filter is not None and any(s.n_rows for s in surveys):
            raise InputError(f"--obs-filter {obs_filter!r} keeps no cell of {len(surveys)} shard(s), e.g. {paths[0]}")
        raise InputError("--input: every shard is empty")

    # Genes are joined over the shards that have cells: a skipped shard measures nothing.
    alignment = align_genes([s.path for s, *_ in with_cells], [s.genes for s, *_ in with_cells], gene_join)
    shards = tuple(
        Shard(survey.path, survey.n_obs, survey.encoding, survey.is_integer, coding, survey.n_rows,
              None if survey.n_obs == survey.n_rows else np.packbits(survey.kept), column_map, covariate_coding)
        for (survey, coding, covariate_coding), column_map in zip(with_cells, alignment.column_maps)
    )
    return ShardCollection(
        shards, alignment.var_names_g, ",".join(keys) if keys else None, categories, obs_columns, first.matrix_key,
        counts=first.choice, var_names=var_names, gene_join=gene_join, obs_filter=obs_filter,
        partial_genes=alignment.partial, categorical_covariate_keys=covariates[0],
        covariate_categories=covariate_categories_k, continuous_covariate_keys=covariates[1],
    )


def _survey(path: str, keys: tuple[str, ...], obs_columns: tuple[str, ...], counts: str, var_names: str,
            obs_filter: str | None, require_counts: bool, allow_csc: bool = False,
            covariates: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> _Survey:
    with Store(path) as store:
        if "obs" not in store or "var" not in store:
            raise InputError(f"{path}: not an AnnData file (no obs or var)")
        location, info = resolve_counts(store, counts, require_counts, allow_csc)
        obs = store["obs"]
        index_key = obs.attrs.get("_index", "_index")
        if index_key in obs and int(obs[index_key].shape[0]) != info.n_rows:
            raise InputError(f"{path}: obs has {int(obs[index_key].shape[0])} rows but {info.key} has {info.n_rows}")
        genes = shard_gene_names(store, location.var_key, var_names, info.n_cols, info.key)
        for key in keys + obs_columns:
            if key not in obs:
                what = "--batch-key" if key in keys else "obs columns"
                raise InputError(f"{path}: obs has no column {key!r} ({what})")
        kept = evaluate_filter(obs_filter, store, info) if obs_filter is not None else None
        kept_rows = None if kept is None else np.flatnonzero(kept)
        batches = survey_batches(store, keys, kept_rows) if keys else None
        covariate_codings = survey_covariates(store, *covariates, kept_rows)
        return _Survey(path, info.n_rows, info.encoding, info.is_integer_dtype, location.choice, info.key,
                       genes, kept, batches, covariate_codings)
