"""The command line: help, --config, bad input fails early with one line and leaves no output."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import run_cli


def write_shard(path: Path, x: np.ndarray, genes: list[str] | None = None, batch: bool = True) -> str:
    genes = genes or [f"G{i}" for i in range(x.shape[1])]
    obs = pd.DataFrame(index=[f"{path.stem}-{i}" for i in range(x.shape[0])])
    if batch:
        obs["batch"] = pd.Categorical(["b1" if i % 2 else "b2" for i in range(x.shape[0])])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return str(path)


@pytest.fixture
def two_shards(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    return [write_shard(tmp_path / f"s{i}.h5ad", rng.poisson(2, (40, 6)).astype(np.int32)) for i in range(2)]


def test_help_explains_every_common_option() -> None:
    text = run_cli("mean-var", "--help").stdout
    for option in ("--input", "--output", "--batch-key", "--batch-size", "--num-workers", "--devices", "--seed",
                   "--config", "--algorithm"):
        assert option in text


def test_config_file_supplies_options_and_cli_wins(two_shards: list[str], tmp_path: Path) -> None:
    config = tmp_path / "step.yaml"
    config.write_text(f"input: {two_shards}\nbatch-key: batch\nbatch_size: 7\noutput: {tmp_path / 'from_config.csv'}\n")
    run_cli("mean-var", "--config", str(config), "--output", str(tmp_path / "from_cli.csv"), "--accelerator", "cpu")
    assert (tmp_path / "from_cli.csv").exists() and not (tmp_path / "from_config.csv").exists()
    assert pd.read_parquet(tmp_path / "from_cli.parquet")["batch"].unique().tolist() == ["b1", "b2"]


def test_unknown_config_key_is_an_error(two_shards: list[str], tmp_path: Path) -> None:
    config = tmp_path / "step.yaml"
    config.write_text("batch_sise: 7\n")
    result = run_cli("mean-var", "--config", str(config), "--input", *two_shards, "--output", str(tmp_path / "o.csv"),
                     check=False)
    assert result.returncode == 2
    assert "unknown key 'batch_sise'" in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_wrong_config_type_is_an_error(two_shards: list[str], tmp_path: Path) -> None:
    config = tmp_path / "step.yaml"
    config.write_text("batch-size: many\n")
    result = run_cli("mean-var", "--config", str(config), "--input", *two_shards, "--output", str(tmp_path / "o.csv"),
                     check=False)
    assert result.returncode == 2 and "batch-size" in result.stderr and "many" in result.stderr


def test_missing_required_option() -> None:
    result = run_cli("mean-var", "--input", "x.h5ad", check=False)
    assert result.returncode == 2 and "--output" in result.stderr


@pytest.mark.parametrize("problem", ["genes", "batch_column", "negative", "fraction"])
def test_bad_input_fails_with_one_line_naming_the_file(two_shards: list[str], tmp_path: Path, problem: str) -> None:
    bad = tmp_path / "bad.h5ad"
    x = np.ones((10, 6), dtype=np.float32)
    if problem == "genes":
        write_shard(bad, x, genes=[f"H{i}" for i in range(6)])
    elif problem == "batch_column":
        write_shard(bad, x, batch=False)
    else:
        x[3, 2] = -1 if problem == "negative" else 0.5
        write_shard(bad, x)
    output = tmp_path / "out" / "mean_var.csv"
    result = run_cli("mean-var", "--input", *two_shards, str(bad), "--batch-key", "batch", "--output", str(output),
                     "--accelerator", "cpu", check=False)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "bad.h5ad" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists() and not output.with_suffix(".parquet").exists()
    leftovers = list(output.parent.glob("*")) if output.parent.exists() else []
    assert leftovers == []


def test_simulate_then_mean_var(tmp_path: Path) -> None:
    run_cli("simulate", "--output", str(tmp_path / "shards"), "--n-cells", "600", "--n-genes", "50", "--n-shards", "2")
    output = tmp_path / "mv.csv"
    run_cli("mean-var", "--input", str(tmp_path / "shards" / "*.h5ad"), "--batch-key", "batch",
            "--output", str(output), "--accelerator", "cpu", "--num-workers", "2", "--batch-size", "100")
    summary = pd.read_csv(output)
    assert len(summary) == 50 and (summary["var"] > 0).any()


def test_console_script_exit_keeps_logs_and_files_complete(tmp_path: Path) -> None:
    """The console script skips the interpreter's teardown: its last log line and every file it
    wrote (HDF5 here, whose library would flush at a normal exit) must still be complete."""
    out = tmp_path / "sim"
    result = run_cli("simulate", "--output", str(out), "--n-cells", "300", "--n-genes", "50", "--n-shards", "2")
    assert result.returncode == 0
    assert f"wrote 2 shards to {out}" in result.stderr.strip().splitlines()[-1]
    shards = sorted(out.glob("*.h5ad"))
    assert len(shards) == 2
    assert sum(ad.read_h5ad(path).n_obs for path in shards) == 300
    failed = run_cli("mean-var", "--input", str(tmp_path / "missing.h5ad"), "--output", str(tmp_path / "o.csv"),
                     check=False)
    assert failed.returncode == 2 and "missing.h5ad" in failed.stderr
