"""Benchmark: ``cellarium-steps hvg`` and ``pca`` against anndata + scanpy in memory.

Reproduce the full benchmark (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_hvg_pca.py --cells 200000 --also-cells 1000000 --skip-reference-large

For each size, shards resampled from the real multi-batch PBMC file (cached under
``benchmarks/out/shards_{cells}/``, batch key ``source``) are processed by these commands, each in
a fresh subprocess after an untimed warm-up run (so every one reads from the page cache), then
timed ``--repeats`` times (default 3), all commands in turn each round so that a slow spell of a
shared machine hits both tools; the table gives the median wall time and every run's:

ours (streaming, one shard batch at a time; outputs under ``benchmarks/out/hvg_pca_{cells}/``)
    1. ``cellarium-steps mean-var --batch-key source``                        row "mean-var"
    2. ``cellarium-steps hvg --batch-key source --mean-var mean_var.csv``     row "HVG given mean/var"
    3. ``cellarium-steps hvg --batch-key source`` (no ``--mean-var``)          row "HVG, two passes"
    4. ``cellarium-steps pca --genes <hvg of 2.> --n-components 50 --method exact``   row "PCA"
reference (``anndata.read_h5ad`` of every shard + ``anndata.concat``; loading is timed too)
    5. ``benchmarks/reference_hvg.py``: ``sc.pp.highly_variable_genes(flavor="seurat_v3",
       n_top_genes=2000, batch_key="source")``
    6. ``benchmarks/reference_pca.py``: ``sc.pp.normalize_total(target_sum=1e4)``, ``sc.pp.log1p``,
       subset to OUR highly variable genes (both sides use the same genes), ``sc.pp.pca(n_comps=50)``
       with scanpy's default solver for sparse input (sklearn PCA with ``svd_solver="arpack"`` in
       scanpy 1.11; the solver used is printed)

Agreement checks (printed; the script exits 1 after the table if one fails):
    HVG   Jaccard index of the selected gene sets, ours (both ways) vs scanpy, expected 1.0, and the
          max relative difference of ``variances_norm`` over all genes;
    PCA   max relative difference over the top 10 components of the explained variance: ours is a
          population variance (ddof=0) from an exact covariance, scanpy's ``uns["pca"]["variance"]``
          uses ddof=1 and an iterative (arpack) solver, so ours x n/(n-1) is compared to scanpy's.

Then one table: step, tool, cells, median wall time, each run's, peak memory (the largest PSS
summed over the whole process tree), and the ratio of the medians, ours to scanpy's (HVG given
mean/var and HVG two passes vs scanpy HVG; PCA vs scanpy PCA), in text and markdown. ``--also-cells`` adds a second, larger size to show
that our peak memory stays flat as cells grow; ``--skip-reference-large`` runs only our side there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    OUT_DIR,
    CommandFailed,
    cellarium_steps_exe,
    ensure_resampled_shards,
    max_rel_error,
    measure,
    print_table,
    warm_up,
)

BATCH_KEY = "source"
FULL_COMMAND = ".venv/bin/python benchmarks/bench_hvg_pca.py --cells 200000 --also-cells 1000000 --skip-reference-large"
BENCH_DIR = Path(__file__).resolve().parent
REFERENCE_HVG = BENCH_DIR / "reference_hvg.py"
REFERENCE_PCA = BENCH_DIR / "reference_pca.py"
N_TOP_PCS = 10  # explained variances compared

# Agreement thresholds: exact selection, tight per-gene statistics, and arpack-vs-eigh + float32-vs-float64
# slack for the explained variances.
JACCARD_MIN = 1.0
VARIANCES_NORM_RTOL = 1e-5
PCA_VARIANCE_RTOL = 1e-4

STEP_MEAN_VAR = "mean-var"
STEP_HVG_GIVEN = "HVG given mean/var"
STEP_HVG_TWO = "HVG, two passes"
STEP_HVG_REF = "HVG"
STEP_PCA = "PCA"
OURS = "cellarium-steps"
SCANPY = "anndata + scanpy"


def read_hvg(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    table["gene"] = table["gene"].astype(str)
    return table.set_index("gene")


def selected(table: pd.DataFrame) -> set[str]:
    return set(table.index[table["highly_variable"].astype(bool)])


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def check_hvg(ours_given: Path, ours_two: Path, reference: Path | None) -> dict[str, float]:
    """Jaccard of the selected sets and max relative difference of variances_norm."""
    given, two = read_hvg(ours_given), read_hvg(ours_two)
    checks = {"HVG Jaccard, given mean/var vs two passes": jaccard(selected(given), selected(two))}
    if reference is not None:
        ref = read_hvg(reference)
        if set(ref.index) != set(given.index):
            raise AssertionError(f"{reference}: genes differ from ours")
        checks["HVG Jaccard, ours (given mean/var) vs scanpy"] = jaccard(selected(given), selected(ref))
        checks["HVG Jaccard, ours (two passes) vs scanpy"] = jaccard(selected(two), selected(ref))
        checks["HVG variances_norm max rel diff, ours (given mean/var) vs scanpy"] = max_rel_error(
            given["variances_norm"].to_numpy(), ref.loc[given.index, "variances_norm"].to_numpy()
        )
        checks["HVG variances_norm max rel diff, ours (two passes) vs scanpy"] = max_rel_error(
            two["variances_norm"].to_numpy(), ref.loc[two.index, "variances_norm"].to_numpy()
        )
    return checks


def check_pca(our_variance_csv: Path, reference_npz: Path) -> tuple[dict[str, float], str]:
    """Top-10 explained variances: ours (ddof=0) x n/(n-1) vs scanpy's (ddof=1); also the ratios."""
    ours = pd.read_csv(our_variance_csv)
    # Components are named PC1, PC2, ...: order by their number, not as strings (PC10 < PC2).
    ours = ours.assign(_k=ours["component"].astype(str).str.extract(r"(\d+)$", expand=False).astype(int))
    ours = ours.sort_values("_k")
    ref = np.load(reference_npz, allow_pickle=False)
    n = int(ref["n_cells"])
    k = min(N_TOP_PCS, len(ours), len(ref["variance"]))
    ours_var = ours["explained_variance"].to_numpy()[:k] * n / (n - 1)
    checks = {
        f"PCA explained variance (top {k}) max rel diff, ours x n/(n-1) vs scanpy": max_rel_error(
            ours_var, ref["variance"][:k]
        ),
        f"PCA explained variance ratio (top {k}) max rel diff": max_rel_error(
            ours["explained_variance_ratio"].to_numpy()[:k], ref["variance_ratio"][:k]
        ),
    }
    note = (
        f"scanpy PCA solver: {ref['svd_solver']}, X dtype {ref['x_dtype']}, {n:,} cells x {len(ref['genes']):,} genes"
    )
    return checks, note


