"""The Snakemake workflow: lint and format clean, plans the chain, runs it end to end on demo data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest
import yaml

from conftest import REPO

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFMT = str(Path(sys.executable).with_name("snakefmt"))
TINY = {
    "simulate": {"n_cells": 1200, "n_genes": 300, "n_batches": 3, "n_cell_types": 4, "n_shards": 2},
    "hvg": {"n_top_genes": 100},
    "pca": {"n_components": 8},
    "train_scvi": {"max_epochs": 2, "n_latent": 6, "n_hidden": 32, "batch_size": 256},
    "accelerator": "cpu",
}


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


def test_default_config_plans_the_whole_chain() -> None:
    output = snakemake("-n", "--cores", "2").stdout
    for job in ("simulate", "mean_var", "tdigest", "hvg", "pca", "train_scvi", "predict_scvi"):
        assert f"rule {job}:" in output


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
    assert len(list((results / "logs").glob("*.log"))) >= 7
    assert len(list((results / "benchmarks").glob("*.tsv"))) >= 7

    assert "Nothing to be done" in snakemake("-n", "--cores", "2", "--configfile", str(config)).stdout
    (results / "pca" / "pca_variance.csv").unlink()
    plan = snakemake("-n", "--cores", "2", "--configfile", str(config)).stdout
    assert "rule pca:" in plan and "rule train_scvi:" not in plan and "rule mean_var:" not in plan


def test_pbmc_example_config_plans_the_chain_on_real_data() -> None:
    from conftest import PBMC_MULTIBATCH, require

    require(PBMC_MULTIBATCH)
    output = snakemake("-n", "--cores", "2", "--configfile", "docs/example_pbmc_config.yaml").stdout
    assert "rule simulate:" not in output
    for job in ("mean_var", "tdigest", "hvg", "pca", "train_scvi", "predict_scvi"):
        assert f"rule {job}:" in output
