"""train-scvi --reference: map a query onto a trained scVI model (scArches' architectural surgery).

The query checkpoint is the reference's model with the query's new batches (and new categories of its
categorical covariates) added after the reference's (whose codes stay), the reference's weights copied, and only the new batches' parameters trained (see
:mod:`cellarium_steps.models._scvi_mapping`), streamed like any training. It embeds reference and query
cells in one latent space; the reference's cells keep their latent means exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.options import DataOptions
from cellarium_steps.data.shards import ShardCollection, open_shards
from cellarium_steps.models._scvi_mapping import freeze_reference, transfer_reference_weights
from cellarium_steps.models.scvi import SingleCellVariationalInference
from cellarium_steps.pipelines.features import load_scvi_checkpoint
from cellarium_steps.pipelines.query_data import QueryShards, missing_genes_policy, open_query_shards
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import state_fingerprint
from cellarium_steps.transforms import Filter


@dataclass
class Reference:
    """A train-scvi checkpoint to map onto."""

    path: str
    recipe: dict[str, Any]
    model: SingleCellVariationalInference
    fingerprint: str

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.model.var_names_g]

    @property
    def batch_key(self) -> str | None:
        return self.recipe.get("data", {}).get("batch_key")

    @property
    def batch_categories(self) -> list[str]:
        return [str(c) for c in self.recipe.get("data", {}).get("batch_categories") or []]

    @property
    def categorical_covariates(self) -> dict[str, list[str]]:
        """Each categorical covariate's categories, in code order (checkpoints before covariates: none)."""
        recorded = (self.recipe.get("data", {}).get("covariates") or {}).get("categorical") or {}
        return {str(key): [str(c) for c in categories] for key, categories in recorded.items()}

    @property
    def continuous_covariates(self) -> list[str]:
        return list((self.recipe.get("data", {}).get("covariates") or {}).get("continuous") or [])


def load_reference(path: str) -> Reference:
    module = load_scvi_checkpoint(path, f"--reference {path}")
    assert isinstance(module.model, SingleCellVariationalInference)
    return Reference(path, module.recipe or {}, module.model, state_fingerprint(module.model.state_dict()))


def refuse_architecture_options(options: Mapping[str, Any]) -> None:
    """With --reference the model is the reference's: an architecture, genes or model config option is an error."""
    given = [name for name, value in options.items() if value not in (None, False, "")]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"--reference: the model's architecture and genes are the reference's; remove {flags}")


@dataclass
class Query:
    """The query's shards (the reference's batch codes first, then the new batches) and its genes."""

    batch_key: str
    shards: QueryShards
    #: the reference's genes that the query lacks, read as zeros
    missing_genes: list[str]
    #: each categorical covariate's categories the reference did not have (coded after the reference's)
    new_categories: dict[str, list[str]]

    @property
    def collection(self) -> ShardCollection:
        return self.shards.collection


def open_query(reference: Reference, inputs: Sequence[str], *, batch_key: str | None, obs_columns: Iterable[str],
               missing_genes: str, max_missing_genes_fraction: float,
               data_options: DataOptions | None = None) -> Query:
    """Open the query shards against the reference, all before the pass: the batch column (the reference's by
    default), the reference's covariates with the query's new categories after the reference's, the counts
    matrix and gene names the reference was read with (unless ``data_options`` say otherwise), the new
    batches or categories (at least one), and the reference's genes the query lacks."""
    batch_key = batch_key or reference.batch_key
    if not batch_key or not reference.batch_categories:
        raise ConfigError(f"--reference: {reference.path} was trained without --batch-key; mapping adds the "
                          "query's batches to the reference's, so the reference needs batches")
    open_kwargs: dict[str, Any] = {
        **(data_options or DataOptions()).with_recorded(reference.recipe.get("data", {}).get("source")).open_kwargs(),
        "continuous_covariate_keys": reference.continuous_covariates,
    }
    known = reference.categorical_covariates
    new_categories: dict[str, list[str]] = {}
    if known:  # the query's own categories (those its cells hold), to add the new ones after the reference's
        found = open_shards(inputs, categorical_covariate_keys=list(known), **open_kwargs)
        new_categories = {key: [str(c) for c in found_k if str(c) not in set(known[key])]
                          for key, found_k in zip(known, found.covariate_categories)}
    shards = open_query_shards(
        inputs, batch_key=batch_key, categories=reference.batch_categories, obs_columns=obs_columns,
        categorical_covariate_keys=list(known),
        covariate_categories={key: known[key] + new_categories[key] for key in known}, **open_kwargs,
    )
    if not shards.unseen_cells and not any(new_categories.values()):
        raise InputError(f"{shards.collection.shards[0].path}: every obs[{batch_key!r}] value of the query is a batch "
                         f"{reference.path} was trained on (and every covariate category one it knows); nothing to "
                         f"map: predict with --checkpoint {reference.path}")
    missing = missing_genes_policy(reference.genes, shards.collection, missing_genes=missing_genes,
                                   max_missing_genes_fraction=max_missing_genes_fraction)
    return Query(batch_key, shards, missing, {k: v for k, v in new_categories.items() if v})


def reference_entry(reference: Reference, query: Query) -> dict[str, Any]:
    """What the query checkpoint's recipe records of its reference (``data.reference``); predict
    ``--features-from`` checks the fingerprint against the weights a classifier was trained on."""
    return {
        "checkpoint": reference.path, "fingerprint": reference.fingerprint, "n_batch": reference.model.n_batch,
        "batch_categories": reference.batch_categories, "new_batch_cells": query.shards.unseen_cells,
        "categorical_covariates": reference.categorical_covariates, "new_categories": query.new_categories,
        "missing_genes": query.missing_genes,
    }


def prepare_query_module(module: CellariumModule, reference: Reference, query: Query, *, fresh: bool) -> None:
    """Give a freshly built query module the reference's weights (not when resuming: the checkpoint has them),
    read the missing genes as zeros, and freeze all but the new batches' parameters."""
    if query.missing_genes:
        gene_filter = module.transforms[0]
        assert isinstance(gene_filter, Filter)
        gene_filter.missing_genes = "zero"
    model = module.model
    assert isinstance(model, SingleCellVariationalInference)
    if fresh:
        transfer_reference_weights(reference.model, model)
    freeze_reference(model, reference.model.n_batch, reference.model.n_cats_per_cov)
