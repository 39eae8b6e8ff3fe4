"""The Snakemake workflow: lint and format clean, plans the chain, runs it end to end on demo data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFMT = str(Path(sys.executable).with_name("snakefmt"))
TINY = {
    "simulate": {"n_cells": 1200, "n_genes": 300, "n_batches": 3, "n_cell_types": 4, "n_shards": 2},
    "hvg": {"n_top_genes": 100},
    "pca": {"n_components": 8},
    "train_scvi": {"max_epochs": 2, "n_latent": 6, "n_hidden": 32, "batch_size": 256},
    "train_socam": {"max_epochs": 2, "batch_size": 256},
    "export": {"row_group_size": 250},
    "report": {"sample_size": 500},
    "accelerator": "cpu",
}
#: every job of the default target, in the order the chain runs them
JOBS = ("simulate", "mean_var", "tdigest", "hvg", "pca", "train_scvi", "predict_scvi", "train_socam", "predict_socam",
        "export", "report_plots")
REPORT_PLOTS = ("hvg_mean_variance.png", "pca_variance.png", "scvi_loss.png", "latent_by_batch.png",
                "latent_by_cell_type.png", "cell_type_composition.png")
STRING_PARTITIONS = ds.partitioning(pa.schema([("dataset", pa.string()), ("batch", pa.string())]), flavor="hive")


def snakemake(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env_path = f"{Path(sys.executable).parent}:{__import__('os').environ.get('PATH', '')}"
    result = subprocess.run([SNAKEMAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "PATH": env_path})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_lint_and_format_are_clean() -> None:
    assert "Congratulations" in snakemake("--lint").stdout + snakemake("--lint").stderr
    subprocess.run([SNAKEFMT, "--check", "Snakefile", "workflow"], cwd=REPO, check=True, capture_output=True)


def test_default_config_plans_the_whole_chain(tmp_path: Path) -> None:
    output = snakemake("-n", "--cores", "2", "--config", f"results={tmp_path}/results").stdout
    for job in JOBS:
        assert f"rule {job}:" in output
    assert re.search(rf"^total\s+{len(JOBS) + 1}$", output, re.MULTILINE)  # + the `all` target


def test_without_cell_type_key_socam_is_left_out(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "cell_type_key": None}))
    output = snakemake("-n", "--cores", "2", "--configfile", str(config)).stdout
    assert "rule export:" in output and "rule train_socam:" not in output and "rule predict_socam:" not in output


def test_wrong_config_key_fails_before_any_job(tmp_path: Path) -> None:
    result = snakemake("-n", "--cores", "1", "--config", "batch_sise=4", check=False)
    assert result.returncode != 0 and "batch_sise" in result.stdout + result.stderr


@pytest.mark.slow
def test_end_to_end_on_demo_data(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    results = tmp_path / "results"
    config.write_text(yaml.safe_dump({**TINY, "results": str(results)}))
    snakemake("--cores", "2", "--configfile", str(config))

    cells = ds.dataset(results / "scvi" / "cells.parquet").to_table()
    assert cells.num_rows == 1200 and len(set(cells["cell_id"].to_pylist())) == 1200
    assert cells.schema.field("scvi_latent").type.list_size == 6
    ((count, distinct),) = duckdb.sql(
        f"select count(*), count(distinct cell_id) from '{results}/pca/cells.parquet/*.parquet'"
    ).fetchall()
    assert count == distinct == 1200
    assert len(list((results / "logs").glob("*.log"))) >= len(JOBS)
    assert len(list((results / "benchmarks").glob("*.tsv"))) >= len(JOBS)

    check_export(results, n_cells=1200)
    check_socam_columns(ds.dataset(results / "export" / "cells.parquet", partitioning=STRING_PARTITIONS).to_table(),
                        classes=pd.read_csv(results / "socam" / "socam.ckpt.classes.csv")["cl_name"].tolist())
    genes = pd.read_parquet(results / "export" / "genes.parquet")
    assert len(genes) == 300 and genes["highly_variable"].sum() == 100
    assert {"gene", "mean", "var", "means", "variances_norm", "highly_variable"} <= set(genes.columns)
    metrics = pd.read_csv(results / "scvi" / "scvi.ckpt.metrics.csv")  # config.yaml's val_fraction holds cells out
    assert metrics["epoch"].tolist() == [0, 1] and metrics[["train_loss", "val_loss"]].notna().all().all()

    report = tmp_path / "report.html"
    snakemake("--report", str(report), "--configfile", str(config))
    html = report.read_text()
    for plot in REPORT_PLOTS:
        assert (results / "report" / plot).stat().st_size > 5000
        assert plot in html

    assert "Nothing to be done" in snakemake("-n", "--cores", "2", "--configfile", str(config)).stdout
    (results / "pca" / "pca_variance.csv").unlink()
    plan = snakemake("-n", "--cores", "2", "--configfile", str(config)).stdout
    assert "rule pca:" in plan and "rule train_scvi:" not in plan and "rule mean_var:" not in plan
    assert "rule export:" in plan and "rule report_plots:" in plan and "rule train_socam:" not in plan


def check_export(results: Path, n_cells: int) -> None:
    """The export read as a dashboard would: pyarrow (Hive partitions) and DuckDB."""
    path = results / "export" / "cells.parquet"
    table = ds.dataset(path, format="parquet", partitioning=STRING_PARTITIONS).to_table()
    assert table.num_rows == n_cells and pc.count_distinct(table["cell_id"]).as_py() == n_cells
    assert table.schema.field("pca").type == pa.list_(pa.float32(), TINY["pca"]["n_components"])
    assert table.schema.field("scvi_latent").type == pa.list_(pa.float32(), TINY["train_scvi"]["n_latent"])
    assert set(table["dataset"].to_pylist()) == {"results"} and table["batch"].null_count == 0
    # the same cells as the shards, with their batch
    shards = ds.dataset(results / "scvi" / "cells.parquet").to_table()
    assert set(table["cell_id"].to_pylist()) == set(shards["cell_id"].to_pylist())

    parquet = f"read_parquet('{path}/**/*.parquet', hive_partitioning=true)"
    ((count, distinct, batches, low, high, width),) = duckdb.sql(
        f"select count(*), count(distinct cell_id), count(distinct batch), min(cell_type_probability), "
        f"max(cell_type_probability), max(len(scvi_latent)) from {parquet}"
    ).fetchall()
    assert (count, distinct, batches, width) == (n_cells, n_cells, TINY["simulate"]["n_batches"], 6)
    assert 0.0 <= low <= high <= 1.0
    ((unsorted,),) = duckdb.sql(
        f"select count(*) from {parquet} where cell_type_top_k_probability[1] < cell_type_top_k_probability[2]"
        " or cell_type_top_k_probability[2] < cell_type_top_k_probability[3]"
    ).fetchall()
    assert unsorted == 0


def check_socam_columns(table: pa.Table, classes: list[str]) -> None:
    """Probabilities in [0, 1] and consistent with the Cell Ontology."""
    from cellarium_steps.ontology import descendant_tensor, term_labels, validate_cl_names

    terms = table["cell_type_ontology_term_id"].to_pylist()
    validate_cl_names(set(terms))
    labels = dict(zip(classes, term_labels(classes)))
    assert table["cell_type"].to_pylist() == [labels[t] for t in terms]
    p_n = table["cell_type_probability"].to_numpy()
    top_nk = table["cell_type_top_k_probability"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    assert ((p_n >= 0) & (p_n <= 1)).all() and ((top_nk >= 0) & (top_nk <= 1)).all()
    assert (np.diff(top_nk, axis=1) <= 1e-7).all()  # top-k best first
    top_terms = table["cell_type_top_k_ontology_term_id"].to_pylist()
    assert all(set(t) <= set(classes) and len(set(t)) == len(t) for t in top_terms)
    # the call is the most specific term that is more likely than not, else the most probable one
    assert ((p_n >= 0.5 - 1e-6) | np.isclose(p_n, top_nk[:, 0])).all()
    # propagated probabilities: a parent is never less likely than its child
    is_descendant_cc = descendant_tensor(classes).numpy().astype(bool)  # [i, j]: j is i or below it
    position = {c: i for i, c in enumerate(classes)}
    for names, probs in zip(top_terms, top_nk):
        for a, pa_ in zip(names, probs):
            for b, pb in zip(names, probs):
                if a != b and is_descendant_cc[position[a], position[b]]:
                    assert pa_ >= pb - 1e-6
    if "cell_type_probs" in table.schema.names:
        probs_nc = table["cell_type_probs"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        parent, child = np.nonzero(is_descendant_cc & ~np.eye(len(classes), dtype=bool))
        assert (probs_nc[:, parent] >= probs_nc[:, child] - 1e-6).all()
        np.testing.assert_allclose(probs_nc[np.arange(table.num_rows), [position[t] for t in terms]], p_n, atol=1e-6)


def test_pbmc_example_config_plans_the_chain_on_real_data() -> None:
    from conftest import PBMC_MULTIBATCH, require

    require(PBMC_MULTIBATCH)
    output = snakemake("-n", "--cores", "2", "--configfile", "docs/example_pbmc_config.yaml").stdout
    assert "rule simulate:" not in output
    for job in JOBS[1:]:
        assert f"rule {job}:" in output


@pytest.mark.slow
def test_a_killed_training_job_is_rerun_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Kill Snakemake (and its job) while train_scvi runs, after an epoch checkpoint: the output is left
    incomplete; after ``--unlock``, a rerun with --rerun-incomplete runs the job again and the step resumes
    from the checkpoint."""
    import os
    import signal
    import time

    config = tmp_path / "config.yaml"
    results = tmp_path / "results"
    # Enough epochs that the run is still training when the first epoch's checkpoint appears.
    config.write_text(yaml.safe_dump({**TINY, "results": str(results),
                                      "train_scvi": {**TINY["train_scvi"], "max_epochs": 60}}))
    env_path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    process = subprocess.Popen(
        [SNAKEMAKE, "scvi", "--cores", "2", "--configfile", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "PATH": env_path}, start_new_session=True,
    )
    checkpoint = results / "scvi" / "scvi.ckpt.d" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "train_scvi wrote no epoch checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (results / "scvi" / "scvi.ckpt").exists()

    snakemake("--unlock", "--configfile", str(config))  # the killed run's lock, as a user would after a crash
    rerun = snakemake("scvi", "--cores", "2", "--rerun-incomplete", "--configfile", str(config))
    assert "train_scvi" in rerun.stdout + rerun.stderr
    assert "resuming from" in (results / "logs" / "train_scvi.log").read_text()
    assert (results / "scvi" / "scvi.ckpt").exists() and (results / "scvi" / "cells.parquet").is_dir()
    # nothing upstream ran again
    assert "Rule: hvg" not in rerun.stdout + rerun.stderr and "rule hvg" not in rerun.stdout + rerun.stderr


