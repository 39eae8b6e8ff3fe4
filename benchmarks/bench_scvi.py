"""Benchmark: ``cellarium-steps train-scvi`` against scvi-tools' ``scvi.model.SCVI``, same run.

Reproduce the full benchmark (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_scvi.py --epochs 20 --throughput-epochs 3 --threads 8

Data: the real multi-batch PBMC file (15,493 cells), 2,000 highly variable genes from scanpy
(``flavor="seurat_v3", batch_key="source"``), batch = ``source``. Both sides train the same
architecture: negative binomial, per-gene dispersion, one hidden layer of 128 units, 10 latent
dimensions, one-hot batch injected into the decoder, batch norm, encoder dropout 0.1, Adam with
learning rate 1e-3, every cell in training (scvi-tools ``train_size=1.0``), and the same linear KL
warm-up over the same number of optimizer steps (``--kl-warmup-steps``, default our train-scvi default:
a quarter of the run's steps; scvi-tools gets ``n_epochs_kl_warmup=None, n_steps_kl_warmup=...``).
Every measurement runs in a fresh interpreter with ``torch.set_num_threads(--threads)``.

quality (batch size 128, ``--epochs``)
    ours: the ``cellarium-steps train-scvi`` console script on the merged file with ``--genes``
    (streaming, sparse, the Filter transform), then the checkpoint's latent means; reference:
    ``SCVI.train``, each with ``--seeds`` seeds (means compared). Reported: 15-NN cell type accuracy on the labelled cells in the latent space
    (5-fold stratified, sklearn ``KNeighborsClassifier``) and the ELBO per cell on all cells with
    the trained model (eval mode, KL weight 1, one latent sample per cell: reconstruction loss + KL,
    each side by its own code).
throughput (batch sizes 128 and 1,024, ``--throughput-epochs``)
    training cells per second over the epochs after the first (the first is a warm-up), timed by a
    Lightning callback on both sides. ours: ``ShardDataModule`` + ``CellariumModule`` +
    ``build_trainer``, as train-scvi builds them (checkpointing left out on both sides), reading the
    10 shards with ``--stream-workers`` loader workers (the checked row) and, for comparison, the
    merged file (gzip-compressed) in the training process; scvi-tools: ``SCVI.train`` on the
    AnnData in memory.
streaming (ours, batch size 1,024, ``--stream-repeats`` interleaved runs of each case, medians)
    the same training from 10 shards (the cells shuffled, then split; ``--stream-workers`` DataLoader
    workers, train-scvi's ``--num-workers``) vs the cells in memory (their HVG counts read once
    beforehand into one CSR matrix, a fresh permutation every epoch, batches gathered from it, no
    worker: what training on an AnnData in memory does): the overhead of streaming. Also reported,
    not checked: one epoch's batches read beforehand and replayed every epoch, which loads nothing.

Acceptance (printed; exit 1 if one fails): kNN accuracy >= scvi-tools' - 0.01; ELBO per cell within
2%; throughput >= 1.5 x scvi-tools' at both batch sizes; streaming overhead <= 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    OUT_DIR,
    add_worker_arguments,
    cellarium_steps_exe,
    print_checks,
    print_table,
    run_if_worker,
    run_json_worker,
    source_h5ad,
)

BATCH_KEY = "source"
LABEL_KEY = "cell_type_ontology_term_id"
N_TOP_GENES = 2000
N_HIDDEN, N_LATENT, LEARNING_RATE = 128, 10, 1e-3
KNN_K, KNN_FOLDS = 15, 5
QUALITY_BATCH_SIZE = 128
THROUGHPUT_BATCH_SIZES = (128, 1024)
STREAM_BATCH_SIZE = 1024
N_STREAM_SHARDS = 10
FULL_COMMAND = ".venv/bin/python benchmarks/bench_scvi.py --epochs 20 --throughput-epochs 3 --threads 8"

KNN_TOLERANCE = 0.01
ELBO_RTOL = 0.02
SPEEDUP_MIN = 1.5
STREAM_OVERHEAD_MAX = 0.20

OURS = "cellarium-steps"
SCVI_TOOLS = "scvi-tools"


# ----------------------------------------------------------------------------------------------- data


def prepare_data(out_dir: Path, seed: int, n_cells: int | None = None) -> dict[str, str]:
    """HVG gene list (scanpy, on the whole merged file) and the cells (all, or a random ``n_cells``) as
    one file and as 10 shuffled shards; cached under ``out_dir``."""
    import anndata as ad
    import scanpy as sc

    out_dir.mkdir(parents=True, exist_ok=True)
    source = source_h5ad()
    genes_path = out_dir / "hvg_genes.txt"
    adata = None
    if not genes_path.is_file():
        adata = ad.read_h5ad(source)
        hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_TOP_GENES, batch_key=BATCH_KEY,
                                          inplace=False)
        genes_path.write_text("\n".join(adata.var_names[hvg["highly_variable"].to_numpy()]) + "\n")
    cells_dir = out_dir / ("cells_all" if n_cells is None else f"cells_{n_cells}")
    merged = source if n_cells is None else cells_dir / "merged.h5ad"
    shard_paths = [cells_dir / f"shards_{N_STREAM_SHARDS}" / f"shard_{i:03d}.h5ad" for i in range(N_STREAM_SHARDS)]
    if not (Path(merged).is_file() and all(p.is_file() for p in shard_paths)):
        adata = adata if adata is not None else ad.read_h5ad(source)
        rng = np.random.default_rng(seed)
        if n_cells is not None:
            adata = adata[np.sort(rng.choice(adata.n_obs, min(n_cells, adata.n_obs), replace=False))].copy()
            cells_dir.mkdir(parents=True, exist_ok=True)
            adata.write_h5ad(merged)
        shard_paths[0].parent.mkdir(parents=True, exist_ok=True)
        order = rng.permutation(adata.n_obs)
        bounds = np.linspace(0, adata.n_obs, N_STREAM_SHARDS + 1).astype(int)
        for i, path in enumerate(shard_paths):
            adata[np.sort(order[bounds[i] : bounds[i + 1]])].copy().write_h5ad(path)
    return {"source": str(merged), "genes": str(genes_path), "shards": str(shard_paths[0].parent / "*.h5ad")}


def default_warmup_steps(n_cells: int, batch_size: int, epochs: int) -> int:
    from cellarium_steps.pipelines.scvi import default_kl_warmup_steps

    return default_kl_warmup_steps(epochs, -(-n_cells // batch_size))


# ----------------------------------------------------------------------------------------------- workers
# Each runs in its own interpreter (``--worker NAME --spec JSON``) and prints one JSON line.


class EpochTimer:
    """Lightning callback: (wall time, cells, CPU time of the process) of each training epoch."""

    def __new__(cls):  # a Callback subclass built lazily, so the parent process never imports Lightning
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def __init__(self) -> None:
                self.epochs: list[tuple[float, int]] = []

            def on_train_epoch_start(self, trainer, pl_module) -> None:
                self._start, self._cpu, self._cells = time.perf_counter(), time.process_time(), 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                x = batch["x_ng"] if "x_ng" in batch else batch["X"]
                self._cells += int(x.shape[0])

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                self.epochs.append((time.perf_counter() - self._start, self._cells, time.process_time() - self._cpu))

        return _Timer()


def rates(epochs: list[tuple[float, int, float]]) -> dict:
    """Cells per wall second and per CPU second (all threads) over the epochs after the first."""
    timed = epochs[1:] if len(epochs) > 1 else epochs
    cells = sum(e[1] for e in timed)
    return {"cells_per_s": cells / sum(e[0] for e in timed), "cells_per_cpu_s": cells / sum(e[2] for e in timed),
            "epochs": epochs}


class InMemoryCells:
    """An iterable dataset over cells held in memory: one CSR matrix and their batch indices, shuffled
    anew every epoch (each ``iter``) and cut into batches with the streaming loader's keys."""

    def __new__(cls, batches: list[dict], batch_size: int, seed: int):
        import numpy as np
        import scipy.sparse as sp
        import torch
        from torch.utils.data import IterableDataset

        from cellarium_steps.data.dataset import csr_to_torch, torch_to_csr

        class _Cells(IterableDataset):
            def __init__(self) -> None:
                self.x = sp.vstack([torch_to_csr(b["x_ng"]) for b in batches], format="csr")
                self.batch_index_n = np.concatenate([b["batch_index_n"].numpy() for b in batches])
                self.var_names_g = batches[0]["var_names_g"]
                self.epoch = 0

            def __iter__(self):
                order = np.random.default_rng([seed, self.epoch]).permutation(self.x.shape[0])
                self.epoch += 1
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    yield {"x_ng": csr_to_torch(self.x[rows]), "var_names_g": self.var_names_g,
                           "batch_index_n": torch.from_numpy(self.batch_index_n[rows])}

        return _Cells()


