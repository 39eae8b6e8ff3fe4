"""Multi-node DDP as SLURM launches it (srun --nodes=2 --ntasks-per-node=2): every rank's trainer has
num_nodes=2 and devices=2, and the epoch plan gives each cell to exactly one of the 4 ranks.

SLURM is faked with the environment srun gives each task; nothing is launched."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.steps.cli import main

N_CELLS = 301  # not a multiple of 4 ranks: shares differ by one cell


class _Built(Exception):
    """Stops the step once its trainer exists: this test checks the set-up, not a fit."""


def slurm_task_environment(rank: int, *, nodes: int = 2, tasks_per_node: int = 2) -> dict[str, str]:
    """What srun sets in task ``rank`` of ``srun --nodes=2 --ntasks-per-node=2`` (the variables Lightning reads)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train_scvi", "SLURM_NODELIST": "node[1-2]",
        "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % tasks_per_node), "SLURM_NODEID": str(rank // tasks_per_node),
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("multinode_shards")
    simulate_shards(output_dir=str(directory), n_cells=N_CELLS, n_genes=40, n_batches=2, n_cell_types=2, n_shards=3)
    return str(directory / "*.h5ad")


def test_two_nodes_of_two_tasks_make_four_ranks_that_share_the_cells(
    shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cellarium_steps.pipelines.scvi as scvi_pipeline
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from cellarium_steps.data.datamodule import ShardDataModule

    real_resumable_trainer = scvi_pipeline.resumable_trainer
    built: list = []

    def keep_and_stop(**kwargs):
        trainer, _ = real_resumable_trainer(**kwargs)
        built.append(trainer)
        raise _Built

    monkeypatch.setattr(scvi_pipeline, "resumable_trainer", keep_and_stop)
    cells_by_rank: list[list[str]] = []
    for rank in range(4):
        for name, value in slurm_task_environment(rank).items():
            monkeypatch.setenv(name, value)
        # The real command line, as the workflow's srun launch runs it on each task.
        with pytest.raises(_Built):
            main(["train-scvi", "--input", shards, "--output", str(tmp_path / f"scvi{rank}.ckpt"), "--max-epochs", "1",
                  "--accelerator", "cpu", "--devices", "2", "--num-nodes", "2", "--batch-size", "16", "--quiet"])
        trainer = built[-1]
        assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
        assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 2, 4)
        assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (rank, rank // 2, rank % 2)

        # The data module takes its rank and world size from the trainer (as in fit), unshuffled and shuffled.
        for shuffle in (False, True):
            datamodule = ShardDataModule(shards, batch_size=16, shuffle=shuffle, seed=3)
            datamodule.trainer = trainer
            datamodule.setup("fit")
            names = [name for batch in datamodule.dataset for name in batch["obs_names_n"]]
            if not shuffle:
                cells_by_rank.append(names)
            else:
                assert len(names) in (N_CELLS // 4, N_CELLS // 4 + 1)
        assert len(datamodule.dataset) == len(list(datamodule.dataset))  # the same number of steps on every rank

    every_cell = [name for names in cells_by_rank for name in names]
    assert len(every_cell) == N_CELLS and len(set(every_cell)) == N_CELLS
    assert sorted(len(names) for names in cells_by_rank) == [75, 75, 75, 76]


def test_num_nodes_must_be_positive(shards: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["mean-var", "--input", shards, "--output", str(tmp_path / "mv.csv"), "--num-nodes", "0"])