def failed_checks(checks: dict[str, float]) -> dict[str, float]:
    """The checks outside their bounds: Jaccard below JACCARD_MIN, relative differences at or above their tolerance."""

    def ok(name: str, value: float) -> bool:
        if "Jaccard" in name:
            return value >= JACCARD_MIN
        if "variances_norm" in name:
            return value < VARIANCES_NORM_RTOL
        if name.startswith("PCA explained variance ("):
            return value < PCA_VARIANCE_RTOL
        return True  # reported only

    return {name: value for name, value in checks.items() if not ok(name, value)}


def run_jobs(jobs: list[tuple[str, list[str], list[Path], bool]], warmup: bool, repeats: int) -> dict[str, dict | str]:
    """Time each job ``repeats`` times, the jobs interleaved so that a slow spell of a shared machine
    hits every tool, after one untimed warm-up each; the outputs are removed before each run so the
    checked ones are the last timed run's. Per job: the median wall time, the largest peak memory,
    and every wall time. A job whose ``may_fail`` is set (the in-memory reference, which may run out
    of memory at large sizes) is reported by how it failed instead of aborting."""
    results: dict[str, dict | str] = {}
    runs: dict[str, list[dict]] = {label: [] for label, *_ in jobs}
    if warmup:
        for label, cmd, _, may_fail in jobs:
            print(f"[bench] {label}: warm-up", file=sys.stderr)
            try:
                warm_up(cmd)
            except CommandFailed as e:
                if not may_fail:
                    raise
                results[label] = e.how
    for repeat in range(repeats):
        for label, cmd, outputs, may_fail in jobs:
            if label in results:
                continue
            for path in outputs:
                path.unlink(missing_ok=True)
            try:
                res = measure(cmd)
            except CommandFailed as e:
                if not may_fail:
                    raise
                print(f"[bench] {label} failed:\n{e}", file=sys.stderr)
                results[label] = e.how
                continue
            runs[label].append(res)
            print(f"[bench] {label} (run {repeat + 1}/{repeats}): {res['wall_s']:.2f} s, peak tree PSS "
                  f"{res['peak_rss_mb']:,.0f} MB (largest single process {res['max_single_rss_mb']:,.0f} MB)",
                  file=sys.stderr)
    for label, *_ in jobs:
        if label not in results:
            walls = [r["wall_s"] for r in runs[label]]
            results[label] = {
                "wall_s": float(np.median(walls)),
                "walls": walls,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[label]),
                "max_single_rss_mb": max(r["max_single_rss_mb"] for r in runs[label]),
            }
    return results


