"""The export step: the streaming join of per-cell outputs with the shards' obs, partitioned, atomic."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from cellarium_steps.data.errors import InputError
from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.models._reservoir import ReservoirSampler
from cellarium_steps.outputs.cells import NULL_PARTITION, export_cells, export_genes, part_files, partition_dir
from cellarium_steps.outputs.layout import LayoutOptions, sample_vectors
from cellarium_steps.outputs.tables import PROVENANCE_KEY

N_CELLS = 500
STRING_PARTITIONS = ds.partitioning(pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive")


#: obs columns of every kind a user's shards have, added to the simulated ones (batch, cell_type_ontology_term_id
#: and cell_type, categoricals); n_counts is int64 in the first shard and int32 in the others
OBS_KINDS = ("donor", "n_counts", "pct_mito", "is_doublet", "note", "age")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("export_shards")
    paths = simulate_shards(str(directory), n_cells=N_CELLS, n_genes=40, n_batches=3, n_cell_types=3, n_shards=3,
                            seed=1)
    for i, path in enumerate(paths):
        a = ad.read_h5ad(path)
        rng = np.random.default_rng(i)
        n = a.n_obs
        a.obs["donor"] = pd.Categorical(rng.choice([f"donor{i}", f"donor{i + 1}"], n))  # categories differ by shard
        a.obs["n_counts"] = rng.integers(0, 10_000, n).astype(np.int64 if i == 0 else np.int32)
        a.obs["pct_mito"] = rng.random(n).astype(np.float32)
        a.obs["is_doublet"] = rng.random(n) < 0.1
        a.obs["note"] = np.array([f"note {i}-{j}" for j in range(n)], dtype=object)
        a.obs["age"] = pd.array([None if j % 7 == 0 else 20 + j % 50 for j in range(n)], dtype="Int64")
        a.write_h5ad(path, convert_strings_to_categoricals=False)
    return paths


@pytest.fixture(scope="module")
def obs(shards: list[str]) -> pd.DataFrame:
    """Every cell in shard order: cell_id, shard, batch."""
    frames = []
    for path in shards:
        a = ad.read_h5ad(path, backed="r")
        frames.append(pd.DataFrame({"cell_id": a.obs_names.astype(str), "shard": Path(path).stem,
                                    "batch": a.obs["batch"].astype(str).to_numpy()}))
        a.file.close()
    return pd.concat(frames, ignore_index=True)


def write_parts(directory: Path, table: pa.Table, splits: list[int], row_group_size: int) -> str:
    """A per-cell dataset as predict writes it: part files in rank order, several row groups each."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [0, *splits, table.num_rows]
    for rank, (a, b) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(a, b - a), directory / f"part-{rank:05d}.parquet", row_group_size=row_group_size)
    return str(directory)


def embedding_table(ids: list[str], column: str, dim: int, seed: int) -> pa.Table:
    values = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    meta = {PROVENANCE_KEY: json.dumps({"step": column}).encode()}
    return pa.table({"cell_id": pa.array(ids), column: pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)},
                    metadata=meta)


def socam_table(ids: list[str]) -> pa.Table:
    n = len(ids)
    p = np.random.default_rng(2).uniform(0.5, 1.0, size=n).astype(np.float32)
    top = np.stack([p, p / 2, p / 4], axis=1).astype(np.float32)
    return pa.table({
        "cell_id": pa.array(ids),
        "cell_type_ontology_term_id": pa.array(["CL:0000236"] * n),
        "cell_type": pa.array(["B cell"] * n),
        "cell_type_probability": pa.array(p),
        "cell_type_top_k_ontology_term_id": pa.array([["CL:0000236", "CL:0000624", "CL:0000625"]] * n,
                                                     pa.list_(pa.string())),
        "cell_type_top_k_probability": pa.FixedSizeListArray.from_arrays(pa.array(top.ravel()), 3),
    })


@pytest.fixture()
def inputs(tmp_path: Path, obs: pd.DataFrame) -> dict[str, str]:
    ids = obs["cell_id"].tolist()
    return {
        "pca": write_parts(tmp_path / "pca", embedding_table(ids, "pca", 5, 0), [123], row_group_size=37),
        "scvi": write_parts(tmp_path / "scvi", embedding_table(ids, "scvi_latent", 4, 1), [250, 251], 64),
        "socam": write_parts(tmp_path / "socam", socam_table(ids), [], 100),
    }


