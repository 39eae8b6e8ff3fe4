"""The real-data options at the command line: every step honours --obs-filter, a composite --batch-key,
--counts, --gene-join and .zarr shards, scVI's covariates go from training to prediction, and bad
input stops a step before its pass with one line naming the file and the field (exit code 2).

Shards are written from PBMC cells (tests/test_real_layouts.py builds the layouts).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from conftest import run_cli
from test_real_layouts import cells, cellxgene_style, gene_subsets, normalized, parts, write  # noqa: F401

from cellarium_steps.steps.cli import main as cli_main

FILTER = "n_genes >= 600 and condition == 'control'"
BATCH = ["study", "chemistry"]
CPU = ("--accelerator", "cpu", "--quiet")


def kept_obs(adata: ad.AnnData, expression: str = FILTER) -> pd.DataFrame:
    """pandas' answer: the obs rows the filter keeps (n_genes: stored entries per cell)."""
    return adata.obs.assign(n_genes=np.diff(adata.X.indptr)).query(expression)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-12)))


@pytest.fixture(scope="module")
def mixed_shards(cells: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> list[str]:  # noqa: F811
    """The cells as an .h5ad, a zarr (format 3) store and an .h5ad."""
    return write(parts(cells), tmp_path_factory.mktemp("mixed"), ["h5ad", "zarr3", "h5ad"])


def test_mean_var_with_filter_and_composite_batch_equals_pandas_groupby(cells, mixed_shards, tmp_path) -> None:  # noqa: F811
    output = tmp_path / "mean_var.csv"
    run_cli("mean-var", "--input", *mixed_shards, "--obs-filter", FILTER, "--batch-key", ",".join(BATCH),
            "--output", str(output), *CPU)
    kept = kept_obs(cells)
    position = pd.Series(np.arange(cells.n_obs), index=cells.obs_names)
    table = pd.read_parquet(output.with_suffix(".parquet"))
    groups = kept.groupby(BATCH, observed=True)
    assert sorted(table["batch"].unique()) == sorted("|".join(k) for k in groups.groups)
    for (study, chemistry), group in groups:
        x = cells.X[position[group.index].to_numpy()].toarray().astype(np.float64)
        rows = table[table["batch"] == f"{study}|{chemistry}"]
        np.testing.assert_array_equal(rows["gene"], cells.var_names)
        assert (rows["n_cells"] == len(group)).all()
        assert relative_error(rows["mean"].to_numpy(), x.mean(0)) < 1e-9
        assert relative_error(rows["var"].to_numpy(), x.var(0)) < 1e-9
    overall = pd.read_csv(output)
    assert list(overall.columns) == ["gene", "mean", "var", "std", "n_cells"]
    assert (overall["n_cells"] == len(kept)).all()
    x = cells.X[position[kept.index].to_numpy()].toarray().astype(np.float64)
    assert relative_error(overall["mean"].to_numpy(), x.mean(0)) < 1e-9


def test_outer_joined_statistics_count_the_cells_that_measured_each_gene(cells, tmp_path) -> None:  # noqa: F811
    """mean-var's and tdigest's n_cells per gene, and hvg given mean-var's table on outer-joined shards
    selects what its own two passes select."""
    shards, _ = gene_subsets(cells)
    paths = write(shards, tmp_path / "shards")
    common = ("--input", *paths, "--gene-join", "outer", *CPU)
    run_cli("mean-var", *common, "--batch-key", "study", "--output", str(tmp_path / "mv.csv"))
    run_cli("tdigest", *common, "--output", str(tmp_path / "td.csv"))
    measured = pd.concat([pd.Series(len(s), index=s.var_names) for s in shards], axis=1).sum(1)
    for table in (pd.read_csv(tmp_path / "mv.csv"), pd.read_csv(tmp_path / "td.csv")):
        np.testing.assert_array_equal(table["n_cells"], measured[table["gene"]].to_numpy())
    assert set(measured) == {cells.n_obs} | {cells.n_obs - len(s) for s in shards}  # a gene lacks <= 1 shard

    hvg = ("hvg", *common, "--batch-key", "study", "--n-top-genes", "500")
    run_cli(*hvg, "--mean-var", str(tmp_path / "mv.csv"), "--output", str(tmp_path / "one_pass.csv"))
    run_cli(*hvg, "--output", str(tmp_path / "two_passes.csv"))
    one, two = pd.read_csv(tmp_path / "one_pass.csv"), pd.read_csv(tmp_path / "two_passes.csv")
    np.testing.assert_array_equal(one["highly_variable"], two["highly_variable"])
    np.testing.assert_allclose(one["variances_norm"], two["variances_norm"], rtol=1e-6)
    # the table of other cells (another filter) is refused, naming the batch and the gene
    run_cli("mean-var", *common, "--batch-key", "study", "--obs-filter", "n_genes > 500",
            "--output", str(tmp_path / "other.csv"))
    result = run_cli(*hvg, "--mean-var", str(tmp_path / "other.csv"), "--output", str(tmp_path / "x.csv"),
                     check=False)
    assert result.returncode == 2 and "cells there but" in result.stderr and "gene" in result.stderr


def test_export_of_filtered_zarr_and_h5ad_shards_has_exactly_the_kept_cells(cells, mixed_shards, tmp_path) -> None:  # noqa: F811
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(cells.var_names[:300]))
    options = ("--input", *mixed_shards, "--obs-filter", FILTER, *CPU)
    run_cli("pca", *options, "--genes", str(genes), "--n-components", "5", "--output", str(tmp_path / "pca.parquet"),
            "--embeddings", str(tmp_path / "pca_cells"))
    run_cli("export", *options, "--batch-key", ",".join(BATCH), "--cells", str(tmp_path / "pca_cells"),
            "--obs-columns", "donor", "--output", str(tmp_path / "export"), "--anndata", str(tmp_path / "anndata"))
    kept = kept_obs(cells)
    table = ds.dataset(tmp_path / "export", partitioning="hive").to_table().to_pandas()
    assert sorted(table["cell_id"]) == sorted(kept.index) and len(table) == len(kept)
    by_cell = table.set_index("cell_id").loc[kept.index]
    np.testing.assert_array_equal(by_cell["batch"].astype(str), kept[BATCH].astype(str).agg("|".join, axis=1))
    np.testing.assert_array_equal(by_cell["donor"].astype(str), kept["donor"].astype(str))
    pca = pd.read_parquet(tmp_path / "pca_cells").set_index("cell_id")

    written = [ad.read_h5ad(tmp_path / "anndata" / f"shard_{i}.h5ad") for i in range(len(mixed_shards))]
    assert [list(a.obs_names) for a in written] == [list(p.obs_names) for p in parts(cells)]  # every cell
    together = ad.concat(written)
    embedded = together.obs_names.isin(kept.index)
    assert np.isnan(together.obsm["X_pca"][~embedded]).all()
    np.testing.assert_array_equal(together[kept.index].obsm["X_pca"], np.stack(pca.loc[kept.index, "pca"]))


