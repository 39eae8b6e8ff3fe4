"""convert: every input layout rewritten as uncompressed CSR shards that give the plain layout's statistics.

The inputs are the 3,000 PBMC cells of test_real_layouts.py (3 shards) in the layouts the other steps
cannot stream (CSC, compressed, dense, zarr) or read with data options (raw/X, gene subsets, a cell
filter); each conversion must give the plain layout's mean/var (float64, relative error < 1e-9) and
HVGs. Output shards have 1,100 cells and windows 700, so neither lines up with the input shards.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import test_real_layouts
import yaml
from conftest import run_cli
from test_export import run_killed
from test_real_layouts import (
    N_CELLS,
    assert_plain_statistics,
    assert_relative,
    cellxgene_style,
    gene_subsets,
    hvg_genes,
    mean_var,
    normalized,
    parts,
    write,
)
from test_workflow import TINY, snakemake

from cellarium_steps.data import InputError, open_shards
from cellarium_steps.data.csc import CSCRows
from cellarium_steps.data.direct import _byte_layout
from cellarium_steps.data.options import DataOptions
from cellarium_steps.data.sources import Store
from cellarium_steps.outputs.shards import MANIFEST
from cellarium_steps.pipelines.convert import convert

# the real-data fixtures, shared with test_real_layouts.py
cells = test_real_layouts.cells
plain = test_real_layouts.plain

CELLS_PER_SHARD = 1100
WINDOW = 700


def run_convert(inputs: list[str], out: Path, **options) -> object:
    """convert into ``out`` with shards and windows that line up with nothing (``options``: the pipeline's
    and the data options' keywords); the converted collection."""
    data = {f.name: options.pop(f.name) for f in dataclasses.fields(DataOptions) if f.name in options}
    convert(inputs=inputs, output=str(out), cells_per_shard=CELLS_PER_SHARD, batch_size=WINDOW,
            data_options=DataOptions(**data), **options)
    return open_shards(str(out / "shard_*.h5ad"))


def converted_anndata(out: Path) -> ad.AnnData:
    return ad.concat([ad.read_h5ad(p) for p in sorted(glob.glob(str(out / "shard_*.h5ad")))], merge="same")


def write_layout(shards: list[ad.AnnData], directory: Path, layout: str) -> list[str]:
    """Each shard with X as CSC, dense or CSR, gzip-compressed or not; or as zarr stores."""
    if layout == "zarr":
        return write(shards, directory, ["zarr3"] * len(shards))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shard in enumerate(shards):
        shard = shard.copy()
        if layout.startswith("csc"):
            shard.X = sp.csc_matrix(shard.X)
        elif layout.startswith("dense"):
            shard.X = shard.X.toarray()
        path = str(directory / f"shard_{i}.h5ad")
        shard.write_h5ad(path, compression="gzip" if layout.endswith("gzip") else None)
        paths.append(path)
    return paths


@pytest.mark.parametrize("layout", ["csc", "csc-gzip", "gzip", "dense-gzip", "zarr"])
def test_every_layout_converts_to_the_plain_statistics(cells, plain, tmp_path: Path, layout: str) -> None:
    paths = write_layout(parts(cells), tmp_path / "in", layout)
    if layout.startswith("csc"):
        with pytest.raises(InputError, match="stored as CSC"):  # what convert is for
            open_shards(paths)
    out = tmp_path / "out"
    collection = run_convert(paths, out)
    assert [s.n_obs for s in collection.shards] == [1100, 1100, 800]
    assert_plain_statistics(collection, plain)
    assert hvg_genes(collection) == plain["hvg"]  # Jaccard 1.0

    # What anndata reads back: the same cells in input order, int32 counts, obs with the same values.
    back = converted_anndata(out)
    assert back.X.dtype == np.int32 and isinstance(back.X, sp.csr_matrix)
    assert (back.X != cells.X).nnz == 0
    np.testing.assert_array_equal(back.obs_names, cells.obs_names)
    np.testing.assert_array_equal(back.var_names, cells.var_names)
    pd.testing.assert_frame_equal(back.obs.astype(str), cells.obs.astype(str))
    # The direct byte reads apply: every count array is plain, unfiltered bytes.
    with h5py.File(out / "shard_00000.h5ad") as f:
        for name in ("data", "indices", "indptr"):
            assert f["X"][name].compression is None and _byte_layout(f["X"][name]) is not None


def test_the_command_converts_and_mean_var_on_the_shards_matches_the_original(cells, plain, tmp_path: Path) -> None:
    csc_paths = write_layout(parts(cells), tmp_path / "csc", "csc-gzip")
    out = tmp_path / "converted"
    run_cli("convert", "--input", str(tmp_path / "csc" / "*.h5ad"), "--output", str(out), "--cells-per-shard", "1000",
            "--batch-key", "source", "--obs-columns", "batch", "--quiet")
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["n_obs"] for s in manifest["shards"]] == [1000] * 3 and manifest["obs_columns"] == ["batch", "source"]
    assert [i["path"] for i in manifest["inputs"]] == csc_paths
    assert json.loads(ad.read_h5ad(out / "shard_00000.h5ad").uns["cellarium_steps"])["step"] == "convert"
    output = tmp_path / "mean_var.csv"
    run_cli("mean-var", "--input", str(out / "shard_*.h5ad"), "--batch-key", "source", "--output", str(output),
            "--quiet")
    table = pd.read_csv(output)
    np.testing.assert_array_equal(table["gene"].astype(str), plain["genes"])
    assert_relative(table["mean"].to_numpy(), plain["mean"])  # the plain layout's, checked against numpy
    assert_relative(table["var"].to_numpy(), plain["var"])


