"""cellarium-steps pca: principal components of log-normalised expression on a gene list."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from cellarium_steps.atomic import atomic_path, write_csv_atomically
from cellarium_steps.data import ShardCollection, open_shards
from cellarium_steps.data.errors import InputError
from cellarium_steps.export import write_json_atomically
from cellarium_steps.export.tables import PROVENANCE_KEY
from cellarium_steps.models import ExactPCA, IncrementalPCA
from cellarium_steps.runner import fit_statistics
from cellarium_steps.runner.recipe import instantiate, spec
from cellarium_steps.steps.common import add_common_arguments, provenance_json, read_gene_list
from cellarium_steps.transforms import Filter, Log1p, NormalizeTotal

logger = logging.getLogger("cellarium_steps")

NAME = "pca"
HELP = "principal components of normalised, log1p counts on a gene list (exact or incremental), and cell embeddings"
EPILOG = """pipeline (one pass over the cells):
  NormalizeTotal(--target-count) -> Log1p (unless --no-log1p) -> keep --genes -> PCA

outputs:
  OUTPUT (Parquet)           one row per gene: gene, mean (float64), loadings (fixed-size list of
                             float32, one entry per component); config and versions in the metadata
  <stem>_variance.csv        component, explained_variance (population, ddof=0),
                             explained_variance_ratio (of the total variance of the kept genes)
  <stem>.pt                  the fitted model (torch.save), for cellarium_steps.steps.pca.load_pca
  OUTPUT + .provenance.json  the run's config and versions
  --embeddings DIR           one Parquet part per device: cell_id, pca (fixed-size list of float32)

methods:
  exact        float64 gene x gene covariance summed over the pass, then an eigendecomposition;
               memory 8 g^2 bytes (2,000 genes: 32 MB), exact whatever the batch size or devices
  incremental  rank-k incremental SVD (memory ~ k x g); approximate, best with cells in random order
  auto         exact up to --exact-max-genes genes, incremental above

example:
  cellarium-steps pca --input 'shards/*.h5ad' --genes out/hvg.csv --output out/pca.parquet \\
      --embeddings out/pca_cells.parquet"""

STATE_FORMAT = "cellarium_steps.pca/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("pca options")
    group.add_argument(
        "--genes", metavar="PATH",
        help="genes to use: a CSV/TSV/Parquet table with a 'gene' column (and, if present, only the rows whose "
        "'highly_variable' is true), or a text file with one gene per line; file order is kept (default: all genes)",
    )
    group.add_argument("--n-components", type=int, default=50, metavar="K", help="principal components (default: 50)")
    group.add_argument(
        "--method", choices=("exact", "incremental", "auto"), default="exact",
        help="exact: the G x G covariance, exact to float64 and fastest up to a few thousand genes; incremental: "
        "a streamed SVD whose memory grows with genes x (K + 500), for more genes than --exact-max-genes "
        "(all genes rather than HVGs); auto: exact up to --exact-max-genes, else incremental (default: exact)",
    )
    group.add_argument(
        "--exact-max-genes", type=int, default=5000, metavar="G",
        help="most genes the exact method takes (memory 8 G^2 bytes) (default: 5000)",
    )
    group.add_argument(
        "--target-count", type=float, default=10_000, metavar="T",
        help="total count every cell is scaled to before log1p (default: 10000)",
    )
    group.add_argument("--no-log1p", action="store_true", help="skip log1p after normalisation")
    group.add_argument(
        "--svd-niter", type=int, default=2, metavar="N",
        help="power iterations of each low-rank SVD update (incremental only; default: 2)",
    )
    group.add_argument(
        "--embeddings", metavar="DIR",
        help="also write every cell's coordinates: a directory of Parquet parts with cell_id and pca",
    )


def _genes_from_table(table: pd.DataFrame, path: str) -> list[str]:
    if "gene" not in table.columns:
        raise InputError(f"--genes: {path}: no 'gene' column (columns: {list(table.columns)[:10]})")
    if "highly_variable" in table.columns:
        flags = table["highly_variable"]
        if flags.dtype != bool:
            flags = flags.astype(str).str.strip().str.lower().isin(("true", "1", "yes"))
        table = table[flags.to_numpy()]
    genes = table["gene"].astype(str).tolist()
    if not genes:
        raise InputError(f"--genes: {path}: no gene is marked highly_variable")
    return genes


def resolve_method(method: str, n_genes: int, exact_max_genes: int) -> str:
    if method == "auto":
        return "exact" if n_genes <= exact_max_genes else "incremental"
    if method == "exact" and n_genes > exact_max_genes:
        raise InputError(
            f"--method exact: {n_genes} genes exceed --exact-max-genes {exact_max_genes} "
            f"(the covariance would take {8 * n_genes**2 / 2**20:.0f} MB); select genes with --genes, "
            "raise --exact-max-genes, or use --method incremental or auto"
        )
    return method


def transform_specs(target_count: float, log1p: bool, genes: list[str] | None) -> list[dict[str, Any]]:
    """Filter first: the per-cell scale uses each cell's total over all genes (from the data
    layer), and the other transforms act entry by entry, so the result equals
    normalise -> log1p -> filter while touching only the kept genes' entries."""
    specs = [spec(Filter, filter_list=list(genes))] if genes is not None else []
    specs.append(spec(NormalizeTotal, target_count=float(target_count)))
    if log1p:
        specs.append(spec(Log1p))
    return specs