# -- scVI: covariates and the counts matrix, from training to prediction ----------------------------------


@pytest.fixture(scope="module")
def scvi_run(cells: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """scVI trained with two categorical covariates and one continuous one, on counts in raw/X while X holds
    other integers (half the counts): `auto` would read X, so only the checkpoint's record gives raw."""
    directory = tmp_path_factory.mktemp("scvi")
    shards = []
    for part in parts(cells[:1500]):
        totals = np.asarray(part.X.sum(1)).ravel()
        obs = part.obs.assign(log_total=np.log1p(totals))
        halved = part.X.copy()
        halved.data //= 2
        halved.eliminate_zeros()
        shard = ad.AnnData(X=halved, obs=obs, var=part.var)
        shard.raw = ad.AnnData(X=part.X, var=part.var)
        shards.append(shard)
    paths = write(shards, directory / "shards")
    genes = directory / "genes.txt"
    genes.write_text("\n".join(cells.var_names[:400]))
    checkpoint = directory / "scvi.ckpt"
    run_cli("train-scvi", "--input", *paths, "--counts", "raw", "--batch-key", "study", "--genes", str(genes),
            "--categorical-covariate-keys", "chemistry,condition", "--continuous-covariate-keys", "log_total",
            "--max-epochs", "1", "--n-hidden", "16", "--n-latent", "4", "--batch-size", "256",
            "--output", str(checkpoint), *CPU)
    return {"paths": paths, "shards": shards, "checkpoint": str(checkpoint), "directory": directory}


def predict(run: dict, inputs: list[str], output: Path, *extra: str, check: bool = True):
    return run_cli("predict", "--checkpoint", run["checkpoint"], "--input", *inputs, "--output", str(output),
                   *extra, *CPU, check=check)


def latents(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    return pd.DataFrame(np.stack(table["scvi_latent"]), index=table["cell_id"])


def test_scvi_checkpoint_records_covariates_and_counts(scvi_run: dict, cells) -> None:  # noqa: F811
    recipe = torch.load(scvi_run["checkpoint"], weights_only=True)["cellarium_steps_recipe"]
    covariates = recipe["data"]["covariates"]
    trained = pd.concat([s.obs for s in scvi_run["shards"]])
    assert list(covariates["categorical"]) == ["chemistry", "condition"]
    for key, categories in covariates["categorical"].items():
        assert set(categories) == set(trained[key].astype(str))
    assert covariates["continuous"] == ["log_total"]
    init = recipe["model"]["init_args"]
    assert init["n_cats_per_cov"] == [len(c) for c in covariates["categorical"].values()]
    assert init["n_continuous_cov"] == 1
    assert recipe["data"]["source"] == {"counts": "raw", "var_names": "index"}


def test_predict_reads_the_recorded_counts_and_codes_covariates_as_trained(scvi_run: dict, tmp_path) -> None:
    directory = scvi_run["directory"]
    predict(scvi_run, scvi_run["paths"], tmp_path / "recorded")
    predict(scvi_run, scvi_run["paths"], tmp_path / "raw", "--counts", "raw")
    predict(scvi_run, scvi_run["paths"], tmp_path / "x", "--counts", "X")
    recorded, raw, x = latents(tmp_path / "recorded"), latents(tmp_path / "raw"), latents(tmp_path / "x")
    np.testing.assert_array_equal(recorded.to_numpy(), raw.to_numpy())
    assert np.abs(recorded.to_numpy() - x.to_numpy()).max() > 1e-3  # X holds other counts

    # A query whose categoricals hold fewer categories, in another order: the same cells, the same latents.
    query = scvi_run["shards"][1].copy()
    for key in ("chemistry", "condition"):
        column = query.obs[key].astype("category").cat.remove_unused_categories()
        query.obs[key] = column.cat.reorder_categories(list(reversed(column.cat.categories)))
    (query_path,) = write([query], directory / "query")
    predict(scvi_run, [query_path], tmp_path / "query")
    got = latents(tmp_path / "query")
    np.testing.assert_allclose(got.to_numpy(), recorded.loc[got.index].to_numpy(), rtol=1e-5, atol=1e-6)


def test_predict_refuses_a_category_the_model_never_saw(scvi_run: dict, tmp_path) -> None:
    query = scvi_run["shards"][0][:50].copy()
    chemistry = query.obs["chemistry"].astype(str).to_numpy()
    chemistry[7] = "10x_new_chemistry"
    query.obs["chemistry"] = pd.Categorical(chemistry)
    (path,) = write([query], tmp_path / "query")
    result = predict(scvi_run, [path], tmp_path / "cells", check=False)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert path in line and "'chemistry'" in line and "'10x_new_chemistry'" in line
    assert not (tmp_path / "cells").exists()


# -- bad input: one line naming the file and the field, exit 2, before the pass, nothing written -------------


@pytest.fixture(scope="module")
def small_shards(cells: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    directory = tmp_path_factory.mktemp("bad")
    small = cells[:200].copy()
    with_nan = small.copy()
    with_nan.obs["score"] = np.where(np.arange(200) == 11, np.nan, 1.0)
    (plain,) = write([small], directory / "plain")
    (norm,) = write([ad.AnnData(X=normalized(small.X), obs=small.obs, var=small.var)], directory / "norm")
    (nan,) = write([with_nan], directory / "nan")
    return {"plain": plain, "normalized": norm, "nan": nan}


@pytest.mark.parametrize(("shard", "options", "expected"), [
    ("plain", ["--obs-filter", "tissue == 'blood'"], "obs has no column 'tissue' (--obs-filter"),
    ("plain", ["--counts", "raw"], "no matrix at 'raw/X' (--counts raw)"),
    ("plain", ["--counts", "layers/spliced"], "no matrix at 'layers/spliced' (--counts layers/spliced)"),
    ("plain", ["--var-names", "gene_symbol"], "var has no column 'gene_symbol' (--var-names)"),
    ("normalized", ["--counts", "X"], "X has non-integer values (e.g. "),
    ("plain", ["--batch-key", "study,tissue"], "obs has no column 'tissue' (--batch-key)"),
])
def test_bad_input_stops_mean_var_before_the_pass(small_shards, tmp_path, capsys, shard, options, expected) -> None:
    output = tmp_path / "mean_var.csv"
    code = cli_main(["mean-var", "--input", small_shards[shard], "--output", str(output), *options, *CPU])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert small_shards[shard] in err and expected in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("options", "expected"), [
    (["--continuous-covariate-keys", "score"], "obs['score'] is nan for cell row 11"),
    (["--continuous-covariate-keys", "study"], "obs['study'] is categorical, not numbers"),
    (["--categorical-covariate-keys", "chemistry,sex"], "obs has no column 'sex' (--categorical-covariate-keys)"),
])
def test_bad_covariates_stop_train_scvi_before_the_pass(small_shards, tmp_path, capsys, options, expected) -> None:
    output = tmp_path / "scvi.ckpt"
    code = cli_main(["train-scvi", "--input", small_shards["nan"], "--output", str(output), *options, *CPU])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert small_shards["nan"] in err and expected in err
    assert not list(tmp_path.iterdir())


# -- the workflow: the global data options, a list batch key, hvg's own, and the census recipe ---------------

CENSUS_CONFIG = "docs/example_census_scvi_config.yaml"
CENSUS_BATCH = ["dataset_id", "assay", "suspension_type", "donor_id"]
ASSAYS = {"10x_3p_v1": "10x 3' v1", "10x_3p_v2": "10x 3' v2", "10x_3p_v3": "10x 3' v3", "10x_5p_v1": "10x 5' v1"}


def census_style(part: ad.AnnData) -> ad.AnnData:
    """A CELLxGENE Discover download of PBMC cells: normalized X over 6,000 of the genes, integer counts of
    all 7,152 in raw/X, Ensembl-like index with feature_name, and the Census's obs columns made from the
    PBMC file's (one study as single nuclei, another's cells not primary data)."""
    study = part.obs["study"].astype(str)
    obs = pd.DataFrame({
        "dataset_id": pd.Categorical(study),
        "assay": pd.Categorical(part.obs["chemistry"].astype(str).map(ASSAYS)),
        "suspension_type": pd.Categorical(np.where(study == "Kang2018", "nucleus", "cell")),
        "donor_id": pd.Categorical(part.obs["donor"].astype(str)),
        "is_primary_data": (study != "10x_pbmc_1k_v3").to_numpy(),
        "cell_type_ontology_term_id": part.obs["cell_type_ontology_term_id"],
    }, index=part.obs_names)
    return cellxgene_style(ad.AnnData(X=part.X, obs=obs, var=part.var))


def test_workflow_passes_the_data_options_and_batch_keys_to_every_step(tmp_path: Path, mixed_shards) -> None:
    from test_workflow import snakemake

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "input": [mixed_shards[0], str(Path(mixed_shards[1]).parent / "*.zarr")], "results": str(tmp_path / "r"),
        "counts": "X", "var_names": "index", "gene_join": "outer", "obs_filter": FILTER, "batch_key": BATCH,
        "hvg": {"batch_key": "chemistry"}, "train_scvi": {"categorical_covariate_keys": ["condition", "donor"]},
    }))
    plan = snakemake("-n", "-p", "--cores", "1", "--configfile", str(config)).stdout
    shell = [line[line.index("cellarium-steps "):] for line in plan.splitlines() if "cellarium-steps " in line]
    commands = {command.split()[1]: command for command in shell}
    reading = ("mean-var", "tdigest", "hvg", "pca", "train-scvi", "predict", "train-socam", "export")
    assert set(reading) <= set(commands)
    for step in reading:
        assert mixed_shards[1] in commands[step]  # the .zarr store, found by the glob
        assert f"--counts X --var-names index --gene-join outer --obs-filter {shlex.quote(FILTER)}" in commands[step]
    for step in ("mean-var", "train-scvi", "export"):
        assert "--batch-key study,chemistry" in commands[step]
    assert "--batch-key chemistry" in commands["hvg"] and "--mean-var" not in commands["hvg"]
    assert "--categorical-covariate-keys condition donor" in commands["train-scvi"]

    config.write_text(yaml.safe_dump({"results": str(tmp_path / "r"), "obs_filter": 3}))
    result = snakemake("-n", "--cores", "1", "--configfile", str(config), check=False)
    assert result.returncode != 0 and "obs_filter" in result.stdout + result.stderr