def worker_ours_throughput(spec: dict) -> dict:
    """Our training path (what train-scvi builds), without checkpoints; ``data``: file, shards, memory or
    replayed (see the module docstring)."""
    import torch
    from torch.utils.data import DataLoader

    from cellarium_steps.data import ShardDataModule
    from cellarium_steps.data.dataset import collate_identity
    from cellarium_steps.models.scvi import SingleCellVariationalInference, scvi_tools_default_architecture
    from cellarium_steps.runner import CellariumModule, build_trainer
    from cellarium_steps.runner.recipe import spec as recipe_spec
    from cellarium_steps.steps.cli import configure_allocator
    from cellarium_steps.outputs.genes import read_gene_list
    from cellarium_steps.pipelines.scvi import optimizer_kwargs
    from cellarium_steps.transforms.filter import Filter

    configure_allocator()  # as the cellarium-steps command does before any step
    torch.set_num_threads(spec["threads"])
    inputs = spec["shards"] if spec["data"] == "shards" else spec["source"]
    datamodule = ShardDataModule(inputs, batch_size=spec["batch_size"], batch_key=BATCH_KEY, shuffle=True, seed=0,
                                 num_workers=spec.get("num_workers", 0), with_totals=False, with_obs_names=False)
    genes = read_gene_list(spec["genes"])
    datamodule.select_genes(genes)  # as train-scvi: the loader reads only the HVG columns
    encoder, decoder = scvi_tools_default_architecture(N_HIDDEN, 1)
    recipe = {
        "model": recipe_spec(
            SingleCellVariationalInference, var_names_g=genes, encoder=encoder, decoder=decoder,
            n_batch=datamodule.collection.n_batch, n_latent=N_LATENT, gene_likelihood="nb", dispersion="gene",
            kl_warmup_epochs=None, kl_warmup_steps=spec["kl_warmup_steps"],
        ),
        "transforms": [recipe_spec(Filter, filter_list=genes)],
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs=optimizer_kwargs(LEARNING_RATE), seed=0)
    timer = EpochTimer()
    trainer = build_trainer(accelerator="cpu", max_epochs=spec["epochs"], trainable=True, callbacks=[timer],
                            progress_every_s=1e9)
    if spec["data"] == "memory":
        # The in-memory case: every cell's HVG counts read once, before timing, into one CSR matrix;
        # each epoch a fresh permutation, its batches gathered from that matrix (as scvi-tools'
        # AnnDataLoader does from an AnnData in memory).
        cells = InMemoryCells(list(datamodule.dataset), spec["batch_size"], seed=0)
        trainer.fit(module, train_dataloaders=DataLoader(cells, batch_size=None, collate_fn=collate_identity))
    elif spec["data"] == "replayed":
        batches = list(datamodule.dataset)  # one epoch's batches, read once and replayed: no loading at all
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=collate_identity))
    else:
        trainer.fit(module, datamodule=datamodule)
    return rates(timer.epochs)