def read_export(path: Path) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning=STRING_PARTITIONS).to_table()


def test_export_joins_every_input_in_partitions(tmp_path: Path, shards: list[str], obs: pd.DataFrame,
                                                inputs: dict[str, str]) -> None:
    out = tmp_path / "export" / "cells.parquet"
    run_cli("export", "--input", *shards, "--batch-key", "batch", "--cells", *inputs.values(), "--dataset", "demo",
            "--row-group-size", "60", "--batch-size", "77", "--output", str(out))

    table = read_export(out)
    assert table.num_rows == N_CELLS
    assert table.schema.names == ["cell_id", "shard", "pca", "scvi_latent", "cell_type_ontology_term_id", "cell_type",
                                  "cell_type_probability", "cell_type_top_k_ontology_term_id",
                                  "cell_type_top_k_probability", "dataset", "batch"]
    assert table.schema.field("pca").type == pa.list_(pa.float32(), 5)
    got = table.to_pandas().set_index("cell_id")
    assert got.index.is_unique
    expected = obs.set_index("cell_id")
    assert (got.loc[expected.index, "batch"] == expected["batch"]).all()
    assert (got.loc[expected.index, "shard"] == expected["shard"]).all()
    assert set(got["dataset"]) == {"demo"}
    source = ds.dataset(inputs["scvi"]).to_table().to_pandas().set_index("cell_id")
    np.testing.assert_array_equal(np.stack(got.loc[source.index, "scvi_latent"]), np.stack(source["scvi_latent"]))

    files = sorted(out.rglob("*.parquet"))
    assert [f.relative_to(out).parts[:2] for f in files] == [("dataset=demo", f"batch={b}") for b in sorted(set(obs["batch"]))]
    for f in files:
        meta = pq.ParquetFile(f).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(sizes) <= 60 and sum(sizes[:-1]) == 60 * (len(sizes) - 1)  # full groups, then the rest
        assert meta.row_group(0).column(0).compression == "ZSTD"
        provenance = json.loads(pq.read_schema(f).metadata[PROVENANCE_KEY])
        assert provenance["export"]["step"] == "export" and "versions" in provenance["export"]
        assert provenance["inputs"][inputs["pca"]] == {"step": "pca"}
    # within a partition, cells keep the shards' order
    order = {c: i for i, c in enumerate(obs["cell_id"])}
    first = pq.read_table(files[0]).column("cell_id").to_pylist()
    assert first == sorted(first, key=order.__getitem__)

    ((count, distinct, batches),) = duckdb.sql(
        f"select count(*), count(distinct cell_id), count(distinct batch) "
        f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert (count, distinct, batches) == (N_CELLS, N_CELLS, obs["batch"].nunique())


def test_a_mismatched_input_is_an_error_naming_it(tmp_path: Path, shards: list[str], obs: pd.DataFrame,
                                                  inputs: dict[str, str]) -> None:
    ids = obs["cell_id"].tolist()
    ids[300], ids[301] = ids[301], ids[300]
    shuffled = write_parts(tmp_path / "shuffled", embedding_table(ids, "scvi_latent", 4, 1), [100], 50)
    out = tmp_path / "cells.parquet"
    result = run_cli("export", "--input", *shards, "--batch-key", "batch", "--cells", inputs["pca"], shuffled,
                     "--output", str(out), check=False)
    assert result.returncode == 2
    assert shuffled in result.stderr and "row 300" in result.stderr and repr(ids[300]) in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".cells.parquet")]

    short = write_parts(tmp_path / "short", embedding_table(obs["cell_id"].tolist()[:-1], "x", 2, 0), [], 50)
    with pytest.raises(InputError, match=f"{short}: {N_CELLS - 1} rows"):
        export_cells(shards, [short], str(out), dataset="d")
    with pytest.raises(InputError, match="column 'pca' is also written by"):
        export_cells(shards, [inputs["pca"], inputs["pca"]], str(out), dataset="d")
    assert not out.exists()


