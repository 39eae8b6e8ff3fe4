"""PCA of normalised, log1p counts on a gene list: method choice, transforms, fit, embeddings, reload."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cellarium_steps.data import ShardCollection, ShardDataModule, open_shards
from cellarium_steps.data.errors import InputError
from cellarium_steps.data.options import DataOptions
from cellarium_steps.models import ExactPCA, IncrementalPCA
from cellarium_steps.outputs.embeddings import ParquetEmbeddingWriter
from cellarium_steps.outputs.genes import read_gene_list
from cellarium_steps.outputs.pca import read_pca_state, write_pca_outputs
from cellarium_steps.runner import fit_statistics
from cellarium_steps.runner.recipe import instantiate, spec
from cellarium_steps.transforms import Filter, Log1p, NormalizeTotal

logger = logging.getLogger("cellarium_steps")

METHODS = ("exact", "incremental", "auto")


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


def transform_specs(target_count: float, log1p: bool, genes: Sequence[str] | None) -> list[dict[str, Any]]:
    """Filter first: the per-cell scale uses each cell's total over all genes (from the data
    layer), and the other transforms act entry by entry, so the result equals
    normalise -> log1p -> filter while touching only the kept genes' entries."""
    specs = [spec(Filter, filter_list=list(genes))] if genes is not None else []
    specs.append(spec(NormalizeTotal, target_count=float(target_count)))
    if log1p:
        specs.append(spec(Log1p))
    return specs


def build_transforms(target_count: float, log1p: bool, genes: Sequence[str] | None) -> list[nn.Module]:
    return [instantiate(s) for s in transform_specs(target_count, log1p, genes)]


def model_spec(method: str, var_names_g: Sequence[str], n_components: int, svd_lowrank_niter: int) -> dict[str, Any]:
    genes = [str(g) for g in var_names_g]
    if method == "exact":
        return spec(ExactPCA, var_names_g=genes, n_components=int(n_components))
    return spec(IncrementalPCA, var_names_g=genes, n_components=int(n_components),
                svd_lowrank_niter=int(svd_lowrank_niter))


