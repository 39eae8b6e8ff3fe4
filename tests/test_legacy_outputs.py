"""Files written before the pipelines/outputs refactor (commit 1c2ae1f) still load and predict the same,
and the pca step's model file now is a recipe checkpoint that `predict` takes like any other.

The fixtures in tests/fixtures/legacy_1c2ae1f were made by that commit's CLI on simulated shards:
  simulate --n-cells 300 --n-genes 60 --n-shards 2 --seed 3
  pca --n-components 5 --embeddings ...            -> pca.pt (the old `cellarium_steps.pca/1` dict), pca_cells.npy
  train-socam --pca pca.parquet --max-epochs 2     -> socam_on_pca.ckpt (a frozen PCA pipeline inside)
  predict --checkpoint socam_on_pca.ckpt           -> socam_probs.npy
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellarium_steps.data import ShardDataModule
from cellarium_steps.outputs.pca import output_paths, read_pca_state
from cellarium_steps.pipelines.pca import load_pca
from cellarium_steps.runner import CellariumModule, build_trainer
from conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_1c2ae1f"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("legacy_shards")
    run_cli("simulate", "--output", str(directory), "--n-cells", "300", "--n-genes", "60", "--n-shards", "2",
            "--seed", "3", "--quiet")
    return str(directory / "*.h5ad")


def _vectors(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    table = pd.read_parquet(path)
    return table["cell_id"].to_numpy(), np.stack(table[column].to_numpy())


def test_legacy_pca_state_loads_and_embeds_identically(shards: str) -> None:
    state = read_pca_state(FIXTURES / "pca.pt")
    assert state["model"] == "ExactPCA" and state["recipe"] is None and state["config"]["n_components"] == 5
    model, transforms = load_pca(FIXTURES / "pca.pt")
    assert [type(t).__name__ for t in transforms] == ["NormalizeTotal", "Log1p"]
    datamodule = ShardDataModule(shards, batch_size=128)
    outputs = build_trainer(devices=1, accelerator="cpu").predict(
        CellariumModule(model, transforms=transforms), datamodule=datamodule)
    embedded = np.concatenate([o["x_ng"].numpy() for o in outputs])
    np.testing.assert_allclose(embedded, np.load(FIXTURES / "pca_cells.npy"), rtol=0, atol=1e-6)


def test_legacy_socam_checkpoint_predicts_identically(shards: str, tmp_path: Path) -> None:
    run_cli("predict", "--checkpoint", str(FIXTURES / "socam_on_pca.ckpt"), "--input", shards,
            "--output", str(tmp_path / "cells"), "--quiet")
    cell_id, probs = _vectors(tmp_path / "cells", "cell_type_probs")
    expected_ids = pd.read_csv(FIXTURES / "cell_ids.csv").iloc[:, 0].to_numpy()
    np.testing.assert_array_equal(cell_id, expected_ids)
    np.testing.assert_allclose(probs, np.load(FIXTURES / "socam_probs.npy"), rtol=0, atol=1e-6)


def test_new_pca_file_is_a_recipe_checkpoint(shards: str, tmp_path: Path) -> None:
    """The refit model equals the legacy one (same data, same exact method), and `predict` embeds every
    cell with it as the pca step's own --embeddings pass and the legacy embeddings do."""
    output = tmp_path / "pca" / "pca.parquet"
    run_cli("pca", "--input", shards, "--n-components", "5", "--output", str(output),
            "--embeddings", str(tmp_path / "embeddings"), "--quiet")
    model_file = output_paths(str(output))["state"]
    new, legacy = read_pca_state(model_file), read_pca_state(FIXTURES / "pca.pt")
    assert new["recipe"] is not None and new["model"] == legacy["model"] and new["config"] == legacy["config"]
    for key, value in legacy["state_dict"].items():
        np.testing.assert_allclose(new["state_dict"][key].numpy(), value.numpy(), rtol=0, atol=1e-9)
    run_cli("predict", "--checkpoint", str(model_file), "--input", shards, "--output", str(tmp_path / "cells"),
            "--quiet")
    cell_id, predicted = _vectors(tmp_path / "cells", "pca")
    embedded_id, embedded = _vectors(tmp_path / "embeddings", "pca")
    np.testing.assert_array_equal(cell_id, embedded_id)
    np.testing.assert_array_equal(predicted, embedded)
    np.testing.assert_allclose(predicted, np.load(FIXTURES / "pca_cells.npy"), rtol=0, atol=1e-5)
