"""Real data in the layouts it comes in: counts in raw/X or a layer, genes named by a var column,
shards with permuted or different genes, zarr stores, cell filters and composite batches.

Each layout is written from the same 3,000 PBMC cells and must give the statistics of the plain
layout (integer counts in X, the same genes in every shard), or numpy's over the cells that
measured each gene where shards measured different genes.
"""

from __future__ import annotations

import logging
import os
import socket
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from cellarium_steps.data import InputError, ShardedCellDataset, collate_identity, open_shards
from cellarium_steps.models import HVGSeuratV3, OnePassMeanVarStd, TDigest
from cellarium_steps.models.hvg_seurat_v3 import BatchStatisticsMismatchError
from cellarium_steps.runner.local import fit_statistics

N_CELLS = 3000
N_SHARDS = 3
REL_TOL = 1e-9


@pytest.fixture(scope="module")
def cells(pbmc_multibatch: ad.AnnData) -> ad.AnnData:
    rows = np.sort(np.random.default_rng(0).choice(pbmc_multibatch.n_obs, N_CELLS, replace=False))
    adata = pbmc_multibatch[rows].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    return adata


def parts(adata: ad.AnnData) -> list[ad.AnnData]:
    bounds = np.linspace(0, adata.n_obs, N_SHARDS + 1).astype(int)
    return [adata[bounds[i] : bounds[i + 1]].copy() for i in range(N_SHARDS)]


def write(shards: list[ad.AnnData], directory: Path, formats: list[str] | None = None) -> list[str]:
    """Each shard as .h5ad or as a zarr store of format 2 or 3."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (shard, fmt) in enumerate(zip(shards, formats or ["h5ad"] * len(shards))):
        if fmt == "h5ad":
            path = directory / f"shard_{i}.h5ad"
            shard.write_h5ad(path)
        else:
            path = directory / f"shard_{i}.zarr"
            with ad.settings.override(zarr_write_format=int(fmt[-1])):
                shard.write_zarr(path)
        paths.append(str(path))
    return paths


def normalized(x: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts per 10,000: non-integer values, as CELLxGENE's X."""
    totals = np.asarray(x.sum(1)).ravel()
    return sp.csr_matrix(sp.diags(1e4 / np.maximum(totals, 1)) @ x.astype(np.float64)).log1p().astype(np.float32)


def mean_var(collection, batch: bool = False, num_workers: int = 0) -> OnePassMeanVarStd:
    model = OnePassMeanVarStd(collection.var_names_g, n_batch=collection.n_batch if batch else 1, output_path=None)
    fit_statistics(model, collection, batch_size=700, num_workers=num_workers, accelerator="cpu")
    return model


def by_name(model: OnePassMeanVarStd, genes) -> tuple[np.ndarray, np.ndarray]:
    index = pd.Index(model.var_names_g).get_indexer(genes)
    assert (index >= 0).all()
    return model.mean_g.numpy()[index], model.var_g.numpy()[index]


