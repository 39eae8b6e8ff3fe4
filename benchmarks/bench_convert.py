"""Benchmark: ``cellarium-steps convert`` against anndata reading and writing back, and scVI on its output.

Reproduce (from the repository root, on an otherwise idle machine)::

    .venv/bin/python benchmarks/bench_convert.py --cells 200000 --also-cells 1000000

Data: the harness's shards resampled from the real PBMC file (10 shards, 7,152 genes, int32 CSR),
rewritten once by anndata gzip-compressed (``write_h5ad(compression="gzip")``, as CELLxGENE's and the
shared files come) under ``benchmarks/out/shards_{cells}_gzip/``.

convert (``--repeats`` timed runs after an untimed warm-up of each, the commands interleaved;
``bench_hvg_pca.run_jobs``; whole processes, so imports, reading and writing are included):
    ours       ``cellarium-steps convert --input <gzip shards> --output DIR`` (20,000 cells a shard)
    ours       the same with ``--shuffle`` (a seeded permutation across shards; cells wait on disk)
    reference  ``reference_convert.py``: ``anndata.read_h5ad`` then ``write_h5ad`` (uncompressed), one
               shard at a time (its memory: one shard)
``--also-cells``: our two commands again at that size (one run each, no reference): peak memory is
checked to stay within 20% (flat).
Checked on the outputs: every cell once (the obs names of the shuffled output are a permutation of the
inputs'), and the first converted shard's counts equal the first input shard's (unshuffled, 20,000 cells
each); the converted shards give bit-identical training batches to the uncompressed originals.

The training loader alone (train-scvi's dataset over the same files, one shuffled epoch, in the bench process)
and scVI throughput (``bench_scvi``'s ours-throughput worker: what train-scvi trains, 2,000 HVGs of
bench_scvi, batch key ``source``, batch size 1,024, ``--threads`` torch threads, no loader worker;
cells per second over ``--scvi-epochs`` epochs but the first; median of ``--scvi-repeats`` interleaved
runs): on the first ``--scvi-shards`` gzip shards, on the converted shards holding the same cells, and
on the uncompressed shards they were made from (the speed the conversion should give).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OUT_DIR, cellarium_steps_exe, ensure_resampled_shards, print_table
from bench_hvg_pca import run_jobs
from bench_scvi import STREAM_BATCH_SIZE, default_warmup_steps, prepare_data, run_worker

FULL_COMMAND = ".venv/bin/python benchmarks/bench_convert.py --cells 200000 --also-cells 1000000"
REFERENCE = Path(__file__).resolve().parent / "reference_convert.py"
CELLS_PER_SHARD = 20_000
MEMORY_FLAT_MAX = 1.20
OURS, OURS_SHUFFLED, ANNDATA = "cellarium-steps convert", "cellarium-steps convert --shuffle", "anndata read + write"


def ensure_gzip_shards(n_cells: int) -> list[str]:
    """The resampled shards of ``n_cells`` cells, gzip-compressed by anndata (built once)."""
    out_dir = OUT_DIR / f"shards_{n_cells}_gzip"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in ensure_resampled_shards(n_cells):
        path = out_dir / Path(source).name
        if not path.is_file() or path.stat().st_mtime < Path(source).stat().st_mtime:
            print(f"[bench_convert] gzip-compressing {source}", file=sys.stderr)
            tmp = path.parent / f".{path.name}.tmp"
            # In a child process: a bench process grown by whole shards would pass its high-water mark on
            # to the measured commands it forks (the kernel's maxrss survives fork and exec).
            code = "import anndata as ad, sys; ad.read_h5ad(sys.argv[1]).write_h5ad(sys.argv[2], compression='gzip')"
            subprocess.run([sys.executable, "-c", code, source, str(tmp)], check=True)
            os.replace(tmp, path)
        paths.append(str(path))
    return paths


def convert_jobs(inputs: list[str], out_dir: Path, with_reference: bool) -> list[tuple]:
    exe = cellarium_steps_exe()
    base = [exe, "convert", "--input", *inputs, "--cells-per-shard", str(CELLS_PER_SHARD), "--quiet"]
    jobs = [(OURS, [*base, "--output", str(out_dir / "converted")], [], False),
            (OURS_SHUFFLED, [*base, "--shuffle", "--output", str(out_dir / "shuffled")], [], False)]
    if with_reference:
        jobs.append((ANNDATA, [sys.executable, str(REFERENCE), "--input", *inputs, "--output", str(out_dir / "anndata")],
                     [], True))
    return jobs


def check_outputs(inputs: list[str], out_dir: Path) -> dict[str, bool]:
    """Every cell once in both outputs; the first unshuffled shard's counts are the first input's."""
    import anndata as ad
    import h5py

    def names(paths: list[str]) -> list[str]:
        found = []
        for path in paths:
            with h5py.File(path) as f:
                found += list(f["obs"][f["obs"].attrs["_index"]].asstr()[()])
        return found

    expected = sorted(names(inputs))
    checks = {}
    for label, name in ((OURS, "converted"), (OURS_SHUFFLED, "shuffled")):
        shards = sorted(glob.glob(str(out_dir / name / "shard_*.h5ad")))
        checks[f"{label}: every cell exactly once"] = sorted(names(shards)) == expected
    first_in, first_out = ad.read_h5ad(inputs[0]), ad.read_h5ad(out_dir / "converted" / "shard_00000.h5ad")
    n = min(first_in.n_obs, first_out.n_obs)
    checks[f"{OURS}: the first shard's first {n:,} cells are the first input's"] = bool(
        (first_out.X[:n] != first_in.X[:n]).nnz == 0 and (first_out.obs_names[:n] == first_in.obs_names[:n]).all())
    return checks


def scvi_rates(inputs: dict[str, list[str]], epochs: int, threads: int, repeats: int) -> dict[str, list[dict]]:
    """Our scVI training on each input's files (bench_scvi's worker, a fresh process each run), the inputs
    interleaved ``repeats`` times."""
    genes = prepare_data(OUT_DIR / "scvi", seed=0)["genes"]
    n_cells = sum(_n_obs(p) for p in next(iter(inputs.values())))
    spec = {"genes": genes, "source": "", "threads": threads, "batch_size": STREAM_BATCH_SIZE, "epochs": epochs,
            "kl_warmup_steps": default_warmup_steps(n_cells, STREAM_BATCH_SIZE, epochs), "data": "shards",
            "num_workers": 0}
    runs: dict[str, list[dict]] = {label: [] for label in inputs}
    for _ in range(repeats):
        for label, paths in inputs.items():
            runs[label].append(run_worker("ours-throughput", {**spec, "shards": paths}))
            print(f"[bench_convert] scVI on {label}: {runs[label][-1]['cells_per_s']:.0f} cells/s", file=sys.stderr)
    return runs


def loader_rates(inputs: dict[str, list[str]], repeats: int, genes: list[str]) -> dict[str, list[float]]:
    """Cells per second of the training loader alone (train-scvi's dataset: shuffled, the HVG columns,
    batches of 1,024, no totals or names) over each input's files, one epoch, in this process."""
    rates: dict[str, list[float]] = {label: [] for label in inputs}
    for _ in range(repeats):
        for label, paths in inputs.items():
            dataset = _dataset(paths, genes)
            start, n_cells = time.perf_counter(), 0
            for batch in dataset:
                n_cells += batch["x_ng"].shape[0]
            rates[label].append(n_cells / (time.perf_counter() - start))
    return rates


