"""Diagnostic for bench_mapping.py: is our reference training scvi-tools' training, step by step, at the
benchmark's scale? And how soon do two runs that differ only by rounding part?

    .venv/bin/python benchmarks/diagnose_mapping_replay.py --seed 0 --epochs 12
    .venv/bin/python benchmarks/diagnose_mapping_replay.py --seed 0 --epochs 12 --recorded scvi-train

``train-scvi`` (the CLI, in-process, bench_mapping's reference settings and data, cached under
``benchmarks/out/mapping`` by it; run it once first) starts from scvi-tools' initial weights of the seed
and records every training batch its model sees (counts, batch codes), its KL weight and its loss.
scvi-tools' ``TrainingPlan`` then replays those batches with the same per-step seeds (the same dropout
masks and reparametrisation noise), twice: from the same initial weights, and, as a control, from those
weights times (1 + 1e-7 N(0, 1)), a perturbation of float32 rounding's size. Printed per epoch: the
largest relative difference of a step's loss, ours against each replay.

With ``--recorded scvi-train`` the recorded side is scvi-tools' own ``SCVI.train`` (bench_mapping's
scvi-tools worker: its data splitter, loader and trainer), torch seeded before each step as train-scvi
seeds it: whether ``SCVI.train`` does anything to training that its ``TrainingPlan`` in a plain Lightning
loop, on the same batches, does not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # scvi_tools_parity

import bench_mapping as bm  # noqa: E402
from _harness import OUT_DIR  # noqa: E402

PERTURBATION = 1e-7


def record_train_scvi(data_dir: Path, adata, vae, seed: int, epochs: int, warmup: int) -> list[dict]:
    """Run train-scvi from ``vae``'s weights; every training step's batch, KL weight and loss."""
    from scvi_tools_parity import train_scvi_from_scvi_tools_weights

    from cellarium_steps.steps.cli import main as cli_main

    output = data_dir / f"replay_seed{seed}" / "reference.ckpt"
    shutil.rmtree(output.parent, ignore_errors=True)
    output.parent.mkdir()
    steps: list[dict] = []
    with train_scvi_from_scvi_tools_weights(vae, bm.N_LAYERS, record=steps):
        rc = cli_main(bm.ours_reference_args(str(data_dir / "reference.h5ad"), str(data_dir / "hvg.txt"), str(output),
                                             epochs, warmup, seed))
    if rc not in (0, None):
        sys.exit(f"train-scvi failed ({rc})")
    return steps


def record_scvi_train(adata, seed: int, epochs: int, warmup: int) -> tuple[object, list[dict]]:
    """Train ``SCVI.train`` as bench_mapping's scvi-tools worker does, torch seeded before each step as
    train-scvi seeds it; its module (initial weights restored) and every step's batch, KL weight and loss."""
    from scvi_tools_parity import SeedAsTrainScvi

    model = bm.scvi_reference_model(adata, seed)
    initial = {name: value.clone() for name, value in model.module.state_dict().items()}
    steps: list[dict] = []

    class SeedAndRecord(SeedAsTrainScvi):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            steps.append({key: value.clone() for key, value in batch.items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            steps[-1].update(loss=float(outputs["loss"]), kl_weight=float(pl_module.kl_weight))

    model.train(max_epochs=epochs, plan_kwargs=bm.scvi_plan_kwargs(warmup), callbacks=[SeedAndRecord(seed)],
                **bm.SCVI_TRAIN_KWARGS)
    model.module.load_state_dict(initial)
    return model.module, steps


def replay(vae, initial: dict, steps: list[dict], seed: int, warmup: int,
           perturbation: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' replay of ``steps`` from ``initial`` weights, optionally times (1 + perturbation N(0, 1))."""
    import torch
    from scvi_tools_parity import replay_in_scvi_tools

    vae.load_state_dict(initial)
    if perturbation:
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for parameter in vae.parameters():
                parameter.mul_(1 + perturbation * torch.randn(parameter.shape, generator=generator))
    return replay_in_scvi_tools(vae, steps, seed, warmup, bm.LEARNING_RATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the seed of both sides (default: 0)")
    parser.add_argument("--epochs", type=int, default=12,
                        help="epochs recorded (default: 12); the KL warm-up is the 100-epoch bench's")
    parser.add_argument("--recorded", choices=("train-scvi", "scvi-train"), default="train-scvi",
                        help="the side recorded and replayed: our CLI (default) or scvi-tools' SCVI.train")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    data_dir = OUT_DIR / "mapping"
    if not (data_dir / "hvg.txt").is_file():
        sys.exit(f"{data_dir} has no benchmark data: run benchmarks/bench_mapping.py first")
    genes = (data_dir / "hvg.txt").read_text().split()
    adata = bm.load(str(data_dir / "reference.h5ad"), genes)
    warmup = bm.warmup_steps(adata.n_obs, 100)
    if args.recorded == "scvi-train":
        vae, steps = record_scvi_train(adata, args.seed, args.epochs, warmup)
    else:
        vae = bm.scvi_reference_model(adata, args.seed).module
    initial = {name: value.clone() for name, value in vae.state_dict().items()}
    if args.recorded == "train-scvi":
        steps = record_train_scvi(data_dir, adata, vae, args.seed, args.epochs, warmup)
    ours = np.array([s["loss"] for s in steps])
    sizes = sorted({len(s["batch"]) for s in steps})
    steps_per_epoch = len(steps) // args.epochs
    print(f"{args.recorded}: {len(steps)} steps, {steps_per_epoch} per epoch, batch sizes {sizes}")
    for name, perturbation in (("scvi-tools replay", 0.0), (f"scvi-tools replay, weights x (1 + {PERTURBATION:g} N)",
                                                            PERTURBATION)):
        theirs, kl_weights = replay(vae, initial, steps, args.seed, warmup, perturbation)
        relative = np.abs(ours - theirs) / np.abs(theirs)
        kl_difference = np.abs(kl_weights - np.array([s["kl_weight"] for s in steps])).max()
        per_epoch = " ".join(f"{relative[e * steps_per_epoch:(e + 1) * steps_per_epoch].max():.0e}"
                             for e in range(args.epochs))
        print(f"{name}: largest relative loss difference per epoch: {per_epoch} (KL weight max |diff| "
              f"{kl_difference:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
