"""export --anndata: the per-cell outputs written back into one .h5ad per shard, in the Parquet export's pass."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import test_export
from conftest import run_cli
from test_export import N_CELLS, embedding_table, read_export, run_killed, write_parts

from cellarium_steps.data.errors import InputError
from cellarium_steps.outputs import shard_anndata
from cellarium_steps.outputs.cells import export_cells
from cellarium_steps.outputs.shard_anndata import ShardAnnDataWriter

# test_export's fixtures: the shards (obs columns of every kind) and the per-cell inputs written for them
shards, obs, inputs = test_export.shards, test_export.obs, test_export.inputs


def parquet_rows(path: str | Path, column: str) -> pd.Series:
    table = ds.dataset(path, format="parquet", partitioning="hive").to_table(columns=["cell_id", column])
    return pd.Series(table.column(column).to_pylist(), index=table.column("cell_id").to_pylist())


def test_one_pass_writes_the_parquet_and_one_h5ad_per_shard(tmp_path: Path, shards: list[str],
                                                            inputs: dict[str, str]) -> None:
    out, directory = tmp_path / "cells.parquet", tmp_path / "anndata"
    run_cli("export", "--input", *shards, "--batch-key", "batch", "--cells", *inputs.values(), "--batch-size", "64",
            "--output", str(out), "--anndata", str(directory))
    latent = parquet_rows(out, "scvi_latent")
    assert sorted(p.name for p in directory.iterdir()) == [Path(p).name for p in shards]

    for path in shards:
        source, written = ad.read_h5ad(path), ad.read_h5ad(directory / Path(path).name)
        assert written.X is None and written.shape == source.shape
        assert list(written.obs_names) == list(source.obs_names)
        pd.testing.assert_frame_equal(written.obs[list(source.obs.columns)], source.obs)  # values and dtypes
        assert isinstance(written.obs["donor"].dtype, pd.CategoricalDtype)
        pd.testing.assert_frame_equal(written.var, source.var)
        np.testing.assert_array_equal(written.obsm["X_scVI"], np.stack(latent.loc[source.obs_names]))
        np.testing.assert_array_equal(written.obsm["X_pca"], np.stack(parquet_rows(out, "pca").loc[source.obs_names]))
        assert written.obsm["X_scVI"].dtype == np.float32
        # the shards already have cell_type_ontology_term_id and cell_type: the predictions get the prefix
        for column in ("cell_type_ontology_term_id", "cell_type", "cell_type_probability"):
            name = column if column == "cell_type_probability" else f"predicted_{column}"
            expected = parquet_rows(out, column).loc[source.obs_names].to_numpy()
            np.testing.assert_array_equal(written.obs[name].to_numpy(), expected)
        assert json.loads(written.uns["cellarium_steps"])["export"]["step"] == "export"


def test_the_readme_one_liner_puts_the_latent_on_the_users_anndata(tmp_path: Path, shards: list[str],
                                                                  inputs: dict[str, str]) -> None:
    directory = tmp_path / "anndata"
    export_cells(shards, list(inputs.values()), None, dataset="d", anndata=str(directory))
    # the user's own AnnData: every cell of the shards, in another order
    adata = ad.concat([ad.read_h5ad(p) for p in shards])
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()

    adata.obsm["X_scVI"] = ad.concat([ad.read_h5ad(p) for p in sorted(glob.glob(f"{directory}/*.h5ad"))])[
        adata.obs_names].obsm["X_scVI"]

    latent = parquet_rows(inputs["scvi"], "scvi_latent")
    np.testing.assert_array_equal(adata.obsm["X_scVI"], np.stack(latent.loc[adata.obs_names]))


def test_predictions_keep_their_names_where_obs_has_none(tmp_path: Path, shards: list[str],
                                                        inputs: dict[str, str]) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    paths = []
    for path in shards:
        a = ad.read_h5ad(path)
        a.obs = a.obs.drop(columns=["cell_type", "cell_type_ontology_term_id"])
        paths.append(str(bare / Path(path).name))
        a.write_h5ad(paths[-1])
    summary = export_cells(paths, [inputs["socam"]], None, dataset="d", anndata=str(tmp_path / "anndata"))
    written = ad.read_h5ad(summary.anndata[0])
    assert list(written.obs.columns[-3:]) == ["cell_type_ontology_term_id", "cell_type", "cell_type_probability"]
    assert written.obs["cell_type_probability"].dtype == np.float32 and not written.obsm  # no vector input


def test_obsm_is_written_chunk_by_chunk(tmp_path: Path, shards: list[str], inputs: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, int, int]] = []
    write_rows = ShardAnnDataWriter.write_rows

    def recorded(self: ShardAnnDataWriter, dataset, start: int, values: np.ndarray) -> None:
        writes.append((dataset.name, start, len(values)))
        write_rows(self, dataset, start, values)

    monkeypatch.setattr(ShardAnnDataWriter, "write_rows", recorded)
    summary = export_cells(shards, [inputs["scvi"]], None, dataset="d", anndata=str(tmp_path / "anndata"),
                           chunk_size=40)
    assert summary.n_cells == N_CELLS
    sizes = [ad.read_h5ad(p, backed="r").n_obs for p in shards]
    assert [n for name, _, n in writes if name == "/obsm/X_scVI"] == [
        min(40, size - start) for size in sizes for start in range(0, size, 40)]  # no write exceeds a chunk
    assert max(n for _, _, n in writes) == 40


def test_a_killed_export_leaves_no_h5ad_and_a_rerun_completes(tmp_path: Path, shards: list[str],
                                                              inputs: dict[str, str]) -> None:
    directory = tmp_path / "anndata"
    directory.mkdir()
    (directory / "shard_000.h5ad").write_text("an earlier run's file")
    # Killed once the second shard's file has had rows written: the first shard's file is complete.
    run_killed("shard_anndata.ShardAnnDataWriter.write_rows", "'shard_001' in args[0].file.filename",
               f"cells.export_cells({shards!r}, {list(inputs.values())!r}, {str(tmp_path / 'cells.parquet')!r}, "
               f"dataset='d', anndata={str(directory)!r}, chunk_size=50)")
    names = sorted(p.name for p in directory.iterdir())
    assert [n for n in names if not n.startswith(".")] == ["shard_000.h5ad"]  # only the old file under a real name
    assert (directory / "shard_000.h5ad").read_text() == "an earlier run's file"
    assert [n.split(".tmp-")[0] for n in names if n.startswith(".")] == [".shard_000.h5ad", ".shard_001.h5ad"]
    assert not (tmp_path / "cells.parquet").exists()

    summary = export_cells(shards, list(inputs.values()), str(tmp_path / "cells.parquet"), dataset="d",
                           anndata=str(directory), chunk_size=50)
    assert sorted(p.name for p in directory.iterdir()) == [Path(p).name for p in shards]  # stale temporaries gone
    assert sum(ad.read_h5ad(p).n_obs for p in summary.anndata) == N_CELLS == read_export(tmp_path / "cells.parquet").num_rows


def test_a_failed_pass_publishes_no_h5ad(tmp_path: Path, shards: list[str], obs: pd.DataFrame) -> None:
    ids = obs["cell_id"].tolist()
    ids[-1], ids[-2] = ids[-2], ids[-1]  # found in the last shard, after the first two shards' files are complete
    stale = write_parts(tmp_path / "stale", embedding_table(ids, "scvi_latent", 4, 1), [], 100)
    directory = tmp_path / "anndata"
    with pytest.raises(InputError, match=f"row {N_CELLS - 2} has cell_id"):
        export_cells(shards, [stale], None, dataset="d", anndata=str(directory), chunk_size=50)
    assert not list(directory.iterdir())


def test_shards_with_the_same_file_name_are_an_error_before_the_pass(tmp_path: Path, shards: list[str],
                                                                      inputs: dict[str, str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = other / Path(shards[0]).name
    ad.read_h5ad(shards[0]).write_h5ad(twin)
    ids = [*ad.read_h5ad(shards[0], backed="r").obs_names, *ad.read_h5ad(twin, backed="r").obs_names]
    latent = write_parts(tmp_path / "latent", embedding_table(ids, "scvi_latent", 4, 1), [], 100)
    monkeypatch.setattr(shard_anndata.ShardAnnDataWriter, "write", None)  # the pass must not start
    with pytest.raises(InputError, match="would both be written to"):
        export_cells([shards[0], str(twin)], [latent], None, dataset="d", anndata=str(tmp_path / "anndata"))
    with pytest.raises(InputError, match="give --output, --anndata or both"):
        export_cells(shards, [inputs["scvi"]], None, dataset="d")


def test_workflow_export_keys_plan_the_anndata_output_and_options(tmp_path: Path) -> None:
    """Dry run: the config keys are accepted (off by default) and reach the export command."""
    import yaml
    from test_workflow import snakemake

    def export_command(*args: str) -> tuple[str, str]:
        result = snakemake("-n", "-p", "--cores", "1", *args)
        plan = result.stdout + result.stderr
        return plan, next(line for line in plan.splitlines() if "cellarium-steps export " in line)

    plan, command = export_command("--config", f"results={tmp_path}/default")
    assert "--anndata" not in command and "--layout-2d" not in command and f"{tmp_path}/default/export/anndata" not in plan

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "seed": 5, "export": {
        "anndata": True, "obs_columns": ["donor", "tissue"], "layout_2d": True, "layout_method": "pca"}}))
    plan, command = export_command("--configfile", str(config))
    for option in (f"--anndata {tmp_path}/results/export/anndata", "--obs-columns donor tissue", "--layout-2d",
                   "--layout-method pca", "--seed 5"):
        assert option in command
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "export": {"layout_method": "tsne"}}))
    assert snakemake("-n", "--cores", "1", "--configfile", str(config), check=False).returncode != 0