def _dataset(paths: list[str], genes: list[str]) -> Any:  # a ShardedCellDataset (torch imported here)
    from cellarium_steps.data import ShardedCellDataset, open_shards

    return ShardedCellDataset(open_shards(paths, batch_key="source"), batch_size=STREAM_BATCH_SIZE, shuffle=True,
                              with_totals=False, with_obs_names=False, genes=genes)


def same_batches(paths_a: list[str], paths_b: list[str], genes: list[str]) -> bool:
    """Whether two sets of shards give bit-identical training batches (counts, their order, batch codes)."""
    import torch

    def key(batch: dict) -> list:
        x = batch["x_ng"]
        return [x.crow_indices(), x.col_indices(), x.values(), batch["batch_index_n"]]

    pairs = zip(_dataset(paths_a, genes), _dataset(paths_b, genes), strict=True)
    return all(all(torch.equal(u, v) for u, v in zip(key(a), key(b))) for a, b in pairs)


def training_rows(args: argparse.Namespace, checks: dict[str, bool]) -> list[dict]:
    """The loader alone and (``--scvi-epochs``) scVI training on the first ``--scvi-shards`` files of the gzip
    input, of its conversion and of the uncompressed originals: the same cells (20,000 a shard on each side,
    in input order). Also checks that the converted and the original shards give identical batches."""
    from cellarium_steps.outputs.genes import read_gene_list

    k = args.scvi_shards
    files = {"gzip shards (the input)": sorted(glob.glob(str(OUT_DIR / f"shards_{args.cells}_gzip" / "*.h5ad")))[:k],
             "converted shards": sorted(glob.glob(str(OUT_DIR / f"convert_{args.cells}" / "converted" /
                                                     "shard_*.h5ad")))[:k],
             "uncompressed shards (the resampled originals)": ensure_resampled_shards(args.cells)[:k]}
    n_cells = sum(_n_obs(p) for p in files["converted shards"])
    genes = read_gene_list(prepare_data(OUT_DIR / "scvi", seed=0)["genes"])
    checks["converted and uncompressed original shards give bit-identical training batches"] = same_batches(
        files["converted shards"], files["uncompressed shards (the resampled originals)"], genes)
    rows = []
    loaded = loader_rates(files, args.scvi_repeats, genes)
    median = {label: float(np.median(rates)) for label, rates in loaded.items()}
    for label, rates in loaded.items():
        rows.append({"step": f"training loader alone, batch {STREAM_BATCH_SIZE}", "tool": f"cellarium-steps on {label}",
                     "cells": n_cells, "cells/s": round(median[label], 1),
                     "runs cells/s": " ".join(f"{r:.0f}" for r in rates),
                     "x gzip": round(median[label] / median["gzip shards (the input)"], 2)})
    if args.scvi_epochs:
        runs = scvi_rates(files, args.scvi_epochs, args.threads, args.scvi_repeats)
        median = {label: float(np.median([r["cells_per_s"] for r in res])) for label, res in runs.items()}
        for label, res in runs.items():
            rows.append({"step": f"scVI training, batch {STREAM_BATCH_SIZE}", "tool": f"cellarium-steps on {label}",
                         "cells": n_cells, "cells/s": round(median[label], 1),
                         "runs cells/s": " ".join(f"{r['cells_per_s']:.0f}" for r in res),
                         "cells/CPU-s": round(float(np.median([r["cells_per_cpu_s"] for r in res])), 1),
                         "x gzip": round(median[label] / median["gzip shards (the input)"], 2)})
    return rows


