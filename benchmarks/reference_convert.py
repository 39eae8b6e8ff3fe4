"""Reference for the convert benchmark: what a user would write with anndata to uncompress shards.

Each shard is read whole (``anndata.read_h5ad``) and written back uncompressed (``write_h5ad``, no
compression) under the output directory with the same name, one shard at a time (so memory is one
shard, not the dataset). Run by ``bench_convert.py``; by hand::

    .venv/bin/python benchmarks/reference_convert.py --input benchmarks/out/shards_200000_gzip/*.h5ad \\
        --output benchmarks/out/convert_200000/reference
"""

from __future__ import annotations

import argparse
import os

import anndata as ad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="the .h5ad shards")
    parser.add_argument("--output", required=True, help="the directory to write them to")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    for path in args.input:
        ad.read_h5ad(path).write_h5ad(os.path.join(args.output, os.path.basename(path)))


if __name__ == "__main__":
    main()
