"""Diagnostic for bench_mapping.py: which part of our reference training costs label transfer accuracy.

    .venv/bin/python benchmarks/diagnose_mapping_arms.py --arm scvi-init --seeds 10
    .venv/bin/python benchmarks/diagnose_mapping_arms.py --arm scvi-loader --seeds 10 --first-seed 10

Each arm changes one thing on one side, trains the reference with bench_mapping's settings and data
(cached under ``benchmarks/out/mapping`` by it; run it once first), maps the query, and prints one line
``RESULT ARM SEED accuracy mixing`` per seed (each seed in a fresh interpreter, one torch thread):

- ``scvi-reseed``: scvi-tools' reference and query training with our runner's per-step reseeding of
  torch's generator (a Lightning callback); mapped by scvi-tools.
- ``scvi-init``: ``train-scvi`` (the CLI, in-process) starting from scvi-tools' initial weights of the
  same seed; mapped by ``train-scvi --reference``.
- ``scvi-loader``: our model and runner (``CellariumModule``, per-step reseeding, train-scvi's optimizer)
  trained on scvi-tools' own shuffled data loader from scvi-tools' initial weights; mapped by ours.
- ``full-permutation``: ``train-scvi`` with the loader's shuffle made a full permutation (block 1, one
  window); mapped by ours.
- ``ours``: ``train-scvi`` as it is, through the same in-process path (reproduces bench_mapping's seed).
- ``scvi-permutation``: scvi-tools' model, initial weights and ``TrainingPlan`` (its own random stream, no
  reseeding) in a plain Lightning loop fed a random permutation each epoch (batches of 128, the last 63:
  its loader's distribution); mapped by scvi-tools. The control for the next arm.
- ``scvi-our-loader``: the same, fed the batches of our loader (``ShardedCellDataset``, shuffled as
  train-scvi shuffles: 16-row blocks, 4,096-cell windows, the same seed); mapped by scvi-tools.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import bench_mapping as bm  # noqa: E402
from _harness import OUT_DIR, cellarium_steps_exe  # noqa: E402

ARMS = ("ours", "scvi-reseed", "scvi-init", "scvi-loader", "full-permutation", "scvi-permutation", "scvi-our-loader")
N_EPOCHS = 100


def _train_reference_cli(data_dir: Path, reference: Path, n_cells: int, seed: int) -> None:
    from cellarium_steps.steps.cli import main as cli_main

    rc = cli_main(bm.ours_reference_args(str(data_dir / "reference.h5ad"), str(data_dir / "hvg.txt"), str(reference),
                                         N_EPOCHS, bm.warmup_steps(n_cells, N_EPOCHS), seed))
    if rc not in (0, None):
        sys.exit(f"train-scvi failed ({rc})")


def _train_reference_on_scvi_loader(data_dir: Path, reference: Path, adata, scvi_model, seed: int) -> None:
    import lightning.pytorch as pl
    import torch
    from scvi_tools_parity import scvi_tools_state_to_ours
    from torch.utils.data import DataLoader, IterableDataset

    from cellarium_steps.pipelines.scvi import optimizer_kwargs
    from cellarium_steps.runner import CellariumModule

    # Our checkpoint of the same settings (seed 0 of bench_mapping) gives the recipe; the weights are replaced.
    template = data_dir / "ours_seed0" / "reference.ckpt"
    if not template.is_file():
        sys.exit(f"{template} not found: run benchmarks/bench_mapping.py first")
    model = CellariumModule.from_checkpoint(str(template)).model
    model.load_state_dict(scvi_tools_state_to_ours(scvi_model.module, model, bm.N_LAYERS))
    model.global_step, model.current_epoch = 0, 0
    module = CellariumModule(model, transforms=[], optim_kwargs=optimizer_kwargs(bm.LEARNING_RATE), seed=seed)
    module.train()
    loader = scvi_model._make_data_loader(adata=adata, indices=np.arange(adata.n_obs), batch_size=bm.BATCH_SIZE,
                                          shuffle=True)
    var_names_g = adata.var_names.to_numpy()

    class ScviBatches(IterableDataset):
        def __iter__(self):
            for b in loader:
                yield {"x_ng": b["X"].to_sparse_csr(), "var_names_g": var_names_g,
                       "batch_index_n": b["batch"][:, 0].long()}

        def __len__(self) -> int:
            return len(loader)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=N_EPOCHS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(ScviBatches(), batch_size=None))
    checkpoint = torch.load(template, weights_only=False)
    checkpoint["state_dict"].update({f"model.{k}": v for k, v in module.model.state_dict().items()})
    torch.save(checkpoint, reference)


def _scvi_with_reseeding(reference_ad, query_ad, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import scvi
    from scvi_tools_parity import SeedAsTrainScvi

    kwargs = {**bm.SCVI_TRAIN_KWARGS, "callbacks": [SeedAsTrainScvi(seed)]}
    model = bm.scvi_reference_model(reference_ad, seed)
    model.train(max_epochs=N_EPOCHS, plan_kwargs=bm.scvi_plan_kwargs(bm.warmup_steps(reference_ad.n_obs, N_EPOCHS)),
                **kwargs)
    mapped = scvi.model.SCVI.load_query_data(query_ad.copy(), model)
    mapped.train(max_epochs=N_EPOCHS, plan_kwargs=bm.scvi_plan_kwargs(bm.warmup_steps(query_ad.n_obs, N_EPOCHS),
                 query=True), **kwargs)
    return mapped.get_latent_representation(reference_ad), mapped.get_latent_representation(query_ad)


def _our_loader_batches(data_dir: Path, adata, seed: int) -> list[list[np.ndarray]]:
    """Per epoch, the row numbers of each batch our shuffled loader gives train-scvi (same seed)."""
    from cellarium_steps.data.dataset import ShardedCellDataset
    from cellarium_steps.data.shards import open_shards

    dataset = ShardedCellDataset(open_shards(str(data_dir / "reference.h5ad"), batch_key=bm.BATCH_KEY),
                                 batch_size=bm.BATCH_SIZE, shuffle=True, seed=seed)
    dataset.select_genes(list(adata.var_names[:1]))  # only the cells' names are needed
    row = {name: i for i, name in enumerate(adata.obs_names)}
    epochs = []
    for epoch in range(N_EPOCHS):
        dataset.set_epoch(epoch)
        epochs.append([np.array([row[name] for name in batch["obs_names_n"]]) for batch in dataset])
    return epochs


def _scvi_on_batches(data_dir: Path, reference_ad, query_ad, seed: int, our_loader: bool) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' model and training plan in a plain loop, on a permutation per epoch or on our loader's batches."""
    import lightning.pytorch as pl
    import scvi
    import torch
    from scvi.train import TrainingPlan
    from torch.utils.data import DataLoader, IterableDataset

    from cellarium_steps.data.dataset import collate_identity

    model = bm.scvi_reference_model(reference_ad, seed)
    x_ng = torch.tensor(reference_ad.X.toarray(), dtype=torch.float32)
    batch_n = torch.tensor(reference_ad.obs[bm.BATCH_KEY].cat.codes.to_numpy(), dtype=torch.long)
    epochs = _our_loader_batches(data_dir, reference_ad, seed) if our_loader else None
    n_cells = reference_ad.n_obs

    class Batches(IterableDataset):
        def __init__(self) -> None:
            self.epoch = 0

        def __iter__(self):
            if epochs is None:  # as scvi-tools' RandomSampler: a permutation from its global generator
                order = torch.randperm(n_cells)
                rows = [order[s:s + bm.BATCH_SIZE] for s in range(0, n_cells, bm.BATCH_SIZE)]
            else:
                rows = [torch.from_numpy(r) for r in epochs[self.epoch]]
            self.epoch += 1
            for r in rows:
                yield {"X": x_ng[r], "batch": batch_n[r, None], "labels": torch.zeros(len(r), 1, dtype=torch.long)}

        def __len__(self) -> int:
            return -(-n_cells // bm.BATCH_SIZE)

    plan = TrainingPlan(model.module, **bm.scvi_plan_kwargs(bm.warmup_steps(n_cells, N_EPOCHS)))
    pl.Trainer(accelerator="cpu", max_epochs=N_EPOCHS, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        plan, train_dataloaders=DataLoader(Batches(), batch_size=None, collate_fn=collate_identity))
    model.module.eval()  # as scvi-tools' own train() leaves it
    model.is_trained_ = True
    mapped = scvi.model.SCVI.load_query_data(query_ad.copy(), model)
    mapped.train(max_epochs=N_EPOCHS, plan_kwargs=bm.scvi_plan_kwargs(bm.warmup_steps(query_ad.n_obs, N_EPOCHS),
                 query=True), **bm.SCVI_TRAIN_KWARGS)
    return mapped.get_latent_representation(reference_ad), mapped.get_latent_representation(query_ad)


def run_one(arm: str, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    data_dir = OUT_DIR / "mapping"
    genes = (data_dir / "hvg.txt").read_text().split()
    reference_ad, query_ad = bm.load(str(data_dir / "reference.h5ad"), genes), bm.load(str(data_dir / "query.h5ad"), genes)
    if arm == "scvi-reseed":
        reference_z, query_z = _scvi_with_reseeding(reference_ad, query_ad, seed)
    elif arm in ("scvi-permutation", "scvi-our-loader"):
        reference_z, query_z = _scvi_on_batches(data_dir, reference_ad, query_ad, seed, arm == "scvi-our-loader")
    else:
        run_dir = data_dir / f"arm_{arm}_seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        reference, query = run_dir / "reference.ckpt", run_dir / "query.ckpt"
        if arm == "scvi-loader":
            _train_reference_on_scvi_loader(data_dir, reference, reference_ad, bm.scvi_reference_model(reference_ad, seed), seed)
        else:
            if arm == "scvi-init":
                from scvi_tools_parity import train_scvi_from_scvi_tools_weights

                # The query's model (more batches) is built after the block, with its own weights.
                vae = bm.scvi_reference_model(reference_ad, seed).module
                with train_scvi_from_scvi_tools_weights(vae, bm.N_LAYERS):
                    _train_reference_cli(data_dir, reference, reference_ad.n_obs, seed)
            elif arm == "full-permutation":
                from cellarium_steps.data import dataset as dataset_module

                init = dataset_module.ShardedCellDataset.__init__

                def full_permutation(self, *args, **kwargs) -> None:
                    init(self, *args, **kwargs)
                    self.shuffle_block_size, self.shuffle_window = 1, 10**9

                dataset_module.ShardedCellDataset.__init__ = full_permutation
                _train_reference_cli(data_dir, reference, reference_ad.n_obs, seed)
            else:
                _train_reference_cli(data_dir, reference, reference_ad.n_obs, seed)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([cellarium_steps_exe(), *bm.ours_query_args(
            str(reference), str(data_dir / "query.h5ad"), str(query), N_EPOCHS,
            bm.warmup_steps(query_ad.n_obs, N_EPOCHS), seed)], check=True, env=env)
        reference_z, query_z = bm._latent(str(query), reference_ad), bm._latent(str(query), query_ad)
    metrics = bm.mapping_metrics(reference_z, reference_ad.obs[bm.LABEL_KEY].astype(str).to_numpy(), query_z,
                                 query_ad.obs[bm.LABEL_KEY].astype(str).to_numpy())
    print(f"RESULT {arm} {seed} {metrics['accuracy']:.4f} {metrics['mixing']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--seeds", type=int, default=1, help="seeds, each in its own interpreter (default: 1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.arm, args.first_seed)
        return 0
    accuracies = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        out = subprocess.run([sys.executable, __file__, "--arm", args.arm, "--first-seed", str(seed), "--one"],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT"))
        print(line, flush=True)
        accuracies.append(float(line.split()[3]))
    print(f"{args.arm}: accuracy mean {np.mean(accuracies):.4f} over {len(accuracies)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