def assert_relative(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.maximum(np.abs(expected), 1e-300)
    error = np.where(expected == 0, np.abs(actual), np.abs(actual - expected) / scale)
    assert error.max() < REL_TOL, f"max relative error {error.max():.3g}"


def hvg_genes(collection) -> set[str]:
    model = HVGSeuratV3(collection.var_names_g, n_top_genes=500, output_path=None)
    fit_statistics(model, collection, batch_size=1000, max_epochs=2, accelerator="cpu")
    return set(model.hvg_df.index[model.hvg_df["highly_variable"]])


@pytest.fixture(scope="module")
def plain(cells: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The plain layout's statistics (checked against numpy once) and HVGs."""
    collection = open_shards(write(parts(cells), tmp_path_factory.mktemp("plain")))
    model = mean_var(collection)
    x = cells.X.toarray().astype(np.float64)
    assert_relative(model.mean_g.numpy(), x.mean(0))
    assert_relative(model.var_g.numpy(), x.var(0))
    return {"genes": np.asarray(cells.var_names), "mean": model.mean_g.numpy(), "var": model.var_g.numpy(),
            "hvg": hvg_genes(collection)}


def assert_plain_statistics(collection, plain: dict, genes=None) -> None:
    genes = plain["genes"] if genes is None else genes
    index = pd.Index(plain["genes"]).get_indexer(genes)
    mean_g, var_g = by_name(mean_var(collection), genes)
    assert_relative(mean_g, plain["mean"][index])
    assert_relative(var_g, plain["var"][index])


def cellxgene_style(shard: ad.AnnData, n_var_genes: int = 6000) -> ad.AnnData:
    """Normalized float X over a subset of genes (var: Ensembl-like index, symbols in feature_name),
    integer counts of MORE genes in raw/X (raw/var alike)."""
    ensembl = np.array([f"ENSG{i:011d}" for i in range(shard.n_vars)])
    raw_var = pd.DataFrame({"feature_name": pd.Categorical(shard.var_names)}, index=ensembl)
    raw = ad.AnnData(X=shard.X.copy(), obs=shard.obs, var=raw_var)
    kept = np.arange(0, shard.n_vars)[: n_var_genes]
    adata = ad.AnnData(X=normalized(shard.X)[:, kept], obs=shard.obs, var=raw_var.iloc[kept].copy())
    adata.raw = raw
    return adata


def test_cellxgene_layout_reads_raw_counts_by_symbol(cells, plain, tmp_path: Path, caplog) -> None:
    paths = write([cellxgene_style(p) for p in parts(cells)], tmp_path)
    with caplog.at_level(logging.INFO, logger="cellarium_steps.data.counts"):
        collection = open_shards(paths, counts="auto", var_names="feature_name")
    assert "reading the integer counts in raw/X" in caplog.text
    assert collection.counts == "raw" and collection.x_key == "raw/X"
    np.testing.assert_array_equal(collection.var_names_g, plain["genes"])  # raw/var: more genes than var
    assert_plain_statistics(collection, plain)
    assert hvg_genes(collection) == plain["hvg"]
    by_index = open_shards(paths, counts="raw")
    assert by_index.var_names_g[0] == "ENSG00000000000"


def test_counts_in_a_layer(cells, plain, tmp_path: Path) -> None:
    shards = []
    for part in parts(cells):
        shard = ad.AnnData(X=normalized(part.X), obs=part.obs, var=part.var)
        shard.layers["counts"] = part.X
        shards.append(shard)
    paths = write(shards, tmp_path)
    collection = open_shards(paths, counts="layers/counts")
    assert collection.counts == "layers/counts"
    assert_plain_statistics(collection, plain)
    with pytest.raises(InputError, match=rf"{paths[0]}: no integer counts found \(--counts auto\): X holds "
                                         r"non-integer values .*no raw/X.*pass --counts layers/counts"):
        open_shards(paths, counts="auto")


def permuted_genes(shard: ad.AnnData, seed: int) -> ad.AnnData:
    order = np.random.default_rng(seed).permutation(shard.n_vars)
    return shard[:, order].copy()


def test_permuted_genes_align_by_name(cells, plain, tmp_path: Path) -> None:
    shards = parts(cells)
    shards[1:] = [permuted_genes(s, seed) for seed, s in enumerate(shards[1:], start=1)]
    paths = write(shards, tmp_path)
    collection = open_shards(paths)
    np.testing.assert_array_equal(collection.var_names_g, plain["genes"])  # the first shard's order
    assert collection.shards[0].column_map is None and collection.shards[1].column_map is not None
    assert_plain_statistics(collection, plain)
    assert hvg_genes(collection) == plain["hvg"]
    # The rows themselves, shuffled over two loader workers: every cell once, its genes in place.
    dataset = ShardedCellDataset(collection, batch_size=256, shuffle=True, seed=3)
    expected = pd.DataFrame(cells.X.toarray(), index=cells.obs_names)
    seen = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=collate_identity):
        np.testing.assert_array_equal(batch["x_ng"].to_dense().numpy(), expected.loc[batch["obs_names_n"]].to_numpy())
        assert "gene_measured_sg" not in batch
        seen += list(batch["obs_names_n"])
    assert sorted(seen) == sorted(cells.obs_names)


def gene_subsets(cells: ad.AnnData) -> tuple[list[ad.AnnData], list[np.ndarray]]:
    """Shard s lacks its own 300 genes; the last shard's genes are also permuted."""
    rng = np.random.default_rng(7)
    lacking = np.array_split(rng.choice(cells.n_vars, 900, replace=False), N_SHARDS)
    shards = []
    for s, part in enumerate(parts(cells)):
        keep = np.setdiff1d(np.arange(cells.n_vars), lacking[s])
        if s == N_SHARDS - 1:
            keep = rng.permutation(keep)
        shards.append(part[:, keep].copy())
    return shards, lacking


def test_inner_join_keeps_the_shared_genes(cells, plain, tmp_path: Path) -> None:
    shards, lacking = gene_subsets(cells)
    collection = open_shards(write(shards, tmp_path), gene_join="inner")
    shared = np.delete(np.asarray(cells.var_names), np.concatenate(lacking))
    np.testing.assert_array_equal(collection.var_names_g, shards[0].var_names[np.isin(shards[0].var_names, shared)])
    assert not collection.partial_genes
    assert_plain_statistics(collection, plain, genes=collection.var_names_g)


def test_outer_join_counts_only_the_cells_that_measured_a_gene(cells, tmp_path: Path) -> None:
    shards, _ = gene_subsets(cells)
    paths = write(shards, tmp_path)
    collection = open_shards(paths, gene_join="outer")
    assert collection.partial_genes and collection.n_vars == cells.n_vars
    genes = collection.var_names_g
    # numpy over only the cells of the shards that have each gene
    x_by_shard = [pd.DataFrame(s.X.toarray().astype(np.float64), columns=s.var_names).reindex(columns=genes)
                  for s in shards]
    n_g = sum(x.notna().sum(0).to_numpy() for x in x_by_shard)
    mean_g = sum(x.fillna(0).sum(0).to_numpy() for x in x_by_shard) / n_g
    var_g = sum(((x - mean_g) ** 2).fillna(0).sum(0).to_numpy() for x in x_by_shard) / n_g

    model = mean_var(collection)
    np.testing.assert_array_equal(model.n_cells_g.numpy(), n_g)
    assert_relative(model.mean_g.numpy(), mean_g)
    assert_relative(model.var_g.numpy(), var_g)
    assert set(model.n_cells_g.numpy()) == {N_CELLS, N_CELLS - len(shards[0]), N_CELLS - len(shards[1]),
                                            N_CELLS - len(shards[2])}

    shifted = OnePassMeanVarStd(genes, algorithm="shifted_data", output_path=None)
    fit_statistics(shifted, collection, batch_size=700, accelerator="cpu")
    assert_relative(shifted.var_g.numpy(), var_g)

    digest = TDigest(genes)
    fit_statistics(digest, collection, batch_size=700, accelerator="cpu")
    np.testing.assert_array_equal(digest.n_cells_g.numpy(), n_g)
    nonzero_counts = [np.nanmedian(np.where(col > 0, col, np.nan)) if (col > 0).any() else np.nan
                      for col in pd.concat(x_by_shard).to_numpy().T]
    np.testing.assert_array_equal(digest.median_g.numpy(), np.array(nonzero_counts))

    hvg = HVGSeuratV3(genes, n_top_genes=500, output_path=None)
    fit_statistics(hvg, collection, batch_size=1000, max_epochs=2, accelerator="cpu")
    np.testing.assert_array_equal(hvg.n_cells_g.numpy(), n_g)
    assert_relative(hvg.hvg_df["means"].to_numpy(), mean_g)
    assert_relative(hvg.hvg_df["variances"].to_numpy(), var_g * n_g / (n_g - 1))
    assert hvg.hvg_df["highly_variable"].sum() == 500
    # One pass given mean-var's statistics: the cells that measured each gene must come with them.
    given = HVGSeuratV3(genes, n_top_genes=500, output_path=None)
    given.set_batch_statistics(model.n_cells_b, model.batch_mean_bg, model.batch_var_bg, n_cells_bg=model.n_cells_bg)
    fit_statistics(given, collection, batch_size=1000, max_epochs=1, accelerator="cpu")
    np.testing.assert_array_equal(given.hvg_df["highly_variable"], hvg.hvg_df["highly_variable"])
    without = HVGSeuratV3(genes, n_top_genes=500, output_path=None)
    without.set_batch_statistics(model.n_cells_b, model.batch_mean_bg, model.batch_var_bg)
    with pytest.raises(BatchStatisticsMismatchError, match="pass n_cells_bg"):
        fit_statistics(without, collection, batch_size=1000, max_epochs=1, accelerator="cpu")


def test_measured_mask_in_dense_and_sparse_batches() -> None:
    """The models' masked paths on dense batches (the GPU's layout) and sparse ones agree with numpy;
    values a caller stores for unmeasured genes never enter a digest."""
    import torch

    rng = np.random.default_rng(3)
    names = np.array([f"g{i}" for i in range(6)])
    x_ng = rng.poisson(2.0, (40, 6)).astype(np.float32)
    shard_index_n = torch.tensor(rng.integers(0, 2, 40))
    gene_measured_sg = torch.tensor([[True] * 6, [True, True, False, True, False, True]])
    measured_ng = gene_measured_sg[shard_index_n].numpy()
    batch_n = torch.tensor(rng.integers(0, 2, 40))
    x_masked = np.where(measured_ng, x_ng, 0).astype(np.float32)
    for algorithm in ("naive", "shifted_data"):
        for x in (torch.tensor(x_masked), torch.tensor(x_masked).to_sparse_csr()):
            model = OnePassMeanVarStd(names, algorithm=algorithm, n_batch=2, output_path=None)
            for rows in np.array_split(np.arange(40), 4):
                part = x.to_dense()[rows] if x.layout == torch.strided else x.to_dense()[rows].to_sparse_csr()
                model(part, names, batch_n[rows], shard_index_n[rows], gene_measured_sg)
            for b in range(2):
                values = np.where(measured_ng, x_ng, np.nan)[batch_n.numpy() == b].astype(np.float64)
                np.testing.assert_allclose(model.batch_var_bg[b].numpy(), np.nanvar(values, axis=0), rtol=1e-12)
                np.testing.assert_array_equal(model.n_cells_bg[b].numpy(), (~np.isnan(values)).sum(0))
    digest = TDigest(names)
    digest(torch.tensor(x_ng), names, shard_index_n, gene_measured_sg)  # x_ng stores values where unmeasured
    nonzero = np.where(measured_ng & (x_ng > 0), x_ng, np.nan)
    np.testing.assert_array_equal(digest.n_nonzero_g.numpy(), (~np.isnan(nonzero)).sum(0))
    np.testing.assert_array_equal(digest.median_g.numpy(), np.nanmedian(nonzero, axis=0))
    np.testing.assert_array_equal(digest.n_cells_g.numpy(), measured_ng.sum(0))
    with pytest.raises(ValueError, match="go together"):
        digest(torch.tensor(x_ng), names, shard_index_n, None)


@pytest.mark.parametrize("formats", [["zarr2", "zarr2", "h5ad"], ["zarr3", "zarr3", "zarr3"]])
def test_zarr_stores_stream_like_h5ad(cells, plain, tmp_path: Path, formats: list[str]) -> None:
    paths = write(parts(cells), tmp_path, formats)
    pattern = [str(tmp_path / "*.zarr")] + [p for p in paths if p.endswith(".h5ad")]
    collection = open_shards(pattern)
    assert [s.path for s in collection.shards] == [p for p in paths if p.endswith(".zarr")] + \
        [p for p in paths if p.endswith(".h5ad")]
    model = mean_var(collection, num_workers=2)  # zarr in forked loader workers
    assert_relative(model.mean_g.numpy(), plain["mean"])
    assert_relative(model.var_g.numpy(), plain["var"])


def test_filter_and_composite_batch_match_pandas(cells, tmp_path: Path, caplog) -> None:
    expression = "n_genes >= 600 and condition == 'control' and `chemistry` not in ['10x_5p_v1']"
    keys = ["study", "chemistry"]
    formats = ["h5ad", "zarr3", "h5ad"]
    paths = write(parts(cells), tmp_path, formats)
    with caplog.at_level(logging.INFO, logger="cellarium_steps.data.shards"):
        collection = open_shards(paths, batch_key=",".join(keys), obs_filter=expression)
    assert f"{paths[0]}: obs_filter keeps" in caplog.text

    obs = cells.obs.assign(n_genes=np.diff(cells.X.indptr))
    kept = obs.query(expression)
    groups = kept.groupby(keys, observed=True)
    assert list(collection.batch_categories) == sorted("|".join(k) for k in groups.groups)
    assert collection.n_obs == len(kept) and collection.batch_key == "study,chemistry"

    model = mean_var(collection, batch=True)
    x = pd.DataFrame(cells.X.toarray().astype(np.float64), index=cells.obs_names)
    for (study, chemistry), group in groups:
        b = list(collection.batch_categories).index(f"{study}|{chemistry}")
        xb = x.loc[group.index].to_numpy()
        assert model.n_cells_b[b] == len(group)
        assert_relative(model.batch_mean_bg[b].numpy(), xb.mean(0))
        assert_relative(model.batch_var_bg[b].numpy(), xb.var(0))

    # Every kept cell once per epoch, shuffled over two workers and two ranks, with its own batch.
    dataset = ShardedCellDataset(collection, batch_size=128, shuffle=True, seed=1, shuffle_window=512)
    seen = []
    for rank in range(2):
        dataset.set_distributed(rank, 2)
        for batch in DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=collate_identity):
            labels = collection.batch_categories[batch["batch_index_n"].numpy()]
            expected = kept.loc[batch["obs_names_n"], keys].astype(str).agg("|".join, axis=1).to_numpy()
            np.testing.assert_array_equal(labels, expected)
            seen += list(batch["obs_names_n"])
    assert sorted(seen) == sorted(kept.index)