@pytest.mark.slow
def test_census_example_config_runs_end_to_end(cells, tmp_path: Path) -> None:  # noqa: F811
    from test_workflow import snakemake

    downloads = [census_style(part) for part in parts(cells)]
    paths = write(downloads, tmp_path / "cellxgene")
    results = tmp_path / "results"
    small = tmp_path / "small.yaml"  # a few thousand cells, one epoch: the recipe's shape, not its size
    small.write_text(yaml.safe_dump({
        "input": str(tmp_path / "cellxgene" / "*.h5ad"), "results": str(results), "accelerator": "cpu",
        "hvg": {"batch_key": ["suspension_type", "assay"], "n_top_genes": 500},
        "pca": {"n_components": 10},
        "train_scvi": {"max_epochs": 1, "n_latent": 8, "n_hidden": 64, "batch_size": 256, "learning_rate": 0.001},
        "report": {"sample_size": 1000},
    }))
    snakemake("--cores", "2", "--configfile", CENSUS_CONFIG, str(small))

    obs = pd.concat([d.obs for d in downloads])
    n_genes = np.concatenate([np.diff(d.raw.X.indptr) for d in downloads])
    kept = obs.assign(n_genes=n_genes).query("is_primary_data == True and n_genes >= 300")
    assert 0 < len(kept) < len(obs) and not kept["is_primary_data"].eq(False).any()
    expected_batch = kept[CENSUS_BATCH].astype(str).agg("|".join, axis=1)

    batch_table = pd.read_parquet(results / "statistics" / "mean_var.parquet")
    assert set(batch_table["batch"]) == set(expected_batch)
    genes = pd.read_csv(results / "statistics" / "mean_var.csv")["gene"]
    assert len(genes) == cells.n_vars and genes.str.startswith("ENSG").all()  # raw/var's index: all raw genes
    hvg = pd.read_parquet(results / "hvg" / "hvg.parquet")
    assert hvg["highly_variable"].sum() == 500
    recipe = torch.load(results / "scvi" / "scvi.ckpt", weights_only=True)["cellarium_steps_recipe"]
    assert recipe["data"]["source"] == {"counts": "raw", "var_names": "index"}
    assert recipe["data"]["batch_key"] == ",".join(CENSUS_BATCH)
    assert set(recipe["data"]["batch_categories"]) == set(expected_batch)

    table = ds.dataset(results / "export" / "cells.parquet", partitioning="hive").to_table().to_pandas()
    assert sorted(table["cell_id"]) == sorted(kept.index)
    by_cell = table.set_index("cell_id").loc[kept.index]
    np.testing.assert_array_equal(by_cell["batch"].astype(str), expected_batch)
    np.testing.assert_array_equal(by_cell["donor_id"].astype(str), kept["donor_id"].astype(str))
    assert np.isfinite(np.stack(by_cell["scvi_latent"])).all()
    written = ad.concat([ad.read_h5ad(results / "export" / "anndata" / f"{Path(p).stem}.h5ad") for p in paths])
    assert written.n_obs == len(obs) and written.obsm["X_scVI"].shape == (len(obs), 8)
    left_out = ~written.obs_names.isin(kept.index)
    assert np.isnan(written.obsm["X_scVI"][left_out]).all() and np.isfinite(written.obsm["X_scVI"][~left_out]).all()