def test_raw_counts_of_cellxgene_style_shards(cells, plain, tmp_path: Path) -> None:
    shards = [cellxgene_style(p) for p in parts(cells)]
    collection = run_convert(write(shards, tmp_path / "in"), tmp_path / "out", counts="raw", var_names="feature_name")
    np.testing.assert_array_equal(collection.var_names_g, plain["genes"])
    assert collection.counts == "X"  # the converted shards hold the counts in X
    assert_plain_statistics(collection, plain)
    var = ad.read_h5ad(tmp_path / "out" / "shard_00001.h5ad").var
    # raw/var's columns are kept, and its old (Ensembl-like) index as var_index
    np.testing.assert_array_equal(var["feature_name"].astype(str), plain["genes"])
    np.testing.assert_array_equal(var["var_index"], shards[0].raw.var_names)


def test_inner_and_outer_gene_joins(cells, plain, tmp_path: Path) -> None:
    shards, lacking = gene_subsets(cells)
    paths = write(shards, tmp_path / "in")
    inner = run_convert(paths, tmp_path / "inner", gene_join="inner")
    shared = np.delete(np.asarray(cells.var_names), np.concatenate(lacking))
    assert set(inner.var_names_g) == set(shared)
    assert_plain_statistics(inner, plain, genes=inner.var_names_g)

    outer = run_convert(paths, tmp_path / "outer", gene_join="outer")
    assert set(outer.var_names_g) == set(cells.var_names) and not outer.partial_genes
    # Genes a shard lacks are zeros in the output; the others are the shard's counts.
    expected = pd.concat([pd.DataFrame(s.X.toarray(), index=s.obs_names, columns=s.var_names)
                          .reindex(columns=outer.var_names_g, fill_value=0) for s in shards])
    back = converted_anndata(tmp_path / "outer")
    np.testing.assert_array_equal(back.X.toarray(), expected.to_numpy())
    model = mean_var(outer)
    assert_relative(model.mean_g.numpy(), expected.to_numpy().mean(0))
    assert_relative(model.var_g.numpy(), expected.to_numpy().var(0))
    manifest = json.loads((tmp_path / "outer" / MANIFEST).read_text())
    assert manifest["unmeasured_genes_are_zero"] and [i["n_genes_missing"] for i in manifest["inputs"]] == [300] * 3


def test_obs_filter_keeps_the_cells_pandas_keeps_also_from_csc(cells, tmp_path: Path) -> None:
    expression = "n_genes >= 600 and chemistry != '10x_5p_v1'"
    paths = write_layout(parts(cells), tmp_path / "in", "csc")
    run_convert(paths, tmp_path / "out", obs_filter=expression)
    kept = cells.obs.assign(n_genes=np.diff(cells.X.indptr)).query(expression)
    assert 0 < len(kept) < N_CELLS
    back = converted_anndata(tmp_path / "out")
    np.testing.assert_array_equal(back.obs_names, kept.index)
    assert (back.X != cells[kept.index].X).nnz == 0


