"""Benchmark: scVI reference mapping, ``cellarium-steps train-scvi --reference`` against scvi-tools'
``SCVI.load_query_data`` + ``train``, same split, same settings, same run.

Reproduce (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_mapping.py --seeds 12 --threads 1 --jobs 2

Data: the real multi-batch PBMC file. Reference = its sources ``MUDAN_reference`` and
``scMINER_pbmc14k`` (5,567 cells, fine Cell Ontology labels), query = the held-out source
``SoupX_pbmc4k`` (2,170 cells, another chemistry, coarser labels); batch = ``source``; 2,000 highly
variable genes from scanpy on the reference cells (``flavor="seurat_v3", batch_key="source"``).

Both sides, per seed: train a reference with scArches' recommended architecture (scvi-tools
``encode_covariates=True, deeply_inject_covariates=False, use_layer_norm="both", use_batch_norm="none"``,
2 hidden layers of 128, 10 latent dimensions, dropout 0.2, negative binomial, per-gene dispersion;
ours: ``--encode-covariates --use-layer-norm both --use-batch-norm none --n-layers 2 --dropout-rate 0.2``),
``--reference-epochs`` at batch size 128, Adam lr 1e-3 (scvi-tools' eps and weight decay), every cell in
training, the same KL warm-up in steps (train-scvi's default: a quarter of the run); then map the query
(scvi-tools ``load_query_data`` with its defaults, then ``train`` with ``weight_decay=0``, as its
reference-mapping tutorial; ours ``train-scvi --reference``) for ``--query-epochs`` with the same batch
size, learning rate and KL warm-up rule. Both query trainings run dropout and batch norm as at prediction
time (scvi-tools' ``load_query_data`` leaves its module in evaluation mode and its training keeps it so;
``train-scvi --reference`` does the same). Ours runs through the console script, scvi-tools on the AnnData
in memory; each side in a fresh interpreter with ``torch.set_num_threads(--threads)``; ``--jobs 2`` runs
two workers at once (the times then overlap).

Measured on the mapped latent means (the query model's, for reference and query cells alike):

label transfer accuracy
    a 15-NN vote of the labelled reference cells gives each labelled query cell a reference label; right
    when it is the query's label or one of its descendants (the query's labels are coarser: CD4 T for the
    reference's naive, memory, helper and regulatory CD4 T).
mixing
    the fraction of each query cell's 15 nearest neighbours (reference and query cells, itself excluded)
    that are reference cells, averaged (the reference holds 72% of the cells).
reference latent change
    the largest |difference| between the reference cells' latent means from the reference model and from
    the query model.

Acceptance (printed; exit 1 if one fails), on the means over seeds: accuracy >= scvi-tools' - 0.01;
|mixing - scvi-tools'| <= 0.05; our reference latent change < 1e-6.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    OUT_DIR,
    add_worker_arguments,
    cellarium_steps_exe,
    checkpoint_latent,
    print_checks,
    print_table,
    run_if_worker,
    run_json_worker,
    source_h5ad,
)

BATCH_KEY = "source"
LABEL_KEY = "cell_type_ontology_term_id"
REFERENCE_SOURCES = ("MUDAN_reference", "scMINER_pbmc14k")
QUERY_SOURCE = "SoupX_pbmc4k"
N_TOP_GENES = 2000
N_HIDDEN, N_LAYERS, N_LATENT, DROPOUT, LEARNING_RATE = 128, 2, 10, 0.2, 1e-3
BATCH_SIZE = 128
KNN_K = 15
FULL_COMMAND = ".venv/bin/python benchmarks/bench_mapping.py --seeds 12 --threads 1 --jobs 2"

ACCURACY_TOLERANCE = 0.01
MIXING_TOLERANCE = 0.05
LATENT_CHANGE_MAX = 1e-6

OURS = "cellarium-steps"
SCVI_TOOLS = "scvi-tools"


# ----------------------------------------------------------------------------------------------- data


def prepare_data(out_dir: Path) -> dict[str, str]:
    """reference.h5ad and query.h5ad (every gene) and the reference's HVG list; cached under ``out_dir``."""
    import anndata as ad
    import scanpy as sc

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"reference": out_dir / "reference.h5ad", "query": out_dir / "query.h5ad", "genes": out_dir / "hvg.txt"}
    if not all(p.is_file() for p in paths.values()):
        adata = ad.read_h5ad(source_h5ad())
        source = adata.obs[BATCH_KEY].astype(str)
        for name, keep in (("reference", source.isin(REFERENCE_SOURCES)), ("query", source == QUERY_SOURCE)):
            part = adata[keep.to_numpy()].copy()
            part.obs[BATCH_KEY] = part.obs[BATCH_KEY].astype(str).astype("category")
            part.write_h5ad(paths[name])
            if name == "reference":
                hvg = sc.pp.highly_variable_genes(part, flavor="seurat_v3", n_top_genes=N_TOP_GENES,
                                                  batch_key=BATCH_KEY, inplace=False)
                paths["genes"].write_text("\n".join(part.var_names[hvg["highly_variable"].to_numpy()]) + "\n")
    return {k: str(v) for k, v in paths.items()}


