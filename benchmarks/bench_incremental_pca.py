"""Benchmark: ``cellarium-steps pca --method incremental`` against ``--method exact``, same run.

    .venv/bin/python benchmarks/bench_incremental_pca.py --cells 200000

The shards are ``bench_hvg_pca.py``'s (resampled from the real PBMC file, cached under
``benchmarks/out/shards_{cells}/``), the genes its HVGs (``cellarium-steps hvg``, computed once,
untimed). Both methods run the same command but for ``--method``, each in a fresh process, after
an untimed warm-up, timed ``--repeats`` times interleaved (the median is reported).

Accuracy of the incremental result against the exact one, from the two saved models alone: the
exact model keeps the float64 gene x gene cross-product, i.e. the data's covariance ``C``, so

* variance error: max over components of |incremental variance - exact eigenvalue|, relative to the
  largest eigenvalue;
* reconstruction ratio: residual variance left by the incremental mean and components,
  ``trace(C) - sum_k v_k^T C v_k + |(I - P) mean shift|^2``, over the optimum ``sum_{j>k} lambda_j``;
* top-10 angle: largest principal angle between the two top-10 subspaces (radians).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OUT_DIR, cellarium_steps_exe, ensure_resampled_shards, print_table, warm_up
from bench_hvg_pca import BATCH_KEY, run_jobs

FULL_COMMAND = ".venv/bin/python benchmarks/bench_incremental_pca.py --cells 200000"
METHODS = ("exact", "incremental")
TOP_SUBSPACE = 10


def accuracy(exact_state: Path, incremental_state: Path) -> dict[str, float]:
    """The incremental model's errors against the exact model's covariance (see the module doc)."""
    from cellarium_steps.pipelines.pca import load_pca

    exact, _ = load_pca(exact_state)
    incremental, _ = load_pca(incremental_state)
    n = float(exact.x_size)
    mean_g = exact.x_sums_g / n
    # ExactPCA accumulates only the cross-product's lower triangle.
    gram_gg = torch.tril(exact.x_gram_gg) + torch.tril(exact.x_gram_gg, -1).T
    cov_gg = (gram_gg / n - torch.outer(mean_g, mean_g)).numpy()
    eigenvalues_g = np.linalg.eigvalsh(cov_gg)[::-1]
    variance_k = incremental.explained_variance_k.numpy()
    components_kg = incremental.components_kg.numpy()
    k = len(variance_k)
    # Residual of x - incremental mean off the components: (I - P)(x - mean) + (I - P)(mean - its mean).
    shift_g = (incremental.mean_g - mean_g).numpy()
    shift_k = components_kg @ shift_g
    residual = (np.trace(cov_gg) - np.einsum("kg,gh,kh->", components_kg, cov_gg, components_kg)
                + shift_g @ shift_g - shift_k @ shift_k)
    top = min(TOP_SUBSPACE, k)
    return {
        "variance error (rel. to largest)": float(np.abs(variance_k - eigenvalues_g[:k]).max() / eigenvalues_g[0]),
        "reconstruction ratio": float(residual / eigenvalues_g[k:].sum()),
        f"top-{top} angle (rad)": float(
            scipy.linalg.subspace_angles(components_kg[:top].T, exact.components_kg.numpy()[:top].T).max()
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time and measure cellarium-steps pca, incremental against exact, and compare their results.",
        epilog=f"full benchmark: {FULL_COMMAND}",
    )
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the benchmark shards (default: 200000)")
    parser.add_argument("--shards", type=int, default=10, help="number of shards (default: 10)")
    parser.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes (default: 2000)")
    parser.add_argument("--n-components", type=int, default=50, help="principal components (default: 50)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="cells per batch (default: 10000)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default="cpu", help="(default: cpu)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run each command once untimed first (default: on)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each method (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampled shards (default: 0)")
    args = parser.parse_args(argv)

    shards = ensure_resampled_shards(args.cells, n_shards=args.shards, seed=args.seed)
    out_dir = OUT_DIR / f"incremental_pca_{args.cells}"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = cellarium_steps_exe()
    common = ["--input", *shards, "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
              "--accelerator", args.accelerator, "--quiet"]  # fmt: skip
    hvg_csv = out_dir / f"hvg_{args.n_top_genes}.csv"
    if not hvg_csv.is_file():
        print(f"[bench] HVGs (untimed): {hvg_csv}", file=sys.stderr)
        warm_up([exe, "hvg", *common, "--batch-key", BATCH_KEY, "--n-top-genes", str(args.n_top_genes),
                 "--output", str(hvg_csv)])  # fmt: skip

    jobs = []
    for method in METHODS:
        output = out_dir / f"pca_{method}.parquet"
        cmd = [exe, "pca", *common, "--genes", str(hvg_csv), "--n-components", str(args.n_components),
               "--method", method, "--exact-max-genes", str(max(args.n_top_genes, 5000)),
               "--output", str(output)]  # fmt: skip
        jobs.append((f"pca --method {method}", cmd, [output, out_dir / f"pca_{method}.pt"], False))
    results = run_jobs(jobs, args.warmup, args.repeats)

    rows = []
    for method in METHODS:
        res = results[f"pca --method {method}"]
        rows.append({"method": method, "cells": args.cells, "genes": args.n_top_genes,
                     "components": args.n_components, "wall s": res["wall_s"],
                     "runs s": " ".join(f"{w:.1f}" for w in res["walls"]), "peak mem MB": res["peak_rss_mb"]})  # fmt: skip
    print()
    print_table(rows)
    print("\nincremental against exact, same run:")
    for name, value in accuracy(out_dir / "pca_exact.pt", out_dir / "pca_incremental.pt").items():
        print(f"  {name}: {value:.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
