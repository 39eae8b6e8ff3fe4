"""Benchmark: ``cellarium-steps mean-var`` against anndata + scipy.sparse in memory.

Reproduce the full benchmark (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_mean_var.py --cells 200000 --also-cells 1000000

For each size, shards resampled from the real multi-batch PBMC file (cached under
``benchmarks/out/shards_{cells}/``) are summarised twice, each in a fresh subprocess after an
untimed warm-up run (so both read from the page cache):

(a) ``cellarium-steps mean-var --batch-key source`` (streaming, one shard batch at a time);
(b) ``benchmarks/reference_mean_var.py``: ``anndata.read_h5ad`` + ``anndata.concat``, then
    per-source and overall mean / population variance with scipy.sparse in float64.

The outputs must agree (relative error < 1e-9, overall per gene from the CSV and per source from
the Parquet), then one table is printed: wall time, peak memory (PSS summed over the whole process tree), and the
ratio of our wall time to the reference's. With ``--also-cells`` the second size shows whether
our peak memory stays flat as the number of cells grows.
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
RTOL = 1e-9
FULL_COMMAND = ".venv/bin/python benchmarks/bench_mean_var.py --cells 200000 --also-cells 1000000"
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "reference_mean_var.py"


def check_agreement(our_csv: Path, reference_npz: Path) -> dict[str, float]:
    """Compare our CSV (overall) and Parquet (per batch) with the reference; raise if they differ."""
    ref = np.load(reference_npz, allow_pickle=False)
    genes = ref["genes"].astype(str)

    overall = pd.read_csv(our_csv).set_index("gene")
    if len(overall) != len(genes) or not overall.index.astype(str).isin(genes).all():
        raise AssertionError(f"{our_csv}: genes differ from the reference's")
    overall = overall.loc[genes]
    errors = {
        "overall mean": max_rel_error(overall["mean"].to_numpy(), ref["mean_g"]),
        "overall var": max_rel_error(overall["var"].to_numpy(), ref["var_g"]),
    }

    per_batch = pd.read_parquet(our_csv.with_suffix(".parquet"))
    per_batch["batch"] = per_batch["batch"].astype(str)
    per_batch["gene"] = per_batch["gene"].astype(str)
    ours_batches = sorted(per_batch["batch"].unique())
    ref_batches = sorted(ref["batches"].astype(str))
    if ours_batches != ref_batches:
        raise AssertionError(f"batches differ: ours {ours_batches}, reference {ref_batches}")
    mean_err = var_err = 0.0
    for b, name in enumerate(ref["batches"].astype(str)):
        rows = per_batch[per_batch["batch"] == name].set_index("gene").loc[genes]
        n_ours = set(rows["n_cells"].tolist())
        if n_ours != {int(ref["n_cells_b"][b])}:
            raise AssertionError(f"batch {name}: n_cells ours {n_ours}, reference {int(ref['n_cells_b'][b])}")
        mean_err = max(mean_err, max_rel_error(rows["mean"].to_numpy(), ref["mean_bg"][b]))
        var_err = max(var_err, max_rel_error(rows["var"].to_numpy(), ref["var_bg"][b]))
    errors[f"per-{BATCH_KEY} mean"] = mean_err
    errors[f"per-{BATCH_KEY} var"] = var_err

    bad = {k: v for k, v in errors.items() if not v < RTOL}
    if bad:
        raise AssertionError(f"outputs disagree (max relative error >= {RTOL:g}): {bad}")
    return errors


def run_size(args: argparse.Namespace, n_cells: int) -> list[dict]:
    shards = ensure_resampled_shards(n_cells, n_shards=args.shards, seed=args.seed)
    out_dir = OUT_DIR / f"mean_var_{n_cells}"
    out_dir.mkdir(parents=True, exist_ok=True)
    our_csv = out_dir / "mean_var.csv"
    reference_npz = out_dir / "reference.npz"

    ours_cmd = [
        cellarium_steps_exe(), "mean-var", "--input", *shards, "--batch-key", BATCH_KEY,
        "--output", str(our_csv), "--num-workers", str(args.num_workers),
        "--batch-size", str(args.batch_size), "--accelerator", args.accelerator, "--quiet",
    ]  # fmt: skip
    ref_cmd = [
        sys.executable, str(REFERENCE_SCRIPT), "--input", *shards, "--batch-key", BATCH_KEY,
        "--output", str(reference_npz),
    ]  # fmt: skip

    jobs = [("cellarium-steps mean-var", ours_cmd, [our_csv, our_csv.with_suffix(".parquet")])]
    if not args.skip_reference:
        jobs.append(("anndata + scipy.sparse", ref_cmd, [reference_npz]))
    results: dict[str, dict | str] = {}
    for tool, cmd, outputs in jobs:
        print(f"[bench] {n_cells:,} cells: {tool} ...", file=sys.stderr)
        try:
            if args.warmup:
                warm_up(cmd)
            for path in outputs:  # so the checked outputs are the timed run's own
                path.unlink(missing_ok=True)
            results[tool] = measure(cmd)
            res = results[tool]
            print(
                f"[bench] {n_cells:,} cells: {tool}: {res['wall_s']:.2f} s, peak tree PSS {res['peak_rss_mb']:,.0f} MB "
                f"(largest single process {res['max_single_rss_mb']:,.0f} MB)",
                file=sys.stderr,
            )
        except CommandFailed as e:
            if tool == jobs[0][0]:
                raise
            # The in-memory reference may run out of memory at large sizes; report it, don't abort.
            print(f"[bench] reference failed at {n_cells:,} cells:\n{e}", file=sys.stderr)
            results[tool] = e.how

    ours = results[jobs[0][0]]
    reference = results.get("anndata + scipy.sparse")
    if isinstance(reference, dict):
        errors = check_agreement(our_csv, reference_npz)
        print(
            f"[bench] {n_cells:,} cells: outputs agree; max relative error "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
            file=sys.stderr,
        )

    rows = []
    for tool, res in results.items():
        if isinstance(res, dict):
            ratio = ours["wall_s"] / reference["wall_s"] if isinstance(reference, dict) else None
            rows.append({
                "tool": tool, "cells": n_cells, "wall s": res["wall_s"], "peak mem MB": res["peak_rss_mb"],
                "ours/ref wall": ratio if tool == jobs[0][0] else (1.0 if ratio is not None else None),
            })  # fmt: skip
        else:
            rows.append({"tool": f"{tool} (failed: {res})", "cells": n_cells, "wall s": None,
                         "peak mem MB": None, "ours/ref wall": None})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time and measure cellarium-steps mean-var against anndata + scipy.sparse.",
        epilog=f"full benchmark: {FULL_COMMAND}",
    )
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the benchmark shards (default: 200000)")
    parser.add_argument("--shards", type=int, default=10, help="number of shards (default: 10)")
    parser.add_argument("--num-workers", type=int, default=1, help="cellarium-steps DataLoader workers (default: 1)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="cellarium-steps cells per batch (default: 10000)")
    parser.add_argument(
        "--accelerator", choices=("cpu", "gpu", "auto"), default="cpu",
        help="cellarium-steps accelerator (default: cpu, like the reference)",
    )
    parser.add_argument(
        "--also-cells", type=int, default=None, metavar="N",
        help="a second, larger size (e.g. 1000000) to check that our peak memory stays flat",
    )
    parser.add_argument("--skip-reference", action="store_true", help="run only cellarium-steps")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True,
        help="run each command once untimed first, so both read from the page cache (default: on)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampled shards (default: 0)")
    args = parser.parse_args(argv)

    sizes = [args.cells] + ([args.also_cells] if args.also_cells and args.also_cells != args.cells else [])
    rows: list[dict] = []
    for n_cells in sizes:
        rows.extend(run_size(args, n_cells))

    print()
    print_table(rows)
    ours_rows = [r for r in rows if r["tool"] == "cellarium-steps mean-var"]
    if len(ours_rows) == 2:
        small, large = ours_rows
        print(
            f"\nmemory flatness: cellarium-steps peak memory {small['peak mem MB']:,.0f} MB at {small['cells']:,} cells, "
            f"{large['peak mem MB']:,.0f} MB at {large['cells']:,} cells "
            f"(x{large['peak mem MB'] / small['peak mem MB']:.2f} for x{large['cells'] / small['cells']:.1f} cells)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
