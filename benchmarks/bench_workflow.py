"""The whole workflow on resampled PBMC shards: per-rule time and memory, and the orchestration overhead.

    .venv/bin/python benchmarks/bench_workflow.py --cells 200000

Runs ``snakemake --cores N`` on a config pointing at ``benchmarks/out/shards_<cells>/`` (built by
resampling the real PBMC file, see ``_harness.ensure_resampled_shards``) and prints, per rule, the
seconds and peak memory that Snakemake's ``benchmark:`` files recorded. The overhead columns:

* *start-up*: ``cellarium-steps <step> --help`` timed alone (interpreter, imports, argument parsing),
  the part of every rule's time that is not the step's own work;
* *Snakemake*: the run's wall time less the sum of the rules' times, per rule (DAG building,
  job scheduling, output checks). Rules run one after another (each asks for every core).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _harness import OUT_DIR, REPO_ROOT, cellarium_steps_exe, ensure_resampled_shards, print_table

RULE_STEPS = {
    "mean_var": "mean-var", "tdigest": "tdigest", "hvg": "hvg", "pca": "pca", "train_scvi": "train-scvi",
    "predict_scvi": "predict", "train_socam": "train-socam", "predict_socam": "predict", "export": "export",
    "report_plots": "report",
}


def write_config(args: argparse.Namespace, shards: list[str], directory: Path) -> Path:
    config = {
        "input": shards,
        "results": str(directory / "results"),
        "batch_key": "source",
        "cell_type_key": "cell_type_ontology_term_id",
        "accelerator": "cpu",
        "devices": 1,
        "seed": 0,
        "hvg": {"n_top_genes": 2000},
        "pca": {"n_components": 50},
        "train_scvi": {"max_epochs": args.scvi_epochs, "batch_size": 1024},
        "train_socam": {"max_epochs": args.socam_epochs, "batch_size": 1024},
        "export": {"dataset": f"pbmc_resampled_{args.cells}"},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def startup_seconds(step: str, repeats: int = 3) -> float:
    exe = cellarium_steps_exe()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([exe, step, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_benchmarks(results: Path) -> dict[str, dict[str, float]]:
    rows = {}
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        rows[tsv.stem] = {"s": float(row["s"]), "max_rss": float(row["max_rss"]), "max_pss": float(row["max_pss"])}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--scvi-epochs", type=int, default=2)
    parser.add_argument("--socam-epochs", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()

    shards = ensure_resampled_shards(args.cells, n_shards=args.shards)
    directory = OUT_DIR / f"workflow_{args.cells}"
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(args, shards, directory)
    results = directory / "results"
    for old in (results / "benchmarks").glob("*.tsv"):
        old.unlink()
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    start = time.perf_counter()
    subprocess.run(
        [snakemake, "all", "--cores", str(args.cores), "--configfile", str(config), "--forceall", "--quiet", "rules"],
        cwd=REPO_ROOT, check=True,
    )
    wall = time.perf_counter() - start

    measured = read_benchmarks(results)
    startups = {step: startup_seconds(step) for step in sorted(set(RULE_STEPS.values()))}
    rules_total = sum(m["s"] for m in measured.values())
    snakemake_per_rule = (wall - rules_total) / max(len(measured), 1)
    table = []
    for rule, m in measured.items():
        step = RULE_STEPS.get(rule)
        start_up = startups.get(step) if step else None
        table.append({
            "rule": rule,
            "s": round(m["s"], 1),
            "max RSS MB": round(m["max_rss"]),
            "max PSS MB": round(m["max_pss"]),
            "start-up s": None if start_up is None else round(start_up, 1),
            "overhead s (start-up + Snakemake)": None if start_up is None else round(start_up + snakemake_per_rule, 1),
        })
    print(f"\nworkflow on {args.cells:,} cells in {args.shards} shards, {args.cores} cores: {wall:.1f} s wall, "
          f"{rules_total:.1f} s in rules, Snakemake's own {wall - rules_total:.1f} s "
          f"({snakemake_per_rule:.1f} s per rule)\n")
    print_table(table)


if __name__ == "__main__":
    main()
