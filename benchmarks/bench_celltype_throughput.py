"""Cell-type annotation throughput: train-socam and predict, cells per second, on resampled shards.

The shards are ``n`` cells bootstrapped from the merged PBMC file (``_harness.ensure_resampled_shards``,
10 shards under ``benchmarks/out/shards_<n>/``, obs carries ``cell_type_ontology_term_id``: about half
the cells labelled at mixed depth, the rest 'unknown', all streamed). Genes: our ``hvg`` step
(2,000, ``--batch-key batch``) on the same shards, run once and cached (not timed).

Timed, each in a fresh process (imports, checkpoint writing included), after one untimed warm-up
of the 1-epoch run so that both read the shards from the page cache:

* ``train-socam`` for 1 and for ``--epochs`` epochs: end-to-end cells/s = cells x epochs / wall, and
  the per-epoch rate from the difference of the two runs (start-up cancelled out);
* ``predict`` of the trained checkpoint over all cells (the Parquet with the call and top-k written).

    .venv/bin/python benchmarks/bench_celltype_throughput.py --cells 200000
    .venv/bin/python benchmarks/bench_celltype_throughput.py --cells 20000 --epochs 2   # quick check
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OUT_DIR, cellarium_steps_exe, ensure_resampled_shards, measure, print_table, warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000, help="cells to resample (default 200,000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the longer training run (default 3)")
    parser.add_argument("--batch-size", type=int, default=1024, help="training batch size (train-socam's default)")
    parser.add_argument("--predict-batch-size", type=int, default=4096, help="predict batch size (its default)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "auto"))
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the per-epoch rate is the difference from a 1-epoch run)")

    exe = cellarium_steps_exe()
    shards = ensure_resampled_shards(args.cells)
    out = OUT_DIR / f"celltype_{args.cells}"
    out.mkdir(parents=True, exist_ok=True)
    genes = out / "hvg.csv"
    if not genes.is_file():
        subprocess.run([exe, "hvg", "--input", *shards, "--batch-key", "batch", "--n-top-genes", "2000",
                        "--output", str(genes), "--quiet"], check=True)
    common = ["--devices", str(args.devices), "--accelerator", args.accelerator, "--num-workers", str(args.num_workers),
              "--quiet"]

    def train(epochs: int) -> tuple[list[str], str]:
        ckpt = str(out / f"socam_{epochs}ep.ckpt")
        return [exe, "train-socam", "--input", *shards, "--genes", str(genes), "--output", ckpt,
                "--max-epochs", str(epochs), "--batch-size", str(args.batch_size), *common], ckpt

    one_cmd, _ = train(1)
    warm_up(one_cmd)
    one = measure(one_cmd)
    many_cmd, ckpt = train(args.epochs)
    many = measure(many_cmd)
    predict_cmd = [exe, "predict", "--checkpoint", ckpt, "--input", *shards, "--output", str(out / "cells.parquet"),
                   "--batch-size", str(args.predict_batch_size), *common]
    predict = measure(predict_cmd)

    n = args.cells
    per_epoch_s = (many["wall_s"] - one["wall_s"]) / (args.epochs - 1)
    rows = [
        {"step": "train-socam", "epochs": 1, "wall s": one["wall_s"], "cells/s (end to end)": n / one["wall_s"],
         "peak RSS MB": one["peak_rss_mb"]},
        {"step": "train-socam", "epochs": args.epochs, "wall s": many["wall_s"],
         "cells/s (end to end)": n * args.epochs / many["wall_s"],
         "cells/s (per epoch)": n / per_epoch_s if per_epoch_s > 0 else None, "peak RSS MB": many["peak_rss_mb"]},
        {"step": "predict", "epochs": None, "wall s": predict["wall_s"], "cells/s (end to end)": n / predict["wall_s"],
         "peak RSS MB": predict["peak_rss_mb"]},
    ]
    print(f"{n:,} resampled cells in {len(shards)} shards, 2,000 HVG genes, devices={args.devices} "
          f"({args.accelerator}), train batch {args.batch_size}, predict batch {args.predict_batch_size}, "
          f"num_workers={args.num_workers}")
    print_table(rows)


if __name__ == "__main__":
    main()