def _scvi_model(spec: dict, adata):
    import scvi

    scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    return scvi.model.SCVI(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, n_layers=1, gene_likelihood="nb",
                           dispersion="gene")


def _load_reference_adata(spec: dict):
    import anndata as ad

    adata = ad.read_h5ad(spec["source"])
    genes = Path(spec["genes"]).read_text().split()
    adata = adata[:, genes].copy()
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    return adata


def _scvi_train(model, spec: dict, callbacks: list) -> None:
    model.train(
        max_epochs=spec["epochs"], batch_size=spec["batch_size"], train_size=1.0, accelerator="cpu", devices=1,
        plan_kwargs={"lr": LEARNING_RATE, "n_epochs_kl_warmup": None, "n_steps_kl_warmup": spec["kl_warmup_steps"]},
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False,
    )


def worker_scvi_throughput(spec: dict) -> dict:
    import scvi
    import torch

    torch.set_num_threads(spec["threads"])
    scvi.settings.seed = 0
    model = _scvi_model(spec, _load_reference_adata(spec))
    timer = EpochTimer()
    _scvi_train(model, spec, [timer])
    return rates(timer.epochs)


def _knn_accuracy(latent_nk: np.ndarray, labels_n: np.ndarray) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(n_splits=KNN_FOLDS, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=KNN_K), latent_nk, labels_n, cv=folds).mean())


