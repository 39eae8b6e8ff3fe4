"""The export's AnnData write-back (``export --anndata DIR``): one ``.h5ad`` per input shard, streamed.

Each file has the shard's ``obs`` and ``var`` (copied group by group by HDF5 from an ``.h5ad``, so every
column keeps its encoding and dtype; read and written by anndata from a ``.zarr`` store), no ``X``
(``anndata.read_h5ad`` gives ``X=None`` with the shard's shape),
``obsm`` matrices from the per-cell vectors (:data:`OBSM_KEYS`) and, when a SOCAM prediction is an
input, the call as obs columns (:data:`PREDICTED_OBS`; named ``predicted_<name>`` when any shard's
obs already has the name). The obsm and predicted datasets are created empty with their final shape
and filled row range by row range as the export's chunks go by, so memory does not grow with the
number of cells. A file is written under a temporary name in DIR and renamed when the whole export
has succeeded (the caller's ExitStack), so a killed or failed export leaves no partial file.

With ``obs_filter`` a file still has every cell of its shard, in the shard's order (so its obs names
match the user's AnnData one to one): the cells the filter left out, which no model saw, have NaN in
every ``obsm`` row and in ``cell_type_probability``, and an empty string in the predicted labels.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from cellarium_steps.atomic import atomic_path
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.reader import row_runs
from cellarium_steps.data.shards import Shard
from cellarium_steps.data.sources import Store, encoding_type, is_group
from cellarium_steps.outputs.layout import vector_matrix

#: per-cell vector columns written as obsm matrices, under scanpy's names
OBSM_KEYS = {"pca": "X_pca", "scvi_latent": "X_scVI", "umap_2d": "X_umap", "pc_2d": "X_pc_2d"}
#: SOCAM's call, written as obs columns
PREDICTED_OBS = ("cell_type_ontology_term_id", "cell_type", "cell_type_probability")
PREDICTED_PREFIX = "predicted_"
#: where the run's provenance goes (a string in uns)
UNS_PROVENANCE = "cellarium_steps"
# The AnnData on-disk spec's encodings of what is written here by hand (anndata's readers check them).
_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}


def shard_stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class ShardAnnDataWriter:
    """Write ``DIR/<shard stem>.h5ad`` for each shard as its chunks arrive, in shard order."""

    def __init__(self, directory: str, shards: Sequence[Shard], schema: pa.Schema, stack: contextlib.ExitStack,
                 provenance: dict[str, Any] | None = None) -> None:
        self.directory = directory
        self.stack = stack
        self.provenance = json.dumps(provenance or {}, default=str, sort_keys=True)
        self.n_obs = {s.path: s.n_obs for s in shards}  # the cells written (those obs_filter keeps)
        self.n_rows = {s.path: s.n_rows for s in shards}  # the shard's cells: each file's rows
        self.targets = {s.path: os.path.join(directory, f"{shard_stem(s.path)}.h5ad") for s in shards}
        by_target: dict[str, str] = {}
        for path, target in self.targets.items():
            if target in by_target:
                raise InputError(f"--anndata: {path} and {by_target[target]} would both be written to {target} "
                                 "(shards need distinct file names)")
            by_target[target] = path
        self.obsm = {c: OBSM_KEYS[c] for c in schema.names if c in OBSM_KEYS}
        self.types = {c: schema.field(c).type for c in schema.names}
        self.predicted = self._predicted_names([c for c in PREDICTED_OBS if c in schema.names], shards)
        self.file: h5py.File | None = None

    @staticmethod
    def _predicted_names(columns: list[str], shards: Sequence[Shard]) -> dict[str, str]:
        """Our obs name for each predicted column: the plain name, or the prefixed one where a shard has it."""
        taken: dict[str, str] = {}
        for shard in shards:
            with Store(shard.path) as store:
                obs = store["obs"]
                if not is_group(obs) or encoding_type(obs) != "dataframe":
                    raise InputError(f"--anndata: {shard.path}: obs is not an AnnData dataframe group "
                                     "(written by anndata older than 0.7?); rewrite it with a current anndata")
                taken.update({c: shard.path for c in obs if c in columns or c.startswith(PREDICTED_PREFIX)})
        names = {}
        for column in columns:
            name = PREDICTED_PREFIX + column if column in taken else column
            if name in taken and name != column:
                raise InputError(f"--anndata: {taken[name]}: obs has both {column!r} and {name!r}; the prediction "
                                 "has no free name")
            names[column] = name
        return names

    @property
    def outputs(self) -> list[str]:
        return list(self.targets.values())

    def write(self, path: str, start: int, rows: np.ndarray, table: pa.Table) -> None:
        """Cells ``start:start + len(table)`` of shard ``path``'s kept cells, at the file's ``rows`` (sorted;
        chunks of a shard arrive in order)."""
        if start == 0:
            self._begin(path)
        assert self.file is not None
        stop = start + table.num_rows
        runs = row_runs(np.asarray(rows))
        for column, key in self.obsm.items():
            self._write_runs(self.file["obsm"][key], runs, vector_matrix(table.column(column)))
        for column, name in self.predicted.items():
            values = table.column(column)
            if pa.types.is_floating(values.type):
                cells = values.to_numpy()
            else:
                cells = np.asarray(values.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
            self._write_runs(self.file["obs"][name], runs, cells)
        if stop == self.n_obs[path]:
            self.file.close()
            self.file = None

    def _write_runs(self, dataset: h5py.Dataset, runs: list[tuple[int, int]], values: np.ndarray) -> None:
        done = 0
        for a, b in runs:
            self.write_rows(dataset, a, values[done : done + b - a])
            done += b - a

    def write_rows(self, dataset: h5py.Dataset, start: int, values: np.ndarray) -> None:
        """One row range of an obsm or obs dataset (the only writes of per-cell data)."""
        dataset[start : start + len(values)] = values

    def _begin(self, path: str) -> None:
        from anndata import AnnData
        from anndata.io import write_elem

        n_obs = self.n_rows[path]
        os.makedirs(self.directory, exist_ok=True)
        tmp = self.stack.enter_context(atomic_path(self.targets[path]))
        # anndata writes the file's skeleton (root encoding, empty obsm/uns/... groups); obs and var are
        # then replaced by the shard's own groups, copied inside HDF5.
        AnnData().write_h5ad(tmp)
        self.file = f = h5py.File(tmp, "r+")
        self.stack.callback(self._close)  # closed before atomic_path removes the file on failure
        with Store(path) as shard:
            for group in ("obs", "var"):
                del f[group]
                if shard.kind == "h5ad":
                    shard.root.copy(shard[group], f, group)
                else:  # a zarr store: through anndata's reader and writer
                    from anndata.io import read_elem

                    write_elem(f, group, read_elem(shard[group]))
        # Rows no chunk writes (cells obs_filter left out) keep the fill value: NaN, or "" for strings.
        for column, key in self.obsm.items():
            kind = self.types[column]
            f["obsm"].create_dataset(key, shape=(n_obs, kind.list_size), dtype=kind.value_type.to_pandas_dtype(),
                                     fillvalue=np.nan)
            f["obsm"][key].attrs.update(_ARRAY)
        obs = f["obs"]
        for column, name in self.predicted.items():
            kind = self.types[column]
            floating = pa.types.is_floating(kind)
            if floating:
                obs.create_dataset(name, shape=(n_obs,), dtype=kind.to_pandas_dtype(), fillvalue=np.nan)
            else:
                obs.create_dataset(name, shape=(n_obs,), dtype=h5py.string_dtype())
            obs[name].attrs.update(_ARRAY if floating else _STRINGS)
        if self.predicted:
            order = [str(c) for c in obs.attrs.get("column-order", [])]
            obs.attrs["column-order"] = np.array(order + list(self.predicted.values()), dtype=h5py.string_dtype())
        write_elem(f["uns"], UNS_PROVENANCE, self.provenance)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        """Every shard's file is complete (checked); the renames happen as the caller's ExitStack unwinds."""
        if self.file is not None:
            raise RuntimeError(f"--anndata: {self.file.filename} was not filled to its last row")
        self._close()
