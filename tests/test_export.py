"""The export step: the streaming join of per-cell outputs with the shards' obs, partitioned, atomic."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
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
from cellarium_steps.outputs.cells import NULL_PARTITION, export_cells, export_genes, partition_dir
from cellarium_steps.outputs.tables import PROVENANCE_KEY

N_CELLS = 500
STRING_PARTITIONS = ds.partitioning(pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("export_shards")
    return simulate_shards(str(directory), n_cells=N_CELLS, n_genes=40, n_batches=3, n_cell_types=3, n_shards=3, seed=1)


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


def test_a_killed_export_leaves_nothing_and_a_rerun_completes(tmp_path: Path, shards: list[str],
                                                              inputs: dict[str, str]) -> None:
    out = tmp_path / "cells.parquet"
    out.mkdir()
    (out / "old.parquet").write_text("an earlier run's output")
    # Killed (SIGKILL, no clean-up) right after the first row group reached the disk.
    script = textwrap.dedent(f"""
        import os, signal
        from cellarium_steps.outputs import cells
        flush = cells.PartitionedWriter._flush
        def flush_then_die(self, part, n=None):
            flush(self, part, n)
            os.kill(os.getpid(), signal.SIGKILL)
        cells.PartitionedWriter._flush = flush_then_die
        cells.export_cells({shards!r}, {list(inputs.values())!r}, {str(out)!r}, dataset="d", batch_key="batch",
                           row_group_size=20, chunk_size=50)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
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
