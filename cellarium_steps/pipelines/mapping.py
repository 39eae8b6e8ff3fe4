"""train-scvi --reference: map a query onto a trained scVI model (scArches' architectural surgery).

The query checkpoint is the reference's model with the query's new batches added after the reference's
(whose codes stay), the reference's weights copied, and only the new batches' parameters trained (see
:mod:`cellarium_steps.models._scvi_mapping`), streamed like any training. It embeds reference and query
cells in one latent space; the reference's cells keep their latent means exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.models._scvi_mapping import freeze_reference, transfer_reference_weights
from cellarium_steps.models.scvi import SingleCellVariationalInference
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


def load_reference(path: str) -> Reference:
    try:
        module = CellariumModule.from_checkpoint(path)
    except (OSError, ValueError) as e:
        raise InputError(f"--reference: {e}") from None
    if not isinstance(module.model, SingleCellVariationalInference):
        raise InputError(f"--reference: {path}: a {type(module.model).__name__} checkpoint, not train-scvi's")
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

    @property
    def collection(self):  # noqa: ANN201 - a ShardCollection
        return self.shards.collection


def open_query(reference: Reference, inputs: Sequence[str], *, batch_key: str | None, obs_columns: Iterable[str],
               missing_genes: str, max_missing_genes_fraction: float) -> Query:
    """Open the query shards against the reference, all before the pass: the batch column (the reference's by
    default), the new batches (at least one), and the reference's genes the query lacks."""
    batch_key = batch_key or reference.batch_key
    if not batch_key or not reference.batch_categories:
        raise ConfigError(f"--reference: {reference.path} was trained without --batch-key; mapping adds the "
                          "query's batches to the reference's, so the reference needs batches")
    shards = open_query_shards(inputs, batch_key=batch_key, categories=reference.batch_categories,
                               obs_columns=obs_columns)
    if not shards.unseen_cells:
        raise InputError(f"{shards.collection.shards[0].path}: every obs[{batch_key!r}] value of the query is a batch "
                         f"{reference.path} was trained on; nothing to map: predict with --checkpoint {reference.path}")
    missing = missing_genes_policy(reference.genes, shards.collection, missing_genes=missing_genes,
                                   max_missing_genes_fraction=max_missing_genes_fraction)
    return Query(batch_key, shards, missing)


def reference_entry(reference: Reference, query: Query) -> dict[str, Any]:
    """What the query checkpoint's recipe records of its reference (``data.reference``); predict
    ``--features-from`` checks the fingerprint against the weights a classifier was trained on."""
    return {
        "checkpoint": reference.path, "fingerprint": reference.fingerprint, "n_batch": reference.model.n_batch,
        "batch_categories": reference.batch_categories, "new_batch_cells": query.shards.unseen_cells,
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
    freeze_reference(model, reference.model.n_batch)
