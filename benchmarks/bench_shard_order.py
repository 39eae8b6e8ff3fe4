"""Benchmark: scVI trained on a collection whose shards are one per source, against the same cells
in one shuffled shard (what scvi-tools' full permutation gives), and the training loader's speed.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/bench_shard_order.py --seeds 3 --epochs 20

Data: the merged PBMC file (15,493 cells, 6 sources, Cell Ontology labels on 7,717 cells), written
under ``benchmarks/out/shard_order/`` twice: ``by_source/`` (one shard per source, a collection as
CELLxGENE or a lab keeps them) and ``permuted/`` (one shard, the cells in a random order); 2,000
Seurat v3 HVGs with ``batch_key="source"`` (scanpy).

Per layout and seed, ``cellarium-steps train-scvi`` (batch key ``source``, scArches' reference
architecture: ``encode_covariates``, layer norm, no batch norm, 2 x 128 hidden, 10 latent, dropout
0.2; batch size 128, lr 1e-3; one torch thread) and then, on the latent means of every cell:

- ``accuracy``: leave-one-source-out 15-NN label transfer (each labelled source's cells voted by the
  labelled cells of the other sources, right at the label or a descendant), mean over the sources
  with labels;
- ``mixing``: the fraction of each cell's 15 neighbours from the other sources (reference neighbour
  fraction), mean over sources.

Both layouts hold the same cells, so any difference is the order the loader gives: a collection
whose shards are datasets trained one dataset after another (the loader before its windows spanned
shards) loses accuracy. ``--loader`` instead times train-scvi's dataset (batch 1,024, the HVGs, no
loader worker; three shuffled epochs, cells/s each) on the per-source layout resampled to
``--loader-cells-per-shard`` cells a shard (rows drawn with replacement, counts binomially thinned
by 0.8; the HVGs only; ``benchmarks/out/shard_order/loader_{cells}/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import OUT_DIR, cellarium_steps_exe, checkpoint_latent, source_h5ad  # noqa: E402

BATCH_KEY = "source"
LABEL_KEY = "cell_type_ontology_term_id"
BATCH_SIZE = 128
KNN_K = 15
LAYOUTS = {"by_source": "by_source/*.h5ad", "permuted": "permuted/all.h5ad"}


def prepare(out_dir: Path) -> Path:
    """The two layouts and the HVG list, cached under ``out_dir``."""
    genes = out_dir / "hvg.txt"
    if genes.is_file():
        return genes
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(source_h5ad())
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    for layout in LAYOUTS:
        (out_dir / layout).mkdir(parents=True, exist_ok=True)
    for source in adata.obs[BATCH_KEY].cat.categories:
        adata[(adata.obs[BATCH_KEY] == source).to_numpy()].copy().write_h5ad(out_dir / "by_source" / f"{source}.h5ad")
    adata[np.random.default_rng(0).permutation(adata.n_obs)].copy().write_h5ad(out_dir / "permuted" / "all.h5ad")
    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000, batch_key=BATCH_KEY, inplace=False)
    genes.write_text("\n".join(adata.var_names[hvg["highly_variable"].to_numpy()]) + "\n")
    return genes


def latent_and_obs(checkpoint: str, h5ad: Path, genes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checkpoint's latent means of every cell, with each cell's source and label."""
    import anndata as ad

    adata = ad.read_h5ad(h5ad)[:, genes].copy()
    return (checkpoint_latent(checkpoint, adata, BATCH_KEY), adata.obs[BATCH_KEY].astype(str).to_numpy(),
            adata.obs[LABEL_KEY].astype(str).to_numpy())


def leave_one_source_out(z: np.ndarray, source_n: np.ndarray, label_n: np.ndarray) -> dict:
    from cellarium_steps.models._latent_metrics import mapping_metrics
    from cellarium_steps.ontology import is_unlabelled

    accuracy, mixing = {}, {}
    for source in np.unique(source_n):
        held_out = source_n == source
        metrics = mapping_metrics(z[~held_out], label_n[~held_out], z[held_out], label_n[held_out], KNN_K)
        if any(not is_unlabelled(v) for v in label_n[held_out]):
            accuracy[str(source)] = metrics["accuracy"]
        mixing[str(source)] = metrics["mixing"]
    return {"accuracy": float(np.mean(list(accuracy.values()))), "mixing": float(np.mean(list(mixing.values()))),
            "accuracy_per_source": accuracy}