def _masked_models(collection, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Outer-join statistics of one rank's share of the cells (reduced across ranks at epoch end)."""
    genes = collection.var_names_g
    dataset = ShardedCellDataset(collection, batch_size=400)
    dataset.set_distributed(rank, world_size)
    trainer = types.SimpleNamespace(world_size=world_size, global_rank=rank)
    mean_var_model = OnePassMeanVarStd(genes, n_batch=collection.n_batch, output_path=None)
    # Each rank shifts by its own first minibatch's mean; the reduction moves them to rank 0's.
    shifted = OnePassMeanVarStd(genes, algorithm="shifted_data", n_batch=collection.n_batch, output_path=None)
    digest, hvg = TDigest(genes), HVGSeuratV3(genes, n_top_genes=300, output_path=None)
    for epoch in range(2):
        for batch in dataset:
            keys = {k: batch[k] for k in ("x_ng", "var_names_g", "shard_index_n", "gene_measured_sg")}
            if epoch == 0:
                mean_var_model(batch_index_n=batch["batch_index_n"], **keys)
                shifted(batch_index_n=batch["batch_index_n"], **keys)
                digest(**keys)
            hvg(**keys)
        if epoch == 0:
            for model in (mean_var_model, shifted, digest):
                model.on_train_epoch_end(trainer)
        hvg.on_train_epoch_end(trainer)
    return {"var_bg": mean_var_model.batch_var_bg.numpy(), "n_cells_bg": mean_var_model.n_cells_bg.numpy(),
            "shifted_var_g": shifted.var_g.numpy(),
            "digest_n_cells_g": digest.n_cells_g.numpy(), "median_g": digest.median_g.numpy(),
            "hvg_n_cells_g": hvg.n_cells_g.numpy(), "variances_norm": hvg.hvg_df["variances_norm"].to_numpy()}


def _ddp_worker(rank: int, world_size: int, port: int, collection, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        queue.put((rank, _masked_models(collection, rank, world_size)))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_outer_join_statistics_reduce_across_ranks(cells, tmp_path: Path) -> None:
    """Each rank counts the unmeasured cells of its share; the epoch-end all-reduce sums them with the moments."""
    shards, _ = gene_subsets(cells)
    collection = open_shards(write(shards, tmp_path), gene_join="outer", batch_key="chemistry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    context = mp.start_processes(_ddp_worker, args=(2, port, collection, queue), nprocs=2, start_method="spawn",
                                 join=False)
    # Read before joining: a worker cannot exit while its large result still fills the queue's pipe.
    results = [result for _, result in sorted((queue.get(timeout=120) for _ in range(2)), key=lambda r: r[0])]
    while not context.join():
        pass
    single = _masked_models(collection)
    for result in results:
        for key in ("n_cells_bg", "digest_n_cells_g", "hvg_n_cells_g", "median_g"):
            np.testing.assert_array_equal(result[key], single[key], err_msg=key)
        for key in ("var_bg", "variances_norm"):
            finite = np.isfinite(single[key])
            np.testing.assert_array_equal(np.isfinite(result[key]), finite)
            assert_relative(result[key][finite], single[key][finite])
        # Shifted sums cancel: all-zero genes come out at +-1e-16 rather than 0.
        np.testing.assert_allclose(result["shifted_var_g"], single["shifted_var_g"],
                                   rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small(cells: ad.AnnData) -> ad.AnnData:
    return cells[:200].copy()


def test_var_names_errors_name_the_file_and_column(small, tmp_path: Path) -> None:
    (path,) = write([cellxgene_style(small, 100)], tmp_path)
    with pytest.raises(InputError, match=rf"{path}: raw/var has no column 'gene_symbol' \(--var-names\)"):
        open_shards(path, counts="raw", var_names="gene_symbol")
    duplicated = small.copy()
    duplicated.var["symbol"] = ["A", "B", "A"] + list(duplicated.var_names[3:])
    (path,) = write([duplicated], tmp_path / "dup")
    with pytest.raises(InputError, match=rf"{path}: var\['symbol'\] has duplicate gene names, e.g. \['A'\]"):
        open_shards(path, var_names="symbol")


def test_counts_errors_name_the_file(small, tmp_path: Path) -> None:
    norm = ad.AnnData(X=normalized(small.X), obs=small.obs, var=small.var)
    (path,) = write([norm], tmp_path / "norm")
    with pytest.raises(InputError, match=rf"{path}: no integer counts found .*X holds non-integer values.*no raw/X"):
        open_shards(path, counts="auto")
    for counts in ("raw", "layers/nope"):
        key = "raw/X" if counts == "raw" else counts
        with pytest.raises(InputError, match=rf"{path}: no matrix at '{key}' \(--counts {counts}\); the file has X"):
            open_shards(path, counts=counts)
    with pytest.raises(InputError, match=r"--counts: 'spliced' is not one of"):
        open_shards(path, counts="spliced")
    csc = small.copy()
    csc.X = sp.csc_matrix(csc.X)
    (path,) = write([csc], tmp_path / "csc")
    with pytest.raises(InputError, match=rf"{path}: X is stored as CSC.*cellarium-steps convert"):
        open_shards(path, counts="auto")
    # Shards whose counts are in different places: auto will not mix them silently.
    paths = write([small, cellxgene_style(small)], tmp_path / "mixed")
    with pytest.raises(InputError, match=rf"{paths[1]}: its counts are in raw/X but {paths[0]}'s in X"):
        open_shards(paths, counts="auto")


def test_gene_join_errors_name_the_file(small, tmp_path: Path) -> None:
    paths = write([small, small[:, 5:].copy()], tmp_path)
    with pytest.raises(InputError, match=rf"{paths[1]}: var_names has {small.n_vars - 5} genes, {paths[0]} has "
                                         rf"{small.n_vars} \(--gene-join same"):
        open_shards(paths)
    with pytest.raises(InputError, match=r"--gene-join: 'left' is not one of"):
        open_shards(paths, gene_join="left")
    disjoint = write([small[:, :5].copy(), small[:, 5:10].copy()], tmp_path / "disjoint")
    with pytest.raises(InputError, match="--gene-join inner: no gene is in every shard"):
        open_shards(disjoint, gene_join="inner")


def test_filter_and_batch_errors_name_the_file_and_column(small, tmp_path: Path) -> None:
    lacking = small.copy()
    del lacking.obs["chemistry"]
    paths = write([small, lacking], tmp_path)
    with pytest.raises(InputError, match=rf"{paths[0]}: obs has no column 'tissue' \(--obs-filter"):
        open_shards(paths, obs_filter="tissue == 'blood'")
    with pytest.raises(InputError, match=r"--obs-filter 'n_genes < 0' keeps no cell"):
        open_shards(paths, obs_filter="n_genes < 0")
    with pytest.raises(InputError, match=r"--obs-filter: cannot parse"):
        open_shards(paths, obs_filter="n_genes >")
    with pytest.raises(InputError, match=rf"{paths[0]}: --obs-filter 'n_genes \+ 1' is not a condition"):
        open_shards(paths, obs_filter="n_genes + 1")
    with pytest.raises(InputError, match=rf"{paths[1]}: obs has no column 'chemistry' \(--batch-key\)"):
        open_shards(paths, batch_key="study,chemistry")