def run_size(args: argparse.Namespace, n_cells: int, with_reference: bool) -> tuple[list[dict], dict[str, float]]:
    shards = ensure_resampled_shards(n_cells, n_shards=args.shards, seed=args.seed)
    out_dir = OUT_DIR / f"hvg_pca_{n_cells}"
    out_dir.mkdir(parents=True, exist_ok=True)
    mean_var_csv = out_dir / "mean_var.csv"
    hvg_given_csv = out_dir / "hvg_given_mean_var.csv"
    hvg_two_csv = out_dir / "hvg_two_passes.csv"
    pca_parquet = out_dir / "pca.parquet"
    pca_variance_csv = out_dir / "pca_variance.csv"
    ref_hvg_csv = out_dir / "reference_hvg.csv"
    ref_pca_npz = out_dir / "reference_pca.npz"

    exe = cellarium_steps_exe()
    common = [
        "--input", *shards, "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
        "--accelerator", args.accelerator, "--quiet",
    ]  # fmt: skip
    hvg_opts = ["--batch-key", BATCH_KEY, "--n-top-genes", str(args.n_top_genes)]
    ours_jobs = [
        (STEP_MEAN_VAR, [exe, "mean-var", *common, "--batch-key", BATCH_KEY, "--output", str(mean_var_csv)],
         [mean_var_csv, mean_var_csv.with_suffix(".parquet")]),
        (STEP_HVG_GIVEN, [exe, "hvg", *common, *hvg_opts, "--mean-var", str(mean_var_csv), "--output", str(hvg_given_csv)],
         [hvg_given_csv]),
        (STEP_HVG_TWO, [exe, "hvg", *common, *hvg_opts, "--output", str(hvg_two_csv)], [hvg_two_csv]),
        (STEP_PCA, [exe, "pca", *common, "--genes", str(hvg_given_csv), "--n-components", str(args.n_components),
                    "--method", "exact", "--output", str(pca_parquet)],
         [pca_parquet, pca_variance_csv]),
    ]  # fmt: skip
    ref_jobs = [
        (STEP_HVG_REF, [sys.executable, str(REFERENCE_HVG), "--input", *shards, "--batch-key", BATCH_KEY,
                        "--n-top-genes", str(args.n_top_genes), "--output", str(ref_hvg_csv)], [ref_hvg_csv]),
        (STEP_PCA, [sys.executable, str(REFERENCE_PCA), "--input", *shards, "--genes", str(hvg_given_csv),
                    "--n-components", str(args.n_components), "--output", str(ref_pca_npz)], [ref_pca_npz]),
    ]  # fmt: skip

    def label(tool: str, step: str) -> str:
        return f"{n_cells:,} cells: {tool} {step}"

    jobs = [(label(OURS, step), cmd, outputs, False) for step, cmd, outputs in ours_jobs]
    if with_reference:
        jobs += [(label(SCANPY, step), cmd, outputs, True) for step, cmd, outputs in ref_jobs]
    results = run_jobs(jobs, args.warmup, args.repeats)
    ours = {step: results[label(OURS, step)] for step, _, _ in ours_jobs}
    refs = {step: results[label(SCANPY, step)] for step, _, _ in ref_jobs} if with_reference else {}

    checks = check_hvg(hvg_given_csv, hvg_two_csv, ref_hvg_csv if isinstance(refs.get(STEP_HVG_REF), dict) else None)
    if isinstance(refs.get(STEP_PCA), dict):
        pca_checks, note = check_pca(pca_variance_csv, ref_pca_npz)
        checks.update(pca_checks)
        print(f"[bench] {n_cells:,} cells: {note}", file=sys.stderr)
    print(f"[bench] {n_cells:,} cells: agreement checks", file=sys.stderr)
    for name, value in checks.items():
        print(f"[bench]   {name}: {value:.3g}", file=sys.stderr)

    def ratio(step: str, ref_step: str) -> float | None:
        ref = refs.get(ref_step)
        return ours[step]["wall_s"] / ref["wall_s"] if isinstance(ref, dict) else None

    def row(step: str, tool: str, res: dict | str, ratio_value: float | None = None) -> dict:
        if isinstance(res, dict):
            wall, mem, each = res["wall_s"], res["peak_rss_mb"], " ".join(f"{w:.1f}" for w in res["walls"])
        else:
            tool, wall, mem, each = f"{tool} (failed: {res})", None, None, ""
        return {"step": step, "tool": tool, "cells": n_cells, "wall s": wall, "runs s": each, "peak mem MB": mem,
                "ours/scanpy wall": ratio_value}  # fmt: skip

    rows = [
        row(STEP_MEAN_VAR, OURS, ours[STEP_MEAN_VAR]),
        row(STEP_HVG_GIVEN, OURS, ours[STEP_HVG_GIVEN], ratio(STEP_HVG_GIVEN, STEP_HVG_REF)),
        row(STEP_HVG_TWO, OURS, ours[STEP_HVG_TWO], ratio(STEP_HVG_TWO, STEP_HVG_REF)),
    ]
    if STEP_HVG_REF in refs:
        rows.append(row(STEP_HVG_REF, SCANPY, refs[STEP_HVG_REF]))
    rows.append(row(STEP_PCA, OURS, ours[STEP_PCA], ratio(STEP_PCA, STEP_PCA)))
    if STEP_PCA in refs:
        rows.append(row(STEP_PCA, SCANPY, refs[STEP_PCA]))
    return rows, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time and measure cellarium-steps mean-var, hvg and pca against anndata + scanpy.",
        epilog=f"full benchmark: {FULL_COMMAND}",
    )
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the benchmark shards (default: 200000)")
    parser.add_argument("--shards", type=int, default=10, help="number of shards (default: 10)")
    parser.add_argument(
        "--also-cells",
        type=int,
        default=None,
        metavar="N",
        help="a second, larger size (e.g. 1000000) to check that our peak memory stays flat",
    )
    parser.add_argument(
        "--skip-reference-large",
        action="store_true",
        help="at the --also-cells size run only cellarium-steps (scanpy loads every cell into memory)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="run only cellarium-steps, at every size")
    parser.add_argument("--num-workers", type=int, default=0, help="cellarium-steps DataLoader workers (default: 0)")
    parser.add_argument(
        "--batch-size", type=int, default=10_000, help="cellarium-steps cells per batch (default: 10000)"
    )
    parser.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes (default: 2000)")
    parser.add_argument("--n-components", type=int, default=50, help="principal components (default: 50)")
    parser.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "auto"),
        default="cpu",
        help="cellarium-steps accelerator (default: cpu, like the reference)",
    )
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each command once untimed first, so all read from the page cache (default: on)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="timed runs of each command, interleaved across tools; the median is reported (default: 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampled shards (default: 0)")
    args = parser.parse_args(argv)

    sizes = [args.cells] + ([args.also_cells] if args.also_cells and args.also_cells != args.cells else [])
    rows: list[dict] = []
    bad: dict[str, float] = {}
    for i, n_cells in enumerate(sizes):
        with_reference = not args.skip_reference and not (i > 0 and args.skip_reference_large)
        size_rows, checks = run_size(args, n_cells, with_reference)
        rows.extend(size_rows)
        bad.update({f"{n_cells:,} cells: {k}": v for k, v in failed_checks(checks).items()})

    print()
    print_table(rows)

    by_step: dict[str, list[dict]] = {}
    for r in rows:
        if r["tool"] == OURS:
            by_step.setdefault(r["step"], []).append(r)
    if len(sizes) == 2:
        print("\nmemory flatness (cellarium-steps peak memory):")
        for step, (small, large) in ((s, rs) for s, rs in by_step.items() if len(rs) == 2):
            print(
                f"  {step}: {small['peak mem MB']:,.0f} MB at {small['cells']:,} cells, "
                f"{large['peak mem MB']:,.0f} MB at {large['cells']:,} cells "
                f"(x{large['peak mem MB'] / small['peak mem MB']:.2f} for x{large['cells'] / small['cells']:.1f} cells)"
            )
    scanpy_hvg = {r["cells"]: r["wall s"] for r in rows if r["tool"] == SCANPY and r["step"] == STEP_HVG_REF}
    for n_cells in sizes:
        if scanpy_hvg.get(n_cells):
            ours_rows = {r["step"]: r["wall s"] for r in rows if r["tool"] == OURS and r["cells"] == n_cells}
            both = ours_rows[STEP_MEAN_VAR] + ours_rows[STEP_HVG_GIVEN]
            print(
                f"\n{n_cells:,} cells: mean-var + HVG given mean/var = {both:.2f} s "
                f"(x{both / scanpy_hvg[n_cells]:.2f} of scanpy HVG's {scanpy_hvg[n_cells]:.2f} s)"
            )
    if bad:
        print(f"\nAGREEMENT CHECKS FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