def build_transforms(target_count: float, log1p: bool, genes: list[str] | None) -> list[nn.Module]:
    return [instantiate(s) for s in transform_specs(target_count, log1p, genes)]


def run(args: argparse.Namespace) -> None:
    if args.n_components < 1:
        raise InputError(f"--n-components must be at least 1, got {args.n_components}")
    if args.target_count <= 0:
        raise InputError(f"--target-count must be positive, got {args.target_count}")
    collection = open_shards(args.input)
    genes = read_gene_list(args.genes) if args.genes else None
    if genes is not None:
        Filter(genes).column_index(collection.var_names_g)  # unknown genes fail now, not mid-pass
    var_names_g = np.asarray(genes if genes is not None else collection.var_names_g, dtype=object)
    n_genes = len(var_names_g)
    if args.n_components > n_genes:
        raise InputError(f"--n-components {args.n_components} exceeds the number of genes ({n_genes})")
    method = resolve_method(args.method, n_genes, args.exact_max_genes)
    method_is_incremental = method == "incremental"
    if method_is_incremental and args.n_components > collection.n_obs:
        raise InputError(f"--n-components {args.n_components} exceeds the number of cells ({collection.n_obs})")

    # The incremental SVD keeps only the leading k directions after each batch, so a direction
    # that early batches barely show loses their share of its variance; visiting the shards and
    # blocks of cells in random order makes every batch more like the whole (on sorted PBMC
    # shards: PC1-3 variance error 5e-3 -> 2e-4). The exact method does not depend on order.
    shuffle = method_is_incremental
    model: ExactPCA | IncrementalPCA
    if method_is_incremental:
        model = IncrementalPCA(var_names_g, args.n_components, svd_lowrank_niter=args.svd_niter)
    else:
        model = ExactPCA(var_names_g, args.n_components)
    transforms = build_transforms(args.target_count, not args.no_log1p, genes)

    meta = provenance_json(NAME, args)
    logger.info("pca: %s, %d genes, %d components, %d cells", method, n_genes, args.n_components, collection.n_obs)
    trainer = fit_statistics(
        model, collection, transforms=transforms, batch_size=args.batch_size, num_workers=args.num_workers,
        shuffle=shuffle, seed=args.seed, devices=args.devices, accelerator=args.accelerator,
    )

    if trainer.global_rank == 0:
        config = {
            "method": method,
            "n_components": args.n_components,
            "target_count": float(args.target_count),
            "log1p": not args.no_log1p,
            "genes_filtered": genes is not None,
            "svd_lowrank_niter": args.svd_niter,
        }
        write_outputs(model, args.output, config, meta)
        ratio_k = model.explained_variance_ratio_k.cpu().numpy()
        logger.info(
            "pca: PC1 explains %.2f%%, the %d components %.2f%% of the variance",
            100 * ratio_k[0], len(ratio_k), 100 * ratio_k.sum(),
        )
    if args.embeddings:
        write_embeddings(args, model, transforms, collection, trainer, meta)