def _labelled(adata) -> np.ndarray:
    from cellarium_steps.ontology import is_unlabelled

    return np.array([not is_unlabelled(v) for v in adata.obs[LABEL_KEY].astype(object)])


def worker_ours_quality(spec: dict) -> dict:
    """train-scvi through its console script, then latent means and ELBO from the checkpoint."""
    import torch

    from cellarium_steps.runner import CellariumModule

    torch.set_num_threads(spec["threads"])
    output = Path(spec["out_dir"]) / f"ours_quality_seed{spec.get('seed', 0)}" / "scvi.ckpt"
    if output.exists():
        output.unlink()
    checkpoint_dir = Path(str(output) + ".d")
    if checkpoint_dir.exists():
        import shutil

        shutil.rmtree(checkpoint_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    start = time.perf_counter()
    subprocess.run(
        [cellarium_steps_exe(), "train-scvi", "--input", spec.get("train_input", spec["source"]), "--batch-key", BATCH_KEY, "--genes",
         spec["genes"], "--max-epochs", str(spec["epochs"]), "--batch-size", str(QUALITY_BATCH_SIZE),
         "--kl-warmup-steps", str(spec["kl_warmup_steps"]), "--n-hidden", str(N_HIDDEN), "--n-latent",
         str(N_LATENT), "--learning-rate", str(LEARNING_RATE), "--accelerator", "cpu",
         "--seed", str(spec.get("seed", 0)),
         "--output", str(output), "--quiet"],
        check=True, env=env,
    )
    train_s = time.perf_counter() - start
    adata = _load_reference_adata(spec)
    module = CellariumModule.from_checkpoint(str(output))
    model = module.model.eval()
    categories = list(module.recipe["data"]["batch_categories"])
    batch_index_n = torch.tensor([categories.index(b) for b in adata.obs[BATCH_KEY].astype(str)])
    genes = adata.var_names.values
    latents, elbos = [], []
    torch.manual_seed(0)
    with torch.no_grad():
        for start_row in range(0, adata.n_obs, 1024):
            rows = slice(start_row, min(start_row + 1024, adata.n_obs))
            x_ng = torch.tensor(adata.X[rows].toarray(), dtype=torch.float32)
            latents.append(model.predict(x_ng, genes, batch_index_n[rows])["x_ng"].numpy())
            out = model(x_ng, genes, batch_index_n[rows])
            elbos.append(-(out["reconstruction_loss"] + out["kl_divergence_z"]).numpy())
    latent_nk, elbo_n = np.concatenate(latents), np.concatenate(elbos)
    labelled = _labelled(adata)
    return {"knn_accuracy": _knn_accuracy(latent_nk[labelled], adata.obs[LABEL_KEY].astype(str).values[labelled]),
            "elbo_per_cell": float(elbo_n.mean()), "train_s": train_s}


def worker_scvi_quality(spec: dict) -> dict:
    import scvi
    import torch

    torch.set_num_threads(spec["threads"])
    scvi.settings.seed = spec.get("seed", 0)
    adata = _load_reference_adata(spec)
    model = _scvi_model(spec, adata)
    start = time.perf_counter()
    _scvi_train(model, {**spec, "batch_size": QUALITY_BATCH_SIZE}, [])
    train_s = time.perf_counter() - start
    latent_nk = model.get_latent_representation()
    module = model.module.eval()
    elbos = []
    torch.manual_seed(0)
    with torch.no_grad():
        for tensors in model._make_data_loader(adata=adata, batch_size=1024, shuffle=False):
            _, _, losses = module(tensors, loss_kwargs={"kl_weight": 1.0})
            rec_n = losses.reconstruction_loss["reconstruction_loss"]
            kl_n = losses.kl_local["kl_divergence_z"]
            elbos.append(-(rec_n + kl_n).numpy())
    labelled = _labelled(adata)
    return {"knn_accuracy": _knn_accuracy(latent_nk[labelled], adata.obs[LABEL_KEY].astype(str).values[labelled]),
            "elbo_per_cell": float(np.concatenate(elbos).mean()), "train_s": train_s}


WORKERS = {
    "ours-throughput": worker_ours_throughput,
    "scvi-throughput": worker_scvi_throughput,
    "ours-quality": worker_ours_quality,
    "scvi-quality": worker_scvi_quality,
}


def run_worker(name: str, spec: dict) -> dict:
    """``name`` in a fresh interpreter; its result (the last stdout line, JSON)."""
    shown = {k: v for k, v in spec.items() if k not in ("source", "genes", "shards", "out_dir")}
    return run_json_worker(__file__, name, spec, f"[bench_scvi] {name} {json.dumps(shown)}")


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="quality: training epochs (default: 20)")
    parser.add_argument("--throughput-epochs", type=int, default=3,
                        help="throughput: epochs per run; the first is not timed (default: 3)")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1),
                        help="torch threads on both sides (default: all cores)")
    parser.add_argument("--kl-warmup-steps", type=int, default=None,
                        help="KL warm-up steps on both sides (default: train-scvi's default for --epochs at batch size 128)")
    parser.add_argument("--cells", type=int, default=None,
                        help="train on this many randomly chosen cells instead of all 15,493 (a quicker check)")
    parser.add_argument("--timing", choices=("wall", "cpu"), default="wall",
                        help="speed-ups from wall time (default) or from the processes' CPU time, steadier on a "
                        "machine shared with other jobs (use with --threads 1)")
    parser.add_argument("--stream-workers", type=int, default=0,
                        help="streaming: DataLoader worker processes reading the shards (train-scvi --num-workers; "
                        "default: 0, train-scvi's default; on 2 cores a worker process competes with the training "
                        "threads); with --timing cpu their CPU time is not counted")
    parser.add_argument("--seeds", type=int, default=3,
                        help="quality: training seeds per side, compared by their means (default: 3); the 15-NN "
                        "accuracy of one seed varies by ~0.02")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="quality: the first training seed (seeds first-seed .. first-seed + seeds - 1; default: 0), "
                        "to add seeds to an earlier run")
    parser.add_argument("--stream-repeats", type=int, default=3,
                        help="streaming: runs of each case, interleaved, medians compared (default: 3)")
    parser.add_argument("--skip-quality", action="store_true", help="throughput and streaming only")
    parser.add_argument("--skip-throughput", action="store_true", help="quality only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard split (default: 0)")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if run_if_worker(args, WORKERS):
        return 0

    out_dir = OUT_DIR / "scvi"
    data = prepare_data(out_dir, args.seed, args.cells)
    import anndata as ad

    n_cells = ad.read_h5ad(data["source"], backed="r").n_obs
    warmup = args.kl_warmup_steps or default_warmup_steps(n_cells, QUALITY_BATCH_SIZE, args.epochs)
    base = {**data, "threads": args.threads, "out_dir": str(out_dir)}
    rows: list[dict] = []
    checks: dict[str, tuple[float, bool]] = {}

    if not args.skip_quality:
        spec = {**base, "epochs": args.epochs, "batch_size": QUALITY_BATCH_SIZE, "kl_warmup_steps": warmup}
        results: dict[str, list[dict]] = {OURS: [], SCVI_TOOLS: []}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            results[OURS].append(run_worker("ours-quality", {**spec, "seed": seed}))
            results[SCVI_TOOLS].append(run_worker("scvi-quality", {**spec, "seed": seed}))
        mean: dict[str, dict[str, float]] = {}
        for tool, runs in results.items():
            knn = np.array([r["knn_accuracy"] for r in runs])
            elbo = np.array([r["elbo_per_cell"] for r in runs])
            mean[tool] = {"knn": float(knn.mean()), "elbo": float(elbo.mean())}
            rows.append({"measure": f"quality, {args.epochs} epochs, batch 128, {args.seeds} seeds", "tool": tool,
                         "15-NN accuracy": round(float(knn.mean()), 4), "(sd)": round(float(knn.std()), 4),
                         "per seed": " ".join(f"{v:.3f}" for v in knn),
                         "ELBO per cell": round(float(elbo.mean()), 2),
                         "train s": round(float(np.mean([r["train_s"] for r in runs])), 1)})
        knn_gap = mean[OURS]["knn"] - mean[SCVI_TOOLS]["knn"]
        elbo_rel = abs(mean[OURS]["elbo"] - mean[SCVI_TOOLS]["elbo"]) / abs(mean[SCVI_TOOLS]["elbo"])
        checks["kNN accuracy, ours - scvi-tools (mean over seeds)"] = (knn_gap, knn_gap >= -KNN_TOLERANCE)
        checks["ELBO per cell, relative difference (mean over seeds)"] = (elbo_rel, elbo_rel <= ELBO_RTOL)

    rate_key = "cells_per_s" if args.timing == "wall" else "cells_per_cpu_s"
    if not args.skip_throughput:
        streamed: dict[int, dict] = {}
        for batch_size in THROUGHPUT_BATCH_SIZES:
            warmup_t = default_warmup_steps(n_cells, batch_size, args.throughput_epochs)
            spec = {**base, "epochs": args.throughput_epochs, "batch_size": batch_size, "kl_warmup_steps": warmup_t}
            ours = run_worker("ours-throughput", {**spec, "data": "shards", "num_workers": args.stream_workers})
            ours_file = run_worker("ours-throughput", {**spec, "data": "file"})
            ref = run_worker("scvi-throughput", spec)
            streamed[batch_size] = ours
            measure = f"throughput, batch {batch_size}"
            for tool, res in (
                (f"{OURS}, {N_STREAM_SHARDS} shards, {args.stream_workers} loader workers", ours),
                (f"{OURS}, the merged file (gzip), no loader worker", ours_file),
            ):
                rows.append({"measure": measure, "tool": tool, "cells/s": round(res["cells_per_s"], 1),
                             "cells/CPU-s": round(res["cells_per_cpu_s"], 1),
                             "x scvi-tools": round(res[rate_key] / ref[rate_key], 2)})
            rows.append({"measure": measure, "tool": SCVI_TOOLS, "cells/s": round(ref["cells_per_s"], 1),
                         "cells/CPU-s": round(ref["cells_per_cpu_s"], 1)})
            speedup = ours[rate_key] / ref[rate_key]
            checks[f"throughput speed-up, batch {batch_size} ({N_STREAM_SHARDS} shards)"] = (speedup, speedup >= SPEEDUP_MIN)
        spec = {**base, "epochs": args.throughput_epochs, "batch_size": STREAM_BATCH_SIZE,
                "kl_warmup_steps": default_warmup_steps(n_cells, STREAM_BATCH_SIZE, args.throughput_epochs)}
        # Interleaved repeats, medians compared: one run's rate moves by 10-30% on a shared machine.
        stream_rates: dict[str, list[float]] = {"shards": [streamed[STREAM_BATCH_SIZE][rate_key]], "memory": [],
                                                "replayed": []}
        for repeat in range(args.stream_repeats):
            for data_mode in ("shards", "memory", "replayed"):
                if data_mode == "shards" and repeat == 0:
                    continue  # the throughput run above is the first
                worker_spec = {**spec, "data": data_mode, "num_workers": args.stream_workers if data_mode == "shards" else 0}
                stream_rates[data_mode].append(run_worker("ours-throughput", worker_spec)[rate_key])
        median = {mode: float(np.median(values)) for mode, values in stream_rates.items()}
        unit = "cells/s" if args.timing == "wall" else "cells/CPU-s"
        for mode, tool in (("shards", f"{OURS}, {N_STREAM_SHARDS} shards, {args.stream_workers} loader workers"),
                           ("memory", f"{OURS}, cells in memory, shuffled each epoch"),
                           ("replayed", f"{OURS}, one epoch's batches replayed (no loading)")):
            overhead = median[mode] / median["shards"] - 1.0
            rows.append({"measure": f"streaming, batch {STREAM_BATCH_SIZE}, median of {len(stream_rates[mode])}",
                         "tool": tool, unit: round(median[mode], 1),
                         "runs": " ".join(f"{v:.0f}" for v in stream_rates[mode]),
                         "shards' overhead": "" if mode == "shards" else f"{overhead:+.1%}"})
        overhead = median["memory"] / median["shards"] - 1.0
        checks["streaming overhead (10 shards vs cells in memory)"] = (overhead, overhead <= STREAM_OVERHEAD_MAX)

    print(f"\n{n_cells:,} cells, {N_TOP_GENES} HVGs, batch = {BATCH_KEY}, {args.threads} torch threads, "
          f"KL warm-up {warmup} steps (quality), speed-ups from {args.timing} time\n")
    print_table(rows)
    print()
    return print_checks(checks, FULL_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
