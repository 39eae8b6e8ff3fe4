"""The Lightning runner: transforms then model, param-free and trained models, epochs and shuffling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellarium_steps.data import ShardDataModule
from cellarium_steps.models import CellariumModel
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.transforms import Log1p, NormalizeTotal
from test_data import GENES, make_adata


class RecordCells(CellariumModel):
    """Remembers which cells each epoch saw, and in which order."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[str]] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.epochs = []

    def on_train_epoch_start(self, trainer) -> None:  # noqa: ANN001
        self.epochs.append([])

    def forward(self, obs_names_n: np.ndarray) -> dict:
        self.epochs[-1].extend(obs_names_n)
        return {}


class TinyRegression(CellariumModel):
    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.w_g = torch.nn.Parameter(torch.zeros(n_genes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.w_g)

    def forward(self, x_ng: torch.Tensor, total_mrna_umis_n: torch.Tensor) -> dict:
        prediction_n = x_ng.to_dense() @ self.w_g
        return {"loss": ((prediction_n - 1.0) ** 2).mean()}


@pytest.fixture
def shards(tmp_path: Path) -> str:
    for i in range(3):
        make_adata(40, GENES, ["a", "b"], seed=i, prefix=f"s{i}-").write_h5ad(tmp_path / f"s{i}.h5ad")
    return str(tmp_path / "*.h5ad")


def order_of_epochs(shards: str, seed: int) -> list[list[str]]:
    model = RecordCells()
    datamodule = ShardDataModule(shards, batch_size=16, shuffle=True, seed=seed)
    build_trainer(accelerator="cpu", max_epochs=3).fit(CellariumModule(model), datamodule=datamodule)
    return model.epochs


def test_shuffling_changes_with_epoch_and_seed_only(shards: str) -> None:
    first, again, other_seed = order_of_epochs(shards, 0), order_of_epochs(shards, 0), order_of_epochs(shards, 1)
    assert all(sorted(epoch) == sorted(first[0]) and len(set(epoch)) == 120 for epoch in first)
    assert first == again
    assert first[0] != first[1] != first[2]
    assert first[0] != other_seed[0]


def test_trained_model_learns_through_transforms(shards: str) -> None:
    model = TinyRegression(len(GENES))
    module = CellariumModule(model, transforms=[NormalizeTotal(10.0), Log1p()], optim_kwargs={"lr": 0.05})
    datamodule = ShardDataModule(shards, batch_size=32, shuffle=True)
    trainer = build_trainer(accelerator="cpu", max_epochs=5, trainable=True)
    trainer.fit(module, datamodule=datamodule)
    assert module.has_trainable_parameters and module.automatic_optimization
    assert trainer.callback_metrics["train_loss"] < 0.2


def test_param_free_model_runs_without_optimizer(shards: str) -> None:
    module = CellariumModule(RecordCells())
    assert not module.has_trainable_parameters and module.configure_optimizers() is None


def test_checkpoint_rebuilds_the_pipeline(shards: str, tmp_path: Path) -> None:
    from cellarium_steps.runner.recipe import spec

    recipe = {
        "model": spec(TinyRegression, n_genes=len(GENES)),
        "transforms": [spec(NormalizeTotal, target_count=10.0), spec(Log1p)],
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": 0.05})
    trainer = build_trainer(accelerator="cpu", max_epochs=2, trainable=True)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=32))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = CellariumModule.from_checkpoint(str(tmp_path / "model.ckpt"))
    torch.testing.assert_close(restored.model.w_g, module.model.w_g)
    assert [type(t) for t in restored.transforms] == [NormalizeTotal, Log1p]
    assert restored.transforms[0].target_count == 10.0


def test_single_process_statistics_skip_lightning(shards: str) -> None:
    """One device: fit_statistics runs the model's hooks without importing Lightning, and its
    result equals numpy's float64 statistics (DDP runs go through Lightning; see test_mean_var)."""
    script = f"""
import sys
import numpy as np
from cellarium_steps.data import open_shards, ShardReader
from cellarium_steps.data.reader import read_rows
from cellarium_steps.models import OnePassMeanVarStd
from cellarium_steps.runner import fit_statistics

collection = open_shards({shards!r}, batch_key="batch")
model = OnePassMeanVarStd(collection.var_names_g, n_batch=collection.n_batch, output_path=None)
trainer = fit_statistics(model, collection, batch_size=16, devices=1, accelerator="cpu")
assert trainer.global_rank == 0
assert not any(name.startswith("lightning") for name in sys.modules), "Lightning was imported"
reader = ShardReader(collection)
x = read_rows(reader, [(s, np.arange(s.n_obs)) for s in collection.shards]).toarray().astype(np.float64)
np.testing.assert_allclose(model.mean_g.numpy(), x.mean(0), rtol=1e-12)
np.testing.assert_allclose(model.var_g.numpy(), x.var(0), rtol=1e-12, atol=1e-15)
print("ok")
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