# ---------------------------------------------------------------------------------------------------------------
# The query target: a new dataset mapped onto the reference

QUERY_JOBS = ("query_train_scvi", "query_predict_scvi", "query_predict_socam", "query_export", "query_report")


def test_query_target_plans_mapping_transfer_export_and_report(tmp_path: Path) -> None:
    query = tmp_path / "query.h5ad"
    query.touch()  # a dry run reads no shard
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "query": {"input": str(query)}}))
    output = snakemake("-n", "-p", "--cores", "2", "query", "--configfile", str(config)).stdout
    for job in (*QUERY_JOBS, "train_scvi", "train_socam", "export"):  # the reference is built when it is this run's
        assert f"rule {job}:" in output
    assert "--features-from" not in output  # SOCAM on genes (the default features) reads the query's genes
    assert output.count("--missing-genes zero") == 3
    # an earlier run's reference: only the query's jobs
    reference = tmp_path / "reference"
    for path in ("scvi/scvi.ckpt", "socam/socam.ckpt"):
        (reference / path).parent.mkdir(parents=True, exist_ok=True)
        (reference / path).touch()
    (reference / "export" / "cells.parquet").mkdir(parents=True)
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "train_socam": {"features": "scvi"},
                                      "query": {"input": str(query), "reference": str(reference)}}))
    output = snakemake("-n", "-p", "--cores", "2", "query", "--configfile", str(config)).stdout
    assert "rule train_scvi:" not in output and "rule export:" not in output
    for job in QUERY_JOBS:
        assert f"rule {job}:" in output
    assert f"--reference {reference}/scvi/scvi.ckpt" in output and "--features-from" in output