def test_shuffle_is_a_seeded_permutation_that_mixes_the_inputs(cells, tmp_path: Path) -> None:
    paths = write_layout(parts(cells), tmp_path / "in", "gzip")
    source = {name: s for s, path in enumerate(paths) for name in ad.read_h5ad(path, backed="r").obs_names}
    summary = convert(inputs=paths, output=str(tmp_path / "a"), cells_per_shard=CELLS_PER_SHARD, batch_size=WINDOW,
                      shuffle=True, seed=3)
    assert summary.spilled_cells > 0  # the shuffled cells waited on disk
    assert not os.path.exists(tmp_path / "a" / ".spill")
    a = converted_anndata(tmp_path / "a")
    assert sorted(a.obs_names) == sorted(cells.obs_names) and a.obs_names.is_unique  # every cell exactly once
    assert not np.array_equal(a.obs_names, cells.obs_names)
    assert (a.X != cells[a.obs_names].X).nnz == 0  # each with its own counts and obs
    pd.testing.assert_frame_equal(a.obs.astype(str), cells.obs.loc[a.obs_names].astype(str))
    for path in sorted(glob.glob(str(tmp_path / "a" / "shard_*.h5ad"))):
        names = ad.read_h5ad(path, backed="r").obs_names
        assert {source[n] for n in names} == {0, 1, 2}  # every output shard mixes every input

    # The same seed gives the same shards, whatever the read window; another seed another order.
    convert(inputs=paths, output=str(tmp_path / "b"), cells_per_shard=CELLS_PER_SHARD, batch_size=333, shuffle=True,
            seed=3)
    b = converted_anndata(tmp_path / "b")
    np.testing.assert_array_equal(b.obs_names, a.obs_names)
    assert (b.X != a.X).nnz == 0
    convert(inputs=paths, output=str(tmp_path / "c"), cells_per_shard=CELLS_PER_SHARD, shuffle=True, seed=4)
    assert not np.array_equal(converted_anndata(tmp_path / "c").obs_names, a.obs_names)


def test_obs_columns_keep_their_types_and_consistent_categories(cells, tmp_path: Path) -> None:
    shards = parts(cells)
    for s, shard in enumerate(shards):  # different categories per shard, and numbers of two widths
        shard.obs["group"] = pd.Categorical([f"g{s}"] * shard.n_obs)
        shard.obs["depth"] = np.asarray(shard.X.sum(1)).ravel().astype(np.int32 if s == 0 else np.float64)
    paths = write(shards, tmp_path / "in")
    run_convert(paths, tmp_path / "out", obs_columns="group,depth", batch_key="chemistry")
    files = sorted(glob.glob(str(tmp_path / "out" / "shard_*.h5ad")))
    for path in files:
        obs = ad.read_h5ad(path, backed="r").obs
        assert list(obs.columns) == ["group", "depth", "chemistry"]
        assert list(obs["group"].cat.categories) == ["g0", "g1", "g2"] and obs["depth"].dtype == np.float64
        assert list(obs["chemistry"].cat.categories) == list(ad.read_h5ad(files[0], backed="r").obs["chemistry"]
                                                             .cat.categories)
    back = converted_anndata(tmp_path / "out")
    np.testing.assert_array_equal(back.obs["group"].astype(str), np.repeat(["g0", "g1", "g2"],
                                                                           [s.n_obs for s in shards]))

    shards[1].obs["depth"] = shards[1].obs["depth"] > 1000  # a boolean where another shard has numbers
    paths = write(shards, tmp_path / "bad")
    with pytest.raises(InputError, match=rf"{paths[1]}: obs\['depth'\] is bool, but in {paths[0]} it is int32"):
        run_convert(paths, tmp_path / "never", obs_columns=["depth"])
    assert not (tmp_path / "never").exists()
    run_convert(paths, tmp_path / "default")  # not asked for by name: left out
    assert "depth" not in ad.read_h5ad(tmp_path / "default" / "shard_00000.h5ad", backed="r").obs


def test_a_killed_convert_leaves_nothing_at_the_final_names(cells, tmp_path: Path) -> None:
    paths = write_layout(parts(cells), tmp_path / "in", "gzip")
    out = tmp_path / "out"
    convert(inputs=paths, output=str(out), cells_per_shard=2000)  # an earlier, complete output
    earlier = sorted(os.listdir(out))
    call = (f"from cellarium_steps.pipelines.convert import convert; convert(inputs={paths!r}, output={str(out)!r}, "
            f"cells_per_shard={CELLS_PER_SHARD}, batch_size={WINDOW})")
    run_killed("shards.ShardBuckets._complete", "True", call)  # killed once the first shard is written
    assert sorted(os.listdir(out)) == earlier == [MANIFEST, "shard_00000.h5ad", "shard_00001.h5ad"]
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert (stale / "shard_00000.h5ad").exists()  # the partial run is only under the temporary name

    run_convert(paths, out)
    assert sorted(os.listdir(out)) == [MANIFEST, "shard_00000.h5ad", "shard_00001.h5ad", "shard_00002.h5ad"]
    assert not stale.exists()


def test_bad_input_is_one_line_naming_file_and_field_and_writes_nothing(cells, tmp_path: Path) -> None:
    small = cells[:300].copy()
    (good,) = write([small], tmp_path / "good")
    (norm,) = write([ad.AnnData(X=normalized(small.X), obs=small.obs, var=small.var)], tmp_path / "norm")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a convert output")
    out = tmp_path / "out"
    for args, message in (
        (["--input", good, "--obs-columns", "nope"], rf"{good}: obs has no column 'nope' \(--obs-columns\)"),
        (["--input", good, "--output", str(taken)], rf"--output: {taken} exists and is not an earlier convert's output"),
    ):
        result = run_cli("convert", "--output", str(out), *args, check=False)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr)
    for inputs, options, message in (
        ([norm], {}, rf"{norm}: no integer counts found \(--counts auto\)"),
        ([good], {"obs_filter": "tissue == 'blood'"}, rf"{good}: obs has no column 'tissue' \(--obs-filter"),
        ([good], {"output": str(tmp_path)}, rf"--output: {tmp_path} holds the input {good}"),
    ):
        with pytest.raises(InputError, match=message):
            run_convert(inputs, Path(options.pop("output", out)), **options)
    assert not out.exists() and sorted(os.listdir(taken)) == ["notes.txt"]