def warmup_steps(n_cells: int, epochs: int) -> int:
    from cellarium_steps.pipelines.scvi import default_kl_warmup_steps

    return default_kl_warmup_steps(epochs, -(-n_cells // BATCH_SIZE))


def load(path: str, genes: list[str]):
    import anndata as ad

    adata = ad.read_h5ad(path)[:, genes].copy()
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    return adata


def scvi_reference_model(adata, seed: int):
    """scvi-tools' SCVI on ``adata`` with the benchmark's architecture (scArches' reference), seeded."""
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    return scvi.model.SCVI(
        adata, n_hidden=N_HIDDEN, n_layers=N_LAYERS, n_latent=N_LATENT, dropout_rate=DROPOUT,
        gene_likelihood="nb", dispersion="gene", encode_covariates=True, deeply_inject_covariates=False,
        use_layer_norm="both", use_batch_norm="none",
    )


#: scvi-tools' ``train`` arguments on both trainings (every cell trains, one CPU, nothing logged or saved).
SCVI_TRAIN_KWARGS = {"batch_size": BATCH_SIZE, "train_size": 1.0, "accelerator": "cpu", "devices": 1,
                     "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                     "enable_checkpointing": False}


def scvi_plan_kwargs(warmup_steps: int, query: bool = False) -> dict:
    """scvi-tools' training plan: the KL warm-up in steps; the query without weight decay (its tutorial)."""
    plan = {"lr": LEARNING_RATE, "n_epochs_kl_warmup": None, "n_steps_kl_warmup": warmup_steps}
    return {**plan, "weight_decay": 0.0} if query else plan


def ours_common_args(seed: int) -> list[str]:
    return ["--batch-size", str(BATCH_SIZE), "--learning-rate", str(LEARNING_RATE), "--accelerator", "cpu",
            "--seed", str(seed), "--quiet"]


def ours_reference_args(reference_h5ad: str, genes_txt: str, output: str, epochs: int, warmup_steps: int,
                        seed: int) -> list[str]:
    """``train-scvi`` arguments for our reference (scArches' architecture, the benchmark's settings)."""
    return ["train-scvi", "--input", reference_h5ad, "--batch-key", BATCH_KEY, "--genes", genes_txt,
            "--encode-covariates", "--use-layer-norm", "both", "--use-batch-norm", "none",
            "--n-layers", str(N_LAYERS), "--n-hidden", str(N_HIDDEN), "--n-latent", str(N_LATENT), "--dropout-rate",
            str(DROPOUT), "--max-epochs", str(epochs), "--kl-warmup-steps", str(warmup_steps), "--output", output,
            *ours_common_args(seed)]


def ours_query_args(reference_ckpt: str, query_h5ad: str, output: str, epochs: int, warmup_steps: int,
                    seed: int) -> list[str]:
    """``train-scvi --reference`` arguments mapping the query onto a reference checkpoint."""
    return ["train-scvi", "--reference", reference_ckpt, "--input", query_h5ad, "--max-epochs", str(epochs),
            "--kl-warmup-steps", str(warmup_steps), "--output", output, *ours_common_args(seed)]


# ----------------------------------------------------------------------------------------------- workers
# Each runs in its own interpreter (``--worker NAME --spec JSON``) and prints one JSON line.


def mapping_metrics(reference_z: np.ndarray, reference_labels: np.ndarray, query_z: np.ndarray,
                    query_labels: np.ndarray) -> dict:
    from cellarium_steps.models._latent_metrics import mapping_metrics as metrics

    return metrics(reference_z, reference_labels, query_z, query_labels, KNN_K)


def _latent(checkpoint: str, adata) -> np.ndarray:
    """A checkpoint's latent means of an AnnData's cells (batches coded as the checkpoint codes them)."""
    return checkpoint_latent(checkpoint, adata, BATCH_KEY)


def worker_ours(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["out_dir"]) / f"ours_seed{spec['seed']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    reference, query = str(run_dir / "reference.ckpt"), str(run_dir / "query.ckpt")
    start = time.perf_counter()
    subprocess.run([cellarium_steps_exe(), *ours_reference_args(
        spec["reference"], spec["genes"], reference, spec["reference_epochs"], spec["reference_warmup"],
        spec["seed"])], check=True, env=env)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([cellarium_steps_exe(), *ours_query_args(
        reference, spec["query"], query, spec["query_epochs"], spec["query_warmup"], spec["seed"])],
        check=True, env=env)
    query_s = time.perf_counter() - start
    genes = Path(spec["genes"]).read_text().split()
    adata_ref, adata_query = load(spec["reference"], genes), load(spec["query"], genes)
    before = _latent(reference, adata_ref)
    reference_z, query_z = _latent(query, adata_ref), _latent(query, adata_query)
    return {**mapping_metrics(reference_z, adata_ref.obs[LABEL_KEY].astype(str).to_numpy(), query_z,
                              adata_query.obs[LABEL_KEY].astype(str).to_numpy()),
            "latent_change": float(np.abs(reference_z - before).max()), "reference_s": reference_s, "query_s": query_s}


def worker_scvi(spec: dict) -> dict:
    import scvi
    import torch

    torch.set_num_threads(spec["threads"])
    genes = Path(spec["genes"]).read_text().split()
    adata_ref, adata_query = load(spec["reference"], genes), load(spec["query"], genes)
    reference = scvi_reference_model(adata_ref, spec["seed"])
    start = time.perf_counter()
    reference.train(max_epochs=spec["reference_epochs"], plan_kwargs=scvi_plan_kwargs(spec["reference_warmup"]),
                    **SCVI_TRAIN_KWARGS)
    reference_s = time.perf_counter() - start
    before = reference.get_latent_representation(adata_ref)
    query = scvi.model.SCVI.load_query_data(adata_query, reference)
    start = time.perf_counter()
    query.train(max_epochs=spec["query_epochs"], plan_kwargs=scvi_plan_kwargs(spec["query_warmup"], query=True),
                **SCVI_TRAIN_KWARGS)
    query_s = time.perf_counter() - start
    reference_z, query_z = query.get_latent_representation(adata_ref), query.get_latent_representation(adata_query)
    return {**mapping_metrics(reference_z, adata_ref.obs[LABEL_KEY].astype(str).to_numpy(), query_z,
                              adata_query.obs[LABEL_KEY].astype(str).to_numpy()),
            "latent_change": float(np.abs(reference_z - before).max()), "reference_s": reference_s, "query_s": query_s}


WORKERS = {"ours": worker_ours, "scvi": worker_scvi}


def run_worker(name: str, spec: dict) -> dict:
    """``name`` in a fresh interpreter; its result."""
    return run_json_worker(__file__, name, spec, f"[bench_mapping] {name} seed {spec['seed']}")


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per side, means compared (default: 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument("--reference-epochs", type=int, default=100, help="reference training epochs (default: 100)")
    parser.add_argument("--query-epochs", type=int, default=100, help="query training epochs (default: 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workers run at once, each with --threads threads (default: 1; times then overlap)")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if run_if_worker(args, WORKERS):
        return 0

    import anndata as ad

    out_dir = OUT_DIR / "mapping"
    data = prepare_data(out_dir)
    n_reference, n_query = (ad.read_h5ad(data[k], backed="r").n_obs for k in ("reference", "query"))
    spec = {**data, "threads": args.threads, "out_dir": str(out_dir), "reference_epochs": args.reference_epochs,
            "query_epochs": args.query_epochs, "reference_warmup": warmup_steps(n_reference, args.reference_epochs),
            "query_warmup": warmup_steps(n_query, args.query_epochs)}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Submitted seed by seed, ours then scvi-tools', so that with two jobs each seed's pair runs side by side.
        futures = [(tool, pool.submit(run_worker, worker, {**spec, "seed": seed}))
                   for seed in seeds for tool, worker in ((OURS, "ours"), (SCVI_TOOLS, "scvi"))]
        results: dict[str, list[dict]] = {OURS: [], SCVI_TOOLS: []}
        for tool, future in futures:
            results[tool].append(future.result())
    rows, mean = [], {}
    for tool, runs in results.items():
        values = {key: np.array([r[key] for r in runs]) for key in runs[0]}
        mean[tool] = {key: float(v.mean()) for key, v in values.items()}
        rows.append({"tool": tool, "accuracy": round(mean[tool]["accuracy"], 4),
                     "accuracy per seed": " ".join(f"{v:.4f}" for v in values["accuracy"]),
                     "mixing": round(mean[tool]["mixing"], 4),
                     "mixing per seed": " ".join(f"{v:.4f}" for v in values["mixing"]),
                     "reference latent change": f"{values['latent_change'].max():.1e}",
                     "reference s": round(mean[tool]["reference_s"], 1), "query s": round(mean[tool]["query_s"], 1)})
    accuracy_gap = mean[OURS]["accuracy"] - mean[SCVI_TOOLS]["accuracy"]
    mixing_gap = mean[OURS]["mixing"] - mean[SCVI_TOOLS]["mixing"]
    change = max(r["latent_change"] for r in results[OURS])
    checks = {
        "label transfer accuracy, ours - scvi-tools (mean over seeds)": (accuracy_gap, accuracy_gap >= -ACCURACY_TOLERANCE),
        "mixing, ours - scvi-tools (mean over seeds)": (mixing_gap, abs(mixing_gap) <= MIXING_TOLERANCE),
        "our reference cells' latent change (max over seeds)": (change, change < LATENT_CHANGE_MAX),
    }
    print(f"\nreference {n_reference:,} cells ({', '.join(REFERENCE_SOURCES)}), query {n_query:,} cells "
          f"({QUERY_SOURCE}; {results[OURS][0]['n_scored']:,} labelled), {N_TOP_GENES} HVGs, batch = {BATCH_KEY}, "
          f"{args.reference_epochs} + {args.query_epochs} epochs at batch {BATCH_SIZE}, KL warm-up "
          f"{spec['reference_warmup']} + {spec['query_warmup']} steps, {args.threads} torch threads, seeds "
          f"{args.first_seed}..{args.first_seed + args.seeds - 1}\n")
    print_table(rows)
    print()
    return print_checks(checks, FULL_COMMAND)


if __name__ == "__main__":
    sys.exit(main())