def run_killed(method: str, condition: str, call: str) -> None:
    """Run ``call`` in a fresh interpreter where ``method`` (of cellarium_steps.outputs' ``cells``,
    ``shard_anndata`` or ``shards``) kills the process (SIGKILL: no clean-up) after it ran once ``condition`` (an expression
    over its positional arguments ``args``) holds."""
    script = "\n".join([
        "import os, signal",
        "from cellarium_steps.outputs import cells, shard_anndata, shards",
        f"original = {method}",
        "def then_die(self, *args):",
        "    original(self, *args)",
        f"    if {condition}:",
        "        os.kill(os.getpid(), signal.SIGKILL)",
        f"{method} = then_die",
        call,
    ])
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr


def test_a_killed_export_leaves_nothing_and_a_rerun_completes(tmp_path: Path, shards: list[str],
                                                              inputs: dict[str, str]) -> None:
    out = tmp_path / "cells.parquet"
    out.mkdir()
    (out / "old.parquet").write_text("an earlier run's output")
    # Killed right after the first row group reached the disk.
    run_killed("cells.PartitionedWriter._flush", "True",
               f"cells.export_cells({shards!r}, {list(inputs.values())!r}, {str(out)!r}, dataset='d', "
               "batch_key='batch', row_group_size=20, chunk_size=50)")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".cells.parquet.tmp-")]
    assert len(stale) == 1 and any(stale[0].rglob("*.parquet"))  # the partial dataset is only under the temporary name
    assert sorted(p.name for p in out.iterdir()) == ["old.parquet"]  # the old output is untouched

    summary = export_cells(shards, list(inputs.values()), str(out), dataset="d", batch_key="batch", row_group_size=20,
                           chunk_size=50)
    assert summary.n_cells == N_CELLS
    assert not (out / "old.parquet").exists() and read_export(out).num_rows == N_CELLS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cells.parquet.tmp-")]


def test_memory_bound_flushes_early_and_no_batch_key_gives_null_partition(tmp_path: Path, shards: list[str],
                                                                        inputs: dict[str, str]) -> None:
    out = tmp_path / "cells.parquet"
    summary = export_cells(shards, [inputs["pca"]], str(out), dataset="d", batch_key="batch", row_group_size=100,
                           max_buffered_rows=100, chunk_size=64)
    assert summary.n_cells == N_CELLS and read_export(out).num_rows == N_CELLS
    assert summary.row_groups > N_CELLS // 100  # smaller groups: the bound forced early writes

    out2 = tmp_path / "nobatch.parquet"
    export_cells(shards, [inputs["pca"]], str(out2), dataset="d", batch_key=None)
    assert [p.name for p in (out2 / "dataset=d").iterdir()] == [f"batch={NULL_PARTITION}"]
    assert read_export(out2).column("batch").null_count == N_CELLS


def test_partition_values_are_encoded_for_paths() -> None:
    assert partition_dir("batch", "sorted:B") == "batch=sorted:B"
    assert partition_dir("batch", "a/b%c") == "batch=a%2Fb%25c"
    assert partition_dir("batch", None) == f"batch={NULL_PARTITION}"


def test_genes_table_joins_mean_var_and_hvg(tmp_path: Path) -> None:
    mean_var = tmp_path / "mean_var.csv"
    hvg = tmp_path / "hvg.csv"
    pd.DataFrame({"gene": ["A", "B", "C"], "mean": [1.0, 2.0, 3.0], "var": [1.0, 4.0, 9.0], "std": [1.0, 2.0, 3.0]}
                 ).to_csv(mean_var, index=False)
    pd.DataFrame({"gene": ["C", "A", "B"], "means": [3.0, 1.0, 2.0], "highly_variable": [True, False, True]}
                 ).to_csv(hvg, index=False)
    out = tmp_path / "genes.parquet"
    export_genes(str(mean_var), str(hvg), str(out), {"step": "export"})
    genes = pd.read_parquet(out)
    assert genes["gene"].tolist() == ["A", "B", "C"]
    assert genes["highly_variable"].tolist() == [False, True, True] and genes["means"].tolist() == [1.0, 2.0, 3.0]
    assert os.path.isfile(out) and json.loads(pq.read_schema(out).metadata[PROVENANCE_KEY]) == {"step": "export"}