def fit_pca(
    *,
    inputs: Sequence[str],
    output: str,
    genes: str | None = None,
    n_components: int = 50,
    method: str = "exact",
    exact_max_genes: int = 5000,
    target_count: float = 10_000,
    log1p: bool = True,
    svd_niter: int = 2,
    embeddings: str | None = None,
    batch_size: int = 10_000,
    num_workers: int = 0,
    devices: int | str = 1,
    accelerator: str = "auto",
    num_nodes: int = 1,
    seed: int = 0,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> ExactPCA | IncrementalPCA:
    """Fit PCA in one pass and write its outputs (``outputs/pca.py``); with ``embeddings``, a second
    pass writes every cell's coordinates. Returns the fitted model."""
    if n_components < 1:
        raise InputError(f"--n-components must be at least 1, got {n_components}")
    if target_count <= 0:
        raise InputError(f"--target-count must be positive, got {target_count}")
    collection = open_shards(inputs, **(data_options or DataOptions()).open_kwargs())
    gene_list = read_gene_list(genes) if genes else None
    if gene_list is not None:
        Filter(gene_list).column_index(collection.var_names_g)  # unknown genes fail now, not mid-pass
    var_names_g = np.asarray(gene_list if gene_list is not None else collection.var_names_g, dtype=object)
    n_genes = len(var_names_g)
    if n_components > n_genes:
        raise InputError(f"--n-components {n_components} exceeds the number of genes ({n_genes})")
    method = resolve_method(method, n_genes, exact_max_genes)
    if method == "incremental" and n_components > collection.n_obs:
        raise InputError(f"--n-components {n_components} exceeds the number of cells ({collection.n_obs})")

    config = {"method": method, "n_components": int(n_components), "target_count": float(target_count),
              "log1p": bool(log1p), "genes_filtered": gene_list is not None, "svd_lowrank_niter": int(svd_niter)}
    meta = json.dumps(provenance or {}, default=str, sort_keys=True)
    recipe = {
        "model": model_spec(method, var_names_g, n_components, svd_niter),
        "transforms": transform_specs(target_count, log1p, gene_list),
        "data": {"pca": config, "prediction": {"key": "x_ng", "column": "pca", "dim": int(n_components)}},
        "provenance": json.loads(meta),
    }
    model = instantiate(recipe["model"])
    transforms = [instantiate(s) for s in recipe["transforms"]]
    logger.info("pca: %s, %d genes, %d components, %d cells", method, n_genes, n_components, collection.n_obs)
    # The incremental SVD keeps only the leading k directions after each batch, so a direction
    # that early batches barely show loses their share of its variance; visiting the shards and
    # blocks of cells in random order makes every batch more like the whole (on sorted PBMC
    # shards: PC1-3 variance error 5e-3 -> 2e-4). The exact method does not depend on order.
    trainer = fit_statistics(
        model, collection, transforms=transforms, batch_size=batch_size, num_workers=num_workers,
        shuffle=method == "incremental", seed=seed, devices=devices, accelerator=accelerator, num_nodes=num_nodes,
    )
    if trainer.global_rank == 0:
        write_pca_outputs(model, recipe, output, meta)
        ratio_k = model.explained_variance_ratio_k.cpu().numpy()
        logger.info("pca: PC1 explains %.2f%%, the %d components %.2f%% of the variance",
                    100 * ratio_k[0], len(ratio_k), 100 * ratio_k.sum())
    if embeddings:
        write_embeddings(embeddings, model, transforms, collection, trainer, meta, batch_size=batch_size,
                         num_workers=num_workers, accelerator=accelerator)
    return model


def write_embeddings(
    path: str, model: ExactPCA | IncrementalPCA, transforms: list[nn.Module], collection: ShardCollection,
    fit_trainer: Any, meta: str, *, batch_size: int, num_workers: int, accelerator: str,
) -> None:
    """A second pass, in file order, writing each cell's embedding.

    Lightning runs it (the Parquet writer is a Lightning callback): the fit's own trainer under DDP,
    whose process group is up, or a single-device one after a fit without Lightning.
    """
    from cellarium_steps.runner import CellariumModule, build_trainer

    writer = ParquetEmbeddingWriter(path, dim=model.n_components, embedding_column="pca", provenance=meta)
    if hasattr(fit_trainer, "predict"):
        trainer = fit_trainer
        trainer.callbacks.append(writer)
    else:
        trainer = build_trainer(devices=1, accelerator=accelerator, callbacks=[writer])
    datamodule = ShardDataModule(
        [shard.path for shard in collection.shards], batch_size=batch_size, num_workers=num_workers,
        collection=collection,
    )
    trainer.predict(CellariumModule(model, transforms=transforms), datamodule=datamodule, return_predictions=False)
    if trainer.global_rank == 0:
        logger.info("pca: wrote cell embeddings to %s", path)


def pca_specs(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Recipe specs of the fitted model (weights not included) and of the transforms it was fitted
    after, from a state :func:`read_pca_state` returned (either file format)."""
    if state.get("recipe") is not None:
        return state["recipe"]["model"], list(state["recipe"]["transforms"])
    config = state["config"]
    genes = [str(g) for g in state["var_names_g"]]
    method = "exact" if state["model"] == "ExactPCA" else "incremental"
    return (model_spec(method, genes, config["n_components"], config.get("svd_lowrank_niter", 2)),
            transform_specs(config["target_count"], config["log1p"], genes if config["genes_filtered"] else None))


def load_pca(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ExactPCA | IncrementalPCA, list[nn.Module]]:
    """The fitted model and the transforms it was fitted after, from the pca step's model file.

    ``CellariumModule(model, transforms)`` then embeds new cells with ``trainer.predict``.
    """
    state = read_pca_state(path, map_location)
    model_spec_, specs = pca_specs(state)
    model = instantiate(model_spec_)
    model.load_state_dict(state["state_dict"])
    return model, [instantiate(s) for s in specs]