def write_embeddings(
    args: argparse.Namespace, model: ExactPCA | IncrementalPCA, transforms: list[nn.Module],
    collection: ShardCollection, fit_trainer: Any, meta: str,
) -> None:
    """A second pass, in file order, writing each cell's embedding.

    Lightning runs it (the Parquet writer is a Lightning callback): the fit's own trainer under DDP,
    whose process group is up, or a single-device one after a fit without Lightning.
    """
    from cellarium_steps.data import ShardDataModule
    from cellarium_steps.export.embeddings import ParquetEmbeddingWriter
    from cellarium_steps.runner import CellariumModule, build_trainer

    writer = ParquetEmbeddingWriter(args.embeddings, dim=args.n_components, embedding_column="pca", provenance=meta)
    if hasattr(fit_trainer, "predict"):
        trainer = fit_trainer
        trainer.callbacks.append(writer)
    else:
        trainer = build_trainer(devices=1, accelerator=args.accelerator, callbacks=[writer])
    datamodule = ShardDataModule(
        args.input, batch_size=args.batch_size, num_workers=args.num_workers, collection=collection
    )
    trainer.predict(CellariumModule(model, transforms=transforms), datamodule=datamodule, return_predictions=False)
    if trainer.global_rank == 0:
        logger.info("pca: wrote cell embeddings to %s", args.embeddings)


def output_paths(output: str) -> dict[str, Path]:
    path = Path(output)
    stem = path.with_suffix("") if path.suffix else path
    return {
        "components": path,
        "variance": stem.with_name(stem.name + "_variance.csv"),
        "state": stem.with_name(stem.name + ".pt"),
        "provenance": Path(output + ".provenance.json"),
    }


def components_table(model: ExactPCA | IncrementalPCA) -> pa.Table:
    """One row per gene: DuckDB and pyarrow read a gene's loadings as one fixed-size list."""
    components_kg = model.components_kg.cpu().numpy()
    k = components_kg.shape[0]
    loadings_gk = np.ascontiguousarray(components_kg.T, dtype=np.float32)
    return pa.table(
        {
            "gene": pa.array(np.asarray(model.var_names_g).astype(str), type=pa.string()),
            "mean": pa.array(model.mean_g.cpu().numpy(), type=pa.float64()),
            "loadings": pa.FixedSizeListArray.from_arrays(pa.array(loadings_gk.reshape(-1)), k),
        }
    )


def variance_table(model: ExactPCA | IncrementalPCA) -> pd.DataFrame:
    variance_k = model.explained_variance_k.cpu().numpy()
    return pd.DataFrame(
        {
            "component": [f"PC{i + 1}" for i in range(len(variance_k))],
            "explained_variance": variance_k,
            "explained_variance_ratio": model.explained_variance_ratio_k.cpu().numpy(),
        }
    )


def write_outputs(model: ExactPCA | IncrementalPCA, output: str, config: dict[str, Any], meta: str) -> None:
    paths = output_paths(output)
    table = components_table(model)
    table = table.replace_schema_metadata({PROVENANCE_KEY: meta.encode()})
    with atomic_path(paths["components"]) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_csv_atomically(variance_table(model), paths["variance"])
    state = {
        "format": STATE_FORMAT,
        "model": type(model).__name__,
        "var_names_g": [str(g) for g in model.var_names_g],
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "provenance": meta,
    }
    with atomic_path(paths["state"]) as tmp:
        torch.save(state, tmp)
    write_json_atomically(meta, paths["provenance"])


def read_pca_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``<stem>.pt`` file write_outputs wrote: model class, genes, config and state dict."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a PCA model written by cellarium-steps pca")
    return state


def load_pca(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ExactPCA | IncrementalPCA, list[nn.Module]]:
    """The fitted model and the transforms it was fitted after, from a ``<stem>.pt`` file.

    ``CellariumModule(model, transforms)`` then embeds new cells with ``trainer.predict``. The
    gene filter is rebuilt from the model's genes when the fit used a gene list.
    """
    state = read_pca_state(path, map_location)
    model_spec, specs = pca_specs(state)
    model = instantiate(model_spec)
    model.load_state_dict(state["state_dict"])
    return model, [instantiate(s) for s in specs]


def pca_specs(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Recipe specs of the fitted model (weights not included) and of the transforms it was fitted
    after, from a state :func:`read_pca_state` returned."""
    config = state["config"]
    genes = [str(g) for g in state["var_names_g"]]
    if state["model"] == "ExactPCA":
        model_spec = spec(ExactPCA, var_names_g=genes, n_components=int(config["n_components"]))
    else:
        model_spec = spec(IncrementalPCA, var_names_g=genes, n_components=int(config["n_components"]),
                          svd_lowrank_niter=int(config["svd_lowrank_niter"]))
    return model_spec, transform_specs(config["target_count"], config["log1p"],
                                       genes if config["genes_filtered"] else None)