def _n_obs(path: str) -> int:
    import h5py

    with h5py.File(path) as f:
        return int(f["X"].attrs["shape"][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000, help="cells of the main size (default: 200000)")
    parser.add_argument("--also-cells", type=int, default=None, help="a larger size: our peak memory there")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each command at --cells (default: 3)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="no untimed first run")
    parser.add_argument("--scvi-epochs", type=int, default=2,
                        help="scVI epochs per throughput run, the first untimed (default: 2; 0: the loader alone)")
    parser.add_argument("--scvi-shards", type=int, default=2,
                        help="the loader and scVI runs read the first N shards of each input (default: 2, 40,000 "
                        "cells; 0: none of those runs)")
    parser.add_argument("--scvi-repeats", type=int, default=2, help="scVI runs of each input, interleaved (default: 2)")
    parser.add_argument("--skip-convert", action="store_true",
                        help="only the loader and scVI runs, on an earlier run's converted shards")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1),
                        help="torch threads of the scVI runs (default: all cores)")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    peaks: dict[tuple[str, int], float] = {}
    checks: dict[str, bool] = {}
    sizes = [(args.cells, args.repeats, args.warmup, True)]
    if args.also_cells:
        sizes.append((args.also_cells, 1, False, False))
    for n_cells, repeats, warmup, with_reference in ([] if args.skip_convert else sizes):
        inputs = ensure_gzip_shards(n_cells)
        out_dir = OUT_DIR / f"convert_{n_cells}"
        results = run_jobs(convert_jobs(inputs, out_dir, with_reference), warmup, repeats)
        reference = results.get(ANNDATA)
        for label, res in results.items():
            if isinstance(res, str):
                rows.append({"step": "convert 10 gzip shards", "tool": label, "cells": n_cells, "wall s": res})
                continue
            peaks[(label, n_cells)] = res["peak_rss_mb"]
            ratio = res["wall_s"] / reference["wall_s"] if isinstance(reference, dict) and label != ANNDATA else None
            rows.append({"step": "convert 10 gzip shards", "tool": label, "cells": n_cells,
                         "wall s": round(res["wall_s"], 2), "runs s": " ".join(f"{w:.1f}" for w in res["walls"]),
                         "peak mem MB": round(res["peak_rss_mb"]), "ours/anndata wall": ratio and round(ratio, 2)})
        checks.update({f"{name} ({n_cells:,} cells)": ok for name, ok in check_outputs(inputs, out_dir).items()})
    if args.also_cells and not args.skip_convert:
        for label in (OURS, OURS_SHUFFLED):
            growth = peaks[(label, args.also_cells)] / peaks[(label, args.cells)]
            checks[f"{label}: peak memory x{growth:.2f} from {args.cells:,} to {args.also_cells:,} cells"] = (
                growth <= MEMORY_FLAT_MAX)

    if args.scvi_shards:
        rows += training_rows(args, checks)

    print(f"\n{FULL_COMMAND} (this run: {' '.join(sys.argv[1:])})\n")
    print_table(rows)
    print()
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