def test_csc_rows_over_many_column_blocks_and_windows(cells, tmp_path: Path) -> None:
    (path,) = write_layout([cells[:900].copy()], tmp_path, "csc-gzip")
    rows = CSCRows(path, "X", str(tmp_path / "buckets"), window_rows=128, block_entries=20_000)
    with Store(path) as store:
        rows.build(store)
    assert len(os.listdir(tmp_path / "buckets")) == 8
    wanted = np.array([0, 5, 127, 128, 129, 500, 899])
    x = rows.rows(wanted)
    assert x.has_canonical_format and (x != cells.X[wanted]).nnz == 0
    rows.close()
    assert not (tmp_path / "buckets").exists()


def workflow_config(tmp_path: Path, **keys) -> str:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "results": str(tmp_path / "results"), "convert": True, **keys}))
    return str(config)


def planned_commands(config: str) -> dict[str, str]:
    """Each planned step's shell command, by step (two predict jobs: the last one)."""
    plan = snakemake("-n", "-p", "--cores", "2", "--configfile", config).stdout
    # (a rule that may run over srun starts with its launcher, empty here)
    commands = [line.split("Shell command: ", 1)[1].strip() for line in plan.splitlines() if "Shell command: " in line]
    return {c.split()[1]: c for c in commands if c.startswith("cellarium-steps ")}


def test_the_workflow_reads_the_converted_shards_when_convert_is_on(tmp_path: Path) -> None:
    commands = planned_commands(workflow_config(tmp_path))
    results = tmp_path / "results"
    assert set(commands) >= {"simulate", "convert", "mean-var", "tdigest", "hvg", "pca", "train-scvi", "predict"}
    assert commands["convert"].startswith(f"cellarium-steps convert --input {results}/demo_shards/shard_000.h5ad "
                                          f"{results}/demo_shards/shard_001.h5ad ")
    assert f" --batch-key batch --output {results}/converted " in commands["convert"]
    assert "--shuffle" in commands["convert"] and "--obs-columns" not in commands["convert"]
    for step, command in commands.items():
        if step not in ("simulate", "convert", "report"):  # the report reads no shard
            assert f"--input '{results}/converted/shard_*.h5ad'" in command, command
    # a list of obs columns keeps the cell type key too (convert itself keeps the batch key's)
    config = workflow_config(tmp_path, convert_shards={"obs_columns": ["donor"], "shuffle": False})
    command = planned_commands(config)["convert"]
    assert "--obs-columns donor cell_type_ontology_term_id" in command and "--shuffle" not in command
    # The data options go to convert alone: the converted shards have the counts in X, the chosen genes
    # and only the kept cells, and no raw/X for a later --counts raw to find.
    data = {"counts": "raw", "var_names": "feature_name", "obs_filter": "n_genes >= 1"}
    commands = planned_commands(workflow_config(tmp_path, **data))
    assert commands["convert"].count("--counts raw --var-names feature_name --obs-filter 'n_genes >= 1'") == 1
    assert not [c for step, c in commands.items() if step != "convert" and ("--counts" in c or "--obs-filter" in c)]
    without = planned_commands(workflow_config(tmp_path, convert=False, **data))  # the inputs, read as configured
    assert "convert" not in without and "--counts raw" in without["mean-var"] and "--counts raw" in without["export"]


@pytest.mark.slow
def test_the_workflow_statistics_on_converted_demo_shards(tmp_path: Path) -> None:
    config = workflow_config(tmp_path, convert_shards={"cells_per_shard": 500})
    snakemake("statistics", "--cores", "2", "--configfile", config)
    results = tmp_path / "results"
    assert len(glob.glob(str(results / "converted" / "shard_*.h5ad"))) == 3  # 1,200 demo cells
    direct = tmp_path / "direct.csv"
    run_cli("mean-var", "--input", str(results / "demo_shards" / "*.h5ad"), "--batch-key", "batch",
            "--output", str(direct), "--quiet")
    ours, expected = pd.read_csv(results / "statistics" / "mean_var.csv"), pd.read_csv(direct)
    assert_relative(ours["mean"].to_numpy(), expected["mean"].to_numpy())
    assert_relative(ours["var"].to_numpy(), expected["var"].to_numpy())
