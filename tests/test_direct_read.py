"""Reading uncompressed HDF5 ranges from the file's bytes gives exactly what h5py gives, or h5py does it."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from cellarium_steps.data import ShardedCellDataset, open_shards
from cellarium_steps.data.direct import DirectFile

N = 100


@pytest.fixture
def h5_path(tmp_path: Path) -> Path:
    values = np.arange(N, dtype=np.int32) * 3 - 7
    path = tmp_path / "arrays.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("contiguous", data=values.astype(np.float64))
        f.create_dataset("chunked", data=values, chunks=(7,))
        # Written last chunk first: the file holds the chunks in the reverse of their index order.
        backwards = f.create_dataset("backwards", shape=(N,), dtype=np.float32, chunks=(8,))
        for start in range(96, -1, -8):
            backwards[start : start + 8] = values[start : start + 8]
        f.create_dataset("gzip", data=values, chunks=(10,), compression="gzip")
        f.create_dataset("shuffled", data=values, chunks=(10,), shuffle=True)
        f.create_dataset("big_endian", data=values.astype(">i4"), chunks=(10,))
        partial = f.create_dataset("partial", shape=(N,), dtype=np.int32, chunks=(10,), fillvalue=-1)
        partial[:35] = values[:35]  # chunks 4.. never written: HDF5 supplies the fill value
        f.create_dataset("empty", shape=(0,), dtype=np.int32, maxshape=(None,), chunks=(4,))
    return path


DIRECT = {"contiguous", "chunked", "backwards"}
THROUGH_H5PY = {"gzip", "shuffled", "big_endian", "partial", "empty"}


def test_ranges_equal_h5py_and_only_plain_layouts_are_read_directly(h5_path: Path) -> None:
    rng = np.random.default_rng(0)
    ranges = [(0, N), (0, 0), (N, N), (5, 6), (6, 50), (93, N), (0, 1), (-3, N + 5)]
    ranges += [tuple(sorted(rng.integers(0, N + 1, 2))) for _ in range(200)]
    with h5py.File(h5_path, "r") as f:
        layouts: dict = {}
        direct = DirectFile(f, layouts)
        for name in sorted(DIRECT | THROUGH_H5PY):
            for start, stop in ranges:
                expected = f[name][max(0, start) : stop]
                got = direct.read(name, start, stop)
                assert got.dtype == expected.dtype, name
                np.testing.assert_array_equal(got, expected, err_msg=f"{name}[{start}:{stop}]")
        direct.close()
    assert {name for name, layout in layouts.items() if layout is not None} == DIRECT


def test_a_layout_survives_reopening(h5_path: Path) -> None:
    """The dict the caller keeps spares surveying a file again (the loader reopens shards every epoch)."""
    layouts: dict = {}
    for _ in range(2):
        with h5py.File(h5_path, "r") as f:
            direct = DirectFile(f, layouts)
            np.testing.assert_array_equal(direct.read("backwards", 3, 90), f["backwards"][3:90])
            direct.close()
    assert layouts["backwards"] is not None


def test_anndata_shards_are_read_directly(tmp_path: Path) -> None:
    """anndata writes X's data and indices chunked and unfiltered: the loader reads them directly."""
    rng = np.random.default_rng(1)
    x = sp.random(300, 40, density=0.2, format="csr", random_state=2, data_rvs=lambda k: rng.integers(1, 30, k))
    adata = ad.AnnData(x.astype(np.int32))
    adata.obs_names = [f"c{i}" for i in range(300)]
    adata.var_names = [f"g{i}" for i in range(40)]
    adata.write_h5ad(tmp_path / "s.h5ad")
    dataset = ShardedCellDataset(open_shards(str(tmp_path / "s.h5ad")), batch_size=64)
    dense = np.concatenate([b["x_ng"].to_dense().numpy() for b in dataset])
    np.testing.assert_array_equal(dense, x.toarray())
    (layouts,) = dataset._byte_layouts.values()
    assert layouts["/X/data"] is not None and layouts["/X/indices"] is not None


def test_a_file_object_is_read_through_h5py(h5_path: Path) -> None:
    with open(h5_path, "rb") as handle, h5py.File(handle, "r") as f:
        layouts: dict = {}
        direct = DirectFile(f, layouts)
        np.testing.assert_array_equal(direct.read("chunked", 10, 60), f["chunked"][10:60])
        direct.close()
    assert layouts["chunked"] is None