# -- dashboards: obs columns and a 2-D layout ---------------------------------------------------------------


def shards_obs(shards: list[str]) -> pd.DataFrame:
    """Every shard's full obs in shard order, indexed by cell name."""
    return pd.concat([ad.read_h5ad(p, backed="r").obs for p in shards])


def test_obs_columns_keep_their_types(tmp_path: Path, shards: list[str], inputs: dict[str, str]) -> None:
    out = tmp_path / "cells.parquet"
    # commas and separate arguments; cell_type is also a SOCAM column, so the obs one becomes obs_cell_type
    run_cli("export", "--input", *shards, "--batch-key", "batch", "--cells", *inputs.values(), "--batch-size", "64",
            "--obs-columns", "donor,n_counts", "pct_mito", "is_doublet,note,age", "cell_type", "--output", str(out))

    parquet = f"read_parquet('{out}/**/*.parquet', hive_partitioning=true)"
    types = dict(duckdb.sql(f"select column_name, column_type from (describe select * from {parquet})").fetchall())
    assert {c: types[c] for c in (*OBS_KINDS, "obs_cell_type", "cell_type")} == {
        "donor": "VARCHAR", "n_counts": "BIGINT", "pct_mito": "FLOAT", "is_doublet": "BOOLEAN", "note": "VARCHAR",
        "age": "BIGINT", "obs_cell_type": "VARCHAR", "cell_type": "VARCHAR"}
    schema = read_export(out).schema
    assert schema.field("donor").type == pa.dictionary(pa.int32(), pa.string())  # the categorical, as a dictionary
    assert schema.field("note").type == pa.string()

    got = duckdb.sql(f"select cell_id, {', '.join(OBS_KINDS)}, obs_cell_type from {parquet}").df().set_index("cell_id")
    expected = shards_obs(shards)
    got = got.loc[expected.index]
    assert (got["donor"] == expected["donor"].astype(str)).all()
    assert (got["obs_cell_type"] == expected["cell_type"].astype(str)).all()
    np.testing.assert_array_equal(got["n_counts"].to_numpy(), expected["n_counts"].to_numpy())
    np.testing.assert_array_equal(got["pct_mito"].to_numpy(), expected["pct_mito"].to_numpy())
    np.testing.assert_array_equal(got["is_doublet"].to_numpy(), expected["is_doublet"].to_numpy())
    assert (got["note"] == expected["note"]).all()
    assert got["age"].isna().sum() == expected["age"].isna().sum() > 0  # nullable integers keep their nulls
    assert (got["age"].dropna() == expected["age"].dropna()).all()
    ((n_doublets,),) = duckdb.sql(f"select count(*) from {parquet} where is_doublet and donor = 'donor1'").fetchall()
    assert n_doublets == int((expected["is_doublet"] & (expected["donor"] == "donor1")).sum())