def train_and_score(out_dir: Path, genes_txt: Path, layout: str, seed: int, epochs: int) -> dict:
    import anndata as ad

    from cellarium_steps.pipelines.scvi import default_kl_warmup_steps

    checkpoint = out_dir / f"{layout}_seed{seed}.ckpt"
    # A finished run's checkpoint would be resumed (and found complete), not trained again.
    for stale in out_dir.glob(f"{checkpoint.name}*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    genes = genes_txt.read_text().split()
    n_cells = ad.read_h5ad(out_dir / LAYOUTS["permuted"], backed="r").n_obs  # both layouts hold the same cells
    args = ["train-scvi", "--input", str(out_dir / LAYOUTS[layout]), "--batch-key", BATCH_KEY, "--genes", str(genes_txt),
            "--encode-covariates", "--use-layer-norm", "both", "--use-batch-norm", "none", "--n-layers", "2",
            "--n-hidden", "128", "--n-latent", "10", "--dropout-rate", "0.2", "--max-epochs", str(epochs),
            "--kl-warmup-steps", str(default_kl_warmup_steps(epochs, -(-n_cells // BATCH_SIZE))),
            "--batch-size", str(BATCH_SIZE), "--learning-rate", "1e-3", "--accelerator", "cpu", "--seed", str(seed),
            "--output", str(checkpoint), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([cellarium_steps_exe(), *args], check=True, env=env)
    seconds = time.perf_counter() - start
    scores = leave_one_source_out(*latent_and_obs(str(checkpoint), out_dir / "permuted" / "all.h5ad", genes))
    return {"layout": layout, "seed": seed, "train_s": seconds, **scores}


def resampled_shards(out_dir: Path, genes: list[str], cells_per_shard: int) -> Path:
    """The per-source shards at ``cells_per_shard`` cells each (resampled, thinned), HVGs only; cached."""
    import anndata as ad

    shard_dir = out_dir / f"loader_{cells_per_shard}"
    if shard_dir.is_dir():
        return shard_dir
    partial = shard_dir.with_name(shard_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for path in sorted((out_dir / "by_source").glob("*.h5ad")):
        adata = ad.read_h5ad(path)[:, genes].copy()
        rows = rng.integers(0, adata.n_obs, cells_per_shard)
        x = adata.X[rows].tocsr().astype(np.int64)
        x.data = rng.binomial(x.data, 0.8)
        x.eliminate_zeros()
        resampled = ad.AnnData(X=x.astype(np.int32), obs=adata.obs.iloc[rows].reset_index(drop=True), var=adata.var)
        resampled.obs_names = [f"{path.stem}_{i}" for i in range(cells_per_shard)]
        resampled.write_h5ad(partial / path.name)
    partial.rename(shard_dir)
    return shard_dir


def loader_rates(shard_dir: Path, genes: list[str]) -> list[float]:
    from torch.utils.data import DataLoader

    from cellarium_steps.data.dataset import ShardedCellDataset, collate_identity
    from cellarium_steps.data.shards import open_shards

    collection = open_shards(str(shard_dir / "*.h5ad"), batch_key=BATCH_KEY)
    dataset = ShardedCellDataset(collection, batch_size=1024, shuffle=True, seed=0, genes=genes, with_obs_names=False)
    rates = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in DataLoader(dataset, batch_size=None, num_workers=0, collate_fn=collate_identity):
            n += batch["x_ng"].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per layout (default: 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20, help="scVI epochs (default: 20)")
    parser.add_argument("--loader", action="store_true", help="time the training loader instead (see above)")
    parser.add_argument("--loader-cells-per-shard", type=int, default=20000,
                        help="--loader: cells in each of the 6 resampled shards (default: 20,000)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out_dir = OUT_DIR / "shard_order"
    genes_txt = prepare(out_dir)
    if args.loader:
        genes = genes_txt.read_text().split()
        shard_dir = resampled_shards(out_dir, genes, args.loader_cells_per_shard)
        rates = loader_rates(shard_dir, genes)
        print(f"loader, 6 x {args.loader_cells_per_shard:,} cells: cells/s per shuffled epoch "
              + " ".join(f"{r:.0f}" for r in rates), flush=True)
        return 0
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for layout in LAYOUTS:  # interleaved, so that a slow spell of a shared machine hits both
            result = train_and_score(out_dir, genes_txt, layout, seed, args.epochs)
            results[layout].append(result)
            print(json.dumps(result), flush=True)
    print(f"\n| layout | accuracy, mean of {args.seeds} | per seed | mixing, mean | train s, mean |")
    print("|---|---:|---|---:|---:|")
    for layout, rows in results.items():
        per_seed = " ".join(f"{r['accuracy']:.4f}" for r in rows)
        print(f"| {layout} | {np.mean([r['accuracy'] for r in rows]):.3f} | {per_seed} | "
              f"{np.mean([r['mixing'] for r in rows]):.3f} | {np.mean([r['train_s'] for r in rows]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
