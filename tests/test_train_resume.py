"""Trained steps: a run killed mid-training resumes from its last epoch checkpoint and ends where
an uninterrupted run with the same seed ends; predictions are written once per cell."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from cellarium_steps.data.simulate import simulate_shards
from conftest import CLI, run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("sim")
    simulate_shards(str(directory), n_cells=3000, n_genes=120, n_shards=2, seed=3)
    return str(directory / "*.h5ad")


def train_args(shards: str, output: Path, epochs: int = 4) -> list[str]:
    return ["train-scvi", "--input", shards, "--batch-key", "batch", "--max-epochs", str(epochs),
            "--batch-size", "64", "--n-hidden", "32", "--kl-warmup-steps", "50", "--accelerator", "cpu",
            "--seed", "7", "--output", str(output), "--quiet"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(shards: str, tmp_path: Path) -> None:
    uninterrupted = tmp_path / "full" / "scvi.ckpt"
    run_cli(*train_args(shards, uninterrupted))

    resumed = tmp_path / "killed" / "scvi.ckpt"
    process = subprocess.Popen([CLI, *train_args(shards, resumed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    last = Path(str(resumed) + ".d") / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert last.exists() and not resumed.exists(), "killed after the first epoch's checkpoint, before the end"
    assert torch.load(last, weights_only=True)["epoch"] < 3

    run_cli(*train_args(shards, resumed))
    expected, actual = weights(uninterrupted), weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_predict_writes_one_row_per_cell(shards: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "scvi.ckpt"
    run_cli(*train_args(shards, checkpoint, epochs=1))
    output = tmp_path / "cells.parquet"
    run_cli("predict", "--checkpoint", str(checkpoint), "--input", shards, "--output", str(output),
            "--accelerator", "cpu", "--batch-size", "700", "--quiet")
    table = ds.dataset(output).to_table()
    assert table.num_rows == 3000 and len(set(table["cell_id"].to_pylist())) == 3000
    assert str(table.schema.field("scvi_latent").type) == "fixed_size_list<element: float>[10]"


def test_predict_rejects_a_file_that_is_not_a_checkpoint(shards: str, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    result = run_cli("predict", "--checkpoint", str(bogus), "--input", shards, "--output", str(tmp_path / "o"),
                     check=False)
    assert result.returncode == 2 and "bogus.ckpt" in result.stderr
    assert not (tmp_path / "o").exists()
