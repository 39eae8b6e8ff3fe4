"""The data layer: lazy shards, schema checks before any pass, bad counts named by shard."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from cellarium_steps.data import InputError, ShardedCellDataset, collate_identity, open_shards
from cellarium_steps.data.dataset import csr_to_torch
from cellarium_steps.data.reader import select_columns
from cellarium_steps.transforms._sparse import _select_columns_torch
from cellarium_steps.transforms._sparse import select_columns as select_tensor_columns


def make_adata(n: int, genes: list[str], batches: list[str], seed: int = 0, prefix: str = "c",
               dtype: type = np.int32, categories: list[str] | None = None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n, len(genes), density=0.3, format="csr", random_state=seed, data_rvs=lambda k: rng.integers(1, 20, k))
    batch = pd.Categorical([batches[i % len(batches)] for i in range(n)], categories=categories or sorted(set(batches)))
    obs = pd.DataFrame({"batch": batch, "label": [f"L{i % 3}" for i in range(n)]}, index=[f"{prefix}{i}" for i in range(n)])
    return ad.AnnData(X=x.astype(dtype), obs=obs, var=pd.DataFrame(index=genes))


GENES = [f"G{i}" for i in range(20)]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    make_adata(37, GENES, ["a", "b"], seed=1, prefix="s0-").write_h5ad(tmp_path / "s0.h5ad")
    make_adata(50, GENES, ["b", "c"], seed=2, prefix="s1-").write_h5ad(tmp_path / "s1.h5ad")
    make_adata(13, GENES, ["a"], seed=3, prefix="s2-").write_h5ad(tmp_path / "s2.h5ad")
    return tmp_path


def collect(dataset: ShardedCellDataset, world_size: int, num_workers: int) -> tuple[list[str], list[int]]:
    names, steps = [], []
    for rank in range(world_size):
        dataset.set_distributed(rank, world_size)
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=collate_identity)
        batches = list(loader)
        steps.append(len(batches))
        names += [n for b in batches for n in b["obs_names_n"]]
    return names, steps


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2), (3, 1), (3, 3)])
def test_every_cell_read_once(shard_dir: Path, world_size: int, num_workers: int) -> None:
    collection = open_shards(str(shard_dir / "*.h5ad"), batch_key="batch")
    dataset = ShardedCellDataset(collection, batch_size=16, shuffle=True, seed=5, shuffle_block_size=4, shuffle_window=20)
    names, steps = collect(dataset, world_size, num_workers)
    assert len(names) == 100 and len(set(names)) == 100
    assert len(set(steps)) == 1


def test_batch_contents_match_the_files(shard_dir: Path) -> None:
    collection = open_shards([str(shard_dir / f"s{i}.h5ad") for i in range(3)], batch_key="batch", obs_columns=["label"])
    assert list(collection.batch_categories) == ["a", "b", "c"]
    full = ad.concat([ad.read_h5ad(shard_dir / f"s{i}.h5ad") for i in range(3)])
    dataset = ShardedCellDataset(collection, batch_size=30)
    batches = list(DataLoader(dataset, batch_size=None, collate_fn=collate_identity))
    x = np.concatenate([b["x_ng"].to_dense().numpy() for b in batches])
    np.testing.assert_array_equal(x, full.X.toarray())
    names = np.concatenate([b["obs_names_n"] for b in batches])
    np.testing.assert_array_equal(names, full.obs_names)
    batch_n = np.concatenate([b["batch_index_n"].numpy() for b in batches])
    np.testing.assert_array_equal(np.array(["a", "b", "c"])[batch_n], full.obs["batch"].astype(str))
    np.testing.assert_array_equal(np.concatenate([b["label_n"] for b in batches]), full.obs["label"])
    totals = np.concatenate([b["total_mrna_umis_n"].numpy() for b in batches])
    np.testing.assert_allclose(totals, np.asarray(full.X.sum(1)).ravel())
    assert all(b["x_ng"].layout.__repr__() == "torch.sparse_csr" for b in batches)
    assert batches[0]["var_names_g"].tolist() == GENES


def test_genes_selected_where_the_rows_are_read(shard_dir: Path) -> None:
    """select_genes: the batches carry those columns in that order (workers send only them), the totals still
    sum every gene, and the Filter transform downstream passes them through unchanged."""
    from cellarium_steps.transforms import Filter

    collection = open_shards([str(shard_dir / f"s{i}.h5ad") for i in range(3)])
    full = ad.concat([ad.read_h5ad(shard_dir / f"s{i}.h5ad") for i in range(3)])
    genes = [GENES[3], GENES[0], GENES[5]]  # not in file order
    dataset = ShardedCellDataset(collection, batch_size=30, shuffle=True, seed=1)
    dataset.select_genes(genes)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=collate_identity))
    names = np.concatenate([b["obs_names_n"] for b in batches])
    rows = full.obs_names.get_indexer(names)
    x = np.concatenate([b["x_ng"].to_dense().numpy() for b in batches])
    np.testing.assert_array_equal(x, full[:, genes].X.toarray()[rows])
    totals = np.concatenate([b["total_mrna_umis_n"].numpy() for b in batches])
    np.testing.assert_allclose(totals, np.asarray(full.X.sum(1)).ravel()[rows])
    assert all(b["var_names_g"].tolist() == genes for b in batches)
    out = Filter(genes)(batches[0]["x_ng"], batches[0]["var_names_g"])
    assert out["x_ng"] is batches[0]["x_ng"] and out["var_names_g"].tolist() == genes
    with pytest.raises(InputError, match="NOT_A_GENE"):
        dataset.select_genes([GENES[0], "NOT_A_GENE"])


def test_batch_codes_consistent_when_shards_drop_unused_categories(tmp_path: Path) -> None:
    make_adata(10, GENES, ["z"], prefix="x").write_h5ad(tmp_path / "s0.h5ad")
    make_adata(10, GENES, ["a", "z"], prefix="y").write_h5ad(tmp_path / "s1.h5ad")
    collection = open_shards(str(tmp_path / "*.h5ad"), batch_key="batch")
    assert list(collection.batch_categories) == ["z", "a"]
    batches = list(DataLoader(ShardedCellDataset(collection, batch_size=10), batch_size=None, collate_fn=collate_identity))
    decoded = [collection.batch_categories[i] for b in batches for i in b["batch_index_n"].tolist()]
    assert decoded == ["z"] * 10 + ["a", "z"] * 5


def test_dense_x_is_read_as_sparse_rows(tmp_path: Path) -> None:
    adata = make_adata(12, GENES, ["a"])
    adata.X = adata.X.toarray()
    adata.write_h5ad(tmp_path / "dense.h5ad")
    collection = open_shards(str(tmp_path / "dense.h5ad"))
    batch = next(iter(ShardedCellDataset(collection, batch_size=5)))
    n = batch["x_ng"].shape[0]
    np.testing.assert_array_equal(batch["x_ng"].to_dense().numpy(), adata.X[:n])


def test_mismatched_genes_name_the_shard(shard_dir: Path) -> None:
    make_adata(5, GENES[:-1] + ["OTHER"], ["a"]).write_h5ad(shard_dir / "s3.h5ad")
    with pytest.raises(InputError, match=r"s3\.h5ad: var_names differ .* gene 19 \('OTHER' vs 'G19'\)"):
        open_shards(str(shard_dir / "*.h5ad"))


def test_missing_batch_column_names_the_shard(shard_dir: Path) -> None:
    adata = make_adata(5, GENES, ["a"])
    del adata.obs["batch"]
    adata.write_h5ad(shard_dir / "s3.h5ad")
    with pytest.raises(InputError, match=r"s3\.h5ad: obs has no column 'batch'"):
        open_shards(str(shard_dir / "*.h5ad"), batch_key="batch")


def test_no_matching_input() -> None:
    with pytest.raises(InputError, match="no file matches"):
        open_shards("/nonexistent/*.h5ad")


def test_csc_matrix_is_refused(tmp_path: Path) -> None:
    adata = make_adata(5, GENES, ["a"])
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="csc.h5ad: X is stored as CSC"):
        open_shards(str(tmp_path / "csc.h5ad"))


def test_empty_shard_is_skipped_with_a_warning(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_adata(0, GENES, ["a"], categories=["a", "b", "c"]).write_h5ad(shard_dir / "s3.h5ad")
    with caplog.at_level(logging.WARNING):
        collection = open_shards(str(shard_dir / "*.h5ad"), batch_key="batch")
    assert "s3.h5ad: no cells; skipped" in caplog.text
    assert collection.n_obs == 100 and len(collection.shards) == 3


def write_bad_counts(directory: Path, value: float) -> str:
    """30 cells of float counts, one of them (row 17) holding ``value``."""
    adata = make_adata(30, GENES, ["a"], dtype=np.float32)
    x = adata.X.tolil()
    x[17, 3] = value
    adata.X = x.tocsr()
    adata.write_h5ad(directory / "bad.h5ad")
    return str(directory / "bad.h5ad")


@pytest.mark.parametrize(
    ("values", "message"),
    [(-1.0, "negative counts"), (0.5, "non-integer values"), (np.nan, "NaN or infinite values")],
)
def test_bad_counts_name_the_shard_and_cell(tmp_path: Path, values: float, message: str) -> None:
    path = write_bad_counts(tmp_path, values)
    # The reader's check of every value it reads (opening with counts required would already see a
    # non-integer among the first stored values: test_explicit_counts_are_sampled_when_opened).
    dataset = ShardedCellDataset(open_shards(path, require_counts=False), batch_size=10)
    with pytest.raises(InputError, match=rf"bad\.h5ad: X has {message}.*\(cell row 17\)"):
        list(dataset)


@pytest.mark.parametrize(("value", "message"), [(0.5, "non-integer values"), (np.inf, "NaN or infinite values")])
def test_explicit_counts_are_sampled_when_opened(tmp_path: Path, value: float, message: str) -> None:
    path = write_bad_counts(tmp_path, value)
    with pytest.raises(InputError, match=rf"bad\.h5ad: X has {message} \(e\.g\. .*, cell row 17; --counts X\)"):
        open_shards(path, counts="X")
    assert open_shards(path, counts="X", require_counts=False).n_obs == 30


def test_normalized_data_allowed_when_counts_not_required(tmp_path: Path) -> None:
    adata = make_adata(10, GENES, ["a"], dtype=np.float32)
    adata.X = adata.X.multiply(0.5).tocsr()
    adata.write_h5ad(tmp_path / "norm.h5ad")
    collection = open_shards(str(tmp_path / "norm.h5ad"), require_counts=False)
    dataset = ShardedCellDataset(collection, batch_size=10, require_counts=False)
    assert len(list(dataset)) == 1


def test_shuffled_batches_keep_rows_and_names_together(shard_dir: Path) -> None:
    collection = open_shards(str(shard_dir / "*.h5ad"), batch_key="batch", obs_columns=["label"])
    full = ad.concat([ad.read_h5ad(shard_dir / f"s{i}.h5ad") for i in range(3)])
    dataset = ShardedCellDataset(collection, batch_size=8, shuffle=True, seed=2, shuffle_block_size=3, shuffle_window=10)
    seen = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=collate_identity):
        rows = full.obs_names.get_indexer(batch["obs_names_n"])
        np.testing.assert_array_equal(batch["x_ng"].to_dense().numpy(), full.X[rows].toarray())
        np.testing.assert_array_equal(batch["label_n"], full.obs["label"].to_numpy()[rows])
        seen += list(batch["obs_names_n"])
    assert sorted(seen) == sorted(full.obs_names)


def test_fixed_batch_categories_follow_the_model_and_reject_unknown_batches(shard_dir: Path) -> None:
    collection = open_shards(str(shard_dir / "s0.h5ad"), batch_key="batch", batch_categories=["b", "a"])
    batch = next(iter(ShardedCellDataset(collection, batch_size=100)))
    full = ad.read_h5ad(shard_dir / "s0.h5ad")
    np.testing.assert_array_equal(np.array(["b", "a"])[batch["batch_index_n"].numpy()], full.obs["batch"].astype(str))
    collection = open_shards(str(shard_dir / "s1.h5ad"), batch_key="batch", batch_categories=["a", "b"])
    with pytest.raises(InputError, match=r"s1\.h5ad: cell 's1-1' \(row 1\) has obs\['batch'\] outside"):
        list(ShardedCellDataset(collection, batch_size=100))


@pytest.mark.parametrize("index", [[1, 4, 6], [6, 1, 4], [5], [7, 0]])
@pytest.mark.parametrize("rows_sorted", [True, False])
def test_select_columns_keeps_each_rows_order(index: list[int], rows_sorted: bool) -> None:
    """Real files store some rows with unsorted columns (the merged PBMC file does); a selection
    keeps every row's entries in their stored order (consumers are order-agnostic, and sorting
    would cost a third of the selection), so sorted rows and an increasing index stay sorted. The
    CPU (numpy) and the torch (CUDA) paths give the same arrays."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, (40, 8)).astype(np.float32)
    dense[3] = 0  # an empty row
    x = sp.csr_matrix(dense)
    if not rows_sorted:  # reverse each row's entries
        for i in range(x.shape[0]):
            a, b = x.indptr[i], x.indptr[i + 1]
            x.indices[a:b], x.data[a:b] = x.indices[a:b][::-1].copy(), x.data[a:b][::-1].copy()
        x.has_sorted_indices = False
    selected = select_columns(x, np.array(index))
    np.testing.assert_array_equal(selected.toarray(), dense[:, index])
    for i in range(selected.shape[0]):
        stored = x.indices[x.indptr[i] : x.indptr[i + 1]]
        kept = np.array(index)[selected.indices[selected.indptr[i] : selected.indptr[i + 1]]]
        np.testing.assert_array_equal(kept, stored[np.isin(stored, index)])
        if rows_sorted and (np.diff(index) > 0).all():
            assert (np.diff(selected.indices[selected.indptr[i] : selected.indptr[i + 1]]) > 0).all()
    x_ng = csr_to_torch(x)
    for by_tensor in (_select_columns_torch(x_ng, torch.tensor(index)), select_tensor_columns(x_ng, torch.tensor(index))):
        np.testing.assert_array_equal(by_tensor.crow_indices().numpy(), selected.indptr)
        np.testing.assert_array_equal(by_tensor.col_indices().numpy(), selected.indices)
        np.testing.assert_array_equal(by_tensor.values().numpy(), selected.data)


def test_select_genes_rejects_duplicates(tmp_path) -> None:
    dense = np.ones((4, 3), dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(dense), var=pd.DataFrame(index=["a", "b", "c"]))
    adata.write_h5ad(tmp_path / "s.h5ad")
    dataset = ShardedCellDataset(open_shards(str(tmp_path / "s.h5ad")), batch_size=2)
    with pytest.raises(InputError, match="duplicates"):
        dataset.select_genes(["a", "b", "a"])
