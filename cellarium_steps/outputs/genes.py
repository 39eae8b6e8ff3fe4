"""Gene lists: the hvg step's table (its highly variable rows) or a text file, checked against the shards."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from cellarium_steps.data.errors import InputError


def read_gene_list(path: str) -> list[str]:
    """Genes from an HVG table (its highly variable rows) or from a text file, in the file's order."""
    if not os.path.isfile(path):
        raise InputError(f"--genes: {path}: no such file")
    if path.lower().endswith((".csv", ".csv.gz", ".tsv", ".parquet")):
        try:
            if path.lower().endswith(".parquet"):
                table = pd.read_parquet(path)
            else:
                table = pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",")
        except (ValueError, OSError, pd.errors.ParserError) as e:
            raise InputError(f"--genes: {path}: not a readable table ({e})") from None
        if "gene" not in table.columns:
            raise InputError(f"--genes: {path}: no 'gene' column (columns: {list(table.columns)})")
        if "highly_variable" in table.columns:
            flags = table["highly_variable"]
            if flags.dtype != bool:
                flags = flags.astype(str).str.lower().isin(("true", "1"))
            table = table[flags.to_numpy()]
        genes = table["gene"].astype(str).tolist()
    else:
        with open(path) as f:
            genes = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not genes:
        raise InputError(f"--genes: {path}: no genes selected")
    if len(set(genes)) != len(genes):
        raise InputError(f"--genes: {path}: genes are listed more than once")
    return genes


def selected_genes(path: str | None, var_names_g: Sequence[str], where: str) -> list[str] | None:
    """The --genes list (None: all genes), checked against the shards' genes before any pass."""
    if not path:
        return None
    genes = read_gene_list(path)
    known = set(var_names_g)
    missing = [g for g in genes if g not in known]
    if missing:
        raise InputError(f"--genes: {len(missing)} of {len(genes)} genes are not in {where}, e.g. {missing[:5]}")
    return genes