def test_a_missing_obs_column_is_an_error_before_the_pass(tmp_path: Path, shards: list[str], inputs: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # only the last shard lacks the column: the error names that shard
    partial = tmp_path / "partial"
    partial.mkdir()
    copies = [str(partial / Path(p).name) for p in shards]
    for source, copy in zip(shards, copies):
        a = ad.read_h5ad(source)
        if copy == copies[-1]:
            del a.obs["donor"]
        a.write_h5ad(copy)
    out = tmp_path / "cells.parquet"
    result = run_cli("export", "--input", *copies, "--cells", inputs["pca"], "--obs-columns", "donor",
                     "--output", str(out), "--anndata", str(tmp_path / "anndata"), check=False)
    assert result.returncode == 2
    assert copies[-1] in result.stderr and "'donor'" in result.stderr and copies[0] not in result.stderr
    assert not out.exists() and not (tmp_path / "anndata").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    from cellarium_steps.outputs import cells

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pass started")

    monkeypatch.setattr(cells, "iter_obs", no_pass)
    with pytest.raises(InputError, match=r"obs has no column 'tissue'"):
        export_cells(shards, [inputs["pca"]], str(out), dataset="d", obs_columns=["donor", "tissue"])


def layout_values(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).combine_chunks().flatten().to_numpy().reshape(table.num_rows, 2)


def export_with_layout(out: Path, shards: list[str], inputs: dict[str, str], **options: object) -> pa.Table:
    export_cells(shards, [inputs["pca"], inputs["scvi"]], str(out), dataset="d", batch_key="batch", chunk_size=70,
                 layout=LayoutOptions(**options))
    return read_export(out).sort_by("cell_id")


def test_pc_2d_layout_is_forced_deterministic_and_the_latents_first_components(
        tmp_path: Path, shards: list[str], inputs: dict[str, str]) -> None:
    table = export_with_layout(tmp_path / "a", shards, inputs, method="pca", sample_size=N_CELLS, seed=3)
    assert table.schema.field("pc_2d").type == pa.list_(pa.float32(), 2) and "umap_2d" not in table.schema.names
    xy = layout_values(table, "pc_2d")
    # a sample of every cell: the exact first two principal components of the latent (up to sign)
    z = table.column("scvi_latent").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1).astype(float)
    centred = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(xy), np.abs(centred @ vt[:2].T), atol=1e-4)

    small = {"method": "pca", "sample_size": 100}
    first = layout_values(export_with_layout(tmp_path / "b", shards, inputs, seed=7, **small), "pc_2d")
    again = layout_values(export_with_layout(tmp_path / "c", shards, inputs, seed=7, **small), "pc_2d")
    other = layout_values(export_with_layout(tmp_path / "d", shards, inputs, seed=8, **small), "pc_2d")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # another seed, another sample


def test_auto_layout_falls_back_to_pcs_without_umap_learn(tmp_path: Path, shards: list[str], inputs: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from cellarium_steps.outputs import layout

    monkeypatch.setattr(layout, "umap_available", lambda: False)
    table = export_with_layout(tmp_path / "a", shards, inputs, method="auto", sample_size=200)
    assert "pc_2d" in table.schema.names and "umap_2d" not in table.schema.names
    with pytest.raises(InputError, match="needs umap-learn"):
        export_with_layout(tmp_path / "b", shards, inputs, method="umap")
    with pytest.raises(InputError, match="no --cells input has a column 'latent'"):
        export_with_layout(tmp_path / "c", shards, inputs, method="pca", column="latent")


@pytest.mark.slow  # numba compiles umap-learn's kernels: about a minute on two cores
def test_umap_layout_is_deterministic_for_a_seed(tmp_path: Path, shards: list[str], inputs: dict[str, str]) -> None:
    pytest.importorskip("umap")
    first = export_with_layout(tmp_path / "a", shards, inputs, method="auto", sample_size=300, seed=1)
    again = export_with_layout(tmp_path / "b", shards, inputs, method="umap", sample_size=300, seed=1)
    assert first.schema.field("umap_2d").type == pa.list_(pa.float32(), 2)
    xy = layout_values(first, "umap_2d")
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0
    np.testing.assert_array_equal(xy, layout_values(again, "umap_2d"))


def test_the_layout_sample_does_not_depend_on_row_groups(tmp_path: Path) -> None:
    """A seed gives the same layout sample whatever the part files and row groups of the latent input
    (tests/test_reservoir.py checks the sampler itself)."""
    table = embedding_table([f"c{i}" for i in range(1000)], "scvi_latent", 3, seed=0)
    values = table.column("scvi_latent").combine_chunks().flatten().to_numpy().reshape(-1, 3)
    rows, slots = ReservoirSampler(20, seed=4).offer(1000)  # the whole column as one block
    expected = values[rows[np.argsort(slots)]]
    assert len(expected) == 20 and rows.max() >= 20  # not only the first rows

    one = write_parts(tmp_path / "one", table, [], row_group_size=1000)
    many = write_parts(tmp_path / "many", table, [100, 555], row_group_size=33)
    np.testing.assert_array_equal(sample_vectors(part_files(one), "scvi_latent", 20, seed=4), expected)
    np.testing.assert_array_equal(sample_vectors(part_files(many), "scvi_latent", 20, seed=4, batch_size=50), expected)