def test_query_target_without_query_input_says_what_to_set(tmp_path: Path) -> None:
    result = snakemake("-n", "--cores", "1", "query", "--config", f"results={tmp_path}/results", check=False)
    assert result.returncode != 0 and "query.input" in result.stdout + result.stderr


@pytest.mark.slow
def test_query_target_end_to_end_on_a_held_out_pbmc_source(pbmc_multibatch, tmp_path: Path) -> None:
    """Reference: two labelled PBMC sources (1,200 cells, 2 shards); query: the held-out SoupX_pbmc4k
    (500 cells) without 5% of the genes. scArches' architecture, SOCAM on the scVI latent."""
    from conftest import split_into_shards

    rng = np.random.default_rng(0)
    source = pbmc_multibatch.obs["source"].astype(str).to_numpy()
    reference_rows = rng.choice(np.flatnonzero(np.isin(source, ["MUDAN_reference", "scMINER_pbmc14k"])), 1200,
                                replace=False)
    reference = pbmc_multibatch[rng.permutation(reference_rows)].copy()
    split_into_shards(reference, tmp_path / "reference_shards", 2)
    kept_genes = np.sort(rng.choice(pbmc_multibatch.n_vars, int(pbmc_multibatch.n_vars * 0.95), replace=False))
    query = pbmc_multibatch[np.sort(rng.choice(np.flatnonzero(source == "SoupX_pbmc4k"), 500, replace=False))]
    query = query[:, kept_genes].copy()
    query.obs["source"] = query.obs["source"].astype(str).astype("category")
    (tmp_path / "query_shards").mkdir()
    query.write_h5ad(tmp_path / "query_shards" / "query.h5ad")
    results = tmp_path / "results"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        **TINY, "results": str(results), "input": str(tmp_path / "reference_shards" / "*.h5ad"),
        "batch_key": "source", "cell_type_key": "cell_type_ontology_term_id", "hvg": {"n_top_genes": 300},
        # enough optimizer steps for a latent and a classifier worth checking (TINY's are for plumbing)
        "train_scvi": {**TINY["train_scvi"], "max_epochs": 20, "batch_size": 128, "encode_covariates": True,
                       "use_layer_norm": "both", "use_batch_norm": "none", "val_fraction": 0.0},
        "train_socam": {**TINY["train_socam"], "features": "scvi", "max_epochs": None},
        "query": {"input": str(tmp_path / "query_shards" / "*.h5ad"), "train_scvi": {"max_epochs": 20}},
    }))
    snakemake("query", "--cores", "2", "--configfile", str(config))

    log = (results / "logs" / "query_train_scvi.log").read_text()
    assert "var_names lacks" in log and "read as zeros" in log
    recipe = torch.load(results / "query" / "scvi" / "scvi.ckpt", weights_only=True)["cellarium_steps_recipe"]
    assert recipe["data"]["batch_categories"][-1] == "SoupX_pbmc4k"
    assert recipe["data"]["reference"]["new_batch_cells"] == {"SoupX_pbmc4k": 500}
    # DuckDB reads the reference's and the query's exports as one table
    exports = [f"{results}/export/cells.parquet/**/*.parquet", f"{results}/query/export/cells.parquet/**/*.parquet"]
    rows = duckdb.sql(
        f"select dataset, batch, count(*), count(distinct cell_id), count(cell_type), max(len(scvi_latent)) "
        f"from read_parquet({exports}, hive_partitioning=true, union_by_name=true) group by all order by all"
    ).fetchall()
    counts = {(dataset, batch): (n, distinct, typed, width) for dataset, batch, n, distinct, typed, width in rows}
    assert counts[("query", "SoupX_pbmc4k")] == (500, 500, 500, 6)
    assert sum(n for (dataset, _), (n, *_) in counts.items() if dataset == "results") == 1200
    assert {dataset for dataset, _ in counts} == {"results", "query"}
    for plot in ("query_latent_by_dataset.png", "query_latent_by_cell_type.png", "query_cell_type_composition.png"):
        assert (results / "query" / "report" / plot).stat().st_size > 5000
    # the transferred labels: most query cells get a type their (coarser) label contains
    from cellarium_steps.ontology import is_term_or_descendant

    table = duckdb.sql(f"select cell_id, cell_type_ontology_term_id from read_parquet('{exports[1]}')").df()
    truth = query.obs["cell_type_ontology_term_id"].astype(str).reindex(table["cell_id"]).to_numpy()
    labelled = truth != "unknown"
    assert np.mean(is_term_or_descendant(table["cell_type_ontology_term_id"][labelled], truth[labelled])) > 0.5
