"""New data for a trained model: the model's genes that the data lacks (zero-filled on request) and batches
the model never saw (refused, encoded as one it saw, or added by a reference mapping). Every check runs on
the shards' metadata and batch column before the pass, and fails with one line naming the file and field."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.reader import ShardReader
from cellarium_steps.data.shards import ShardCollection, open_shards
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.features import ModelFeatures
from cellarium_steps.transforms import BatchIndexMap, Filter

logger = logging.getLogger("cellarium_steps")

MISSING_GENES = ("error", "zero")
DEFAULT_MAX_MISSING_GENES_FRACTION = 0.1
#: how many gene names a warning or an error quotes
SHOWN = 5


def check_missing_genes_options(missing_genes: str, max_missing_genes_fraction: float) -> None:
    if missing_genes not in MISSING_GENES:
        raise ConfigError(f"--missing-genes: {missing_genes!r} is not one of {MISSING_GENES}")
    if not 0.0 <= max_missing_genes_fraction < 1.0:
        raise ConfigError(f"--max-missing-genes-fraction: must be in [0, 1), got {max_missing_genes_fraction}")


def missing_genes_policy(genes: Sequence[str], collection: ShardCollection, *, missing_genes: str,
                         max_missing_genes_fraction: float) -> list[str]:
    """The model's ``genes`` that the shards lack; an ``InputError`` unless ``missing_genes="zero"`` and
    they are at most ``max_missing_genes_fraction`` of the model's genes (then a warning)."""
    check_missing_genes_options(missing_genes, max_missing_genes_fraction)
    present = set(map(str, collection.var_names_g))
    missing = [str(g) for g in genes if str(g) not in present]
    if not missing:
        return []
    path = collection.shards[0].path
    share = f"{len(missing)} of the model's {len(genes)} genes ({len(missing) / len(genes):.1%})"
    if missing_genes == "error":
        raise InputError(f"{path}: var_names lacks {share}, e.g. {missing[:SHOWN]} (--missing-genes zero reads "
                         "them as zeros)")
    if len(missing) > max_missing_genes_fraction * len(genes):
        raise InputError(f"{path}: var_names lacks {share}, e.g. {missing[:SHOWN]}: more than "
                         f"--max-missing-genes-fraction {max_missing_genes_fraction:g} to fill with zeros")
    logger.warning("%s: var_names lacks %s, e.g. %s; they are read as zeros", path, share, missing[:SHOWN])
    return missing


def _gene_stage(transforms: nn.ModuleList, model: nn.Module) -> tuple[nn.ModuleList, Filter | None, list[str]]:
    """Where a pipeline picks its genes: its first Filter (inside a frozen feature model too), else its model's."""
    for transform in transforms:
        if isinstance(transform, Filter):
            return transforms, transform, [str(g) for g in transform.filter_list]
        if isinstance(transform, ModelFeatures):
            return _gene_stage(transform.transforms, transform.model)
    return transforms, None, [str(g) for g in getattr(model, "var_names_g", [])]


def model_genes(module: CellariumModule) -> list[str]:
    """The genes a trained pipeline reads from the shards."""
    return _gene_stage(module.transforms, module.model)[2]


def fill_missing_genes(module: CellariumModule, collection: ShardCollection, *, missing_genes: str,
                       max_missing_genes_fraction: float) -> list[str]:
    """Apply :func:`missing_genes_policy` to the module's genes; when some are missing (and allowed), its gene
    filter reads them as zeros (a filter is added in front of a model that reads every gene)."""
    transforms, gene_filter, genes = _gene_stage(module.transforms, module.model)
    missing = missing_genes_policy(genes, collection, missing_genes=missing_genes,
                                   max_missing_genes_fraction=max_missing_genes_fraction)
    if missing:
        if gene_filter is None:
            transforms.append(Filter(genes, missing_genes="zero"))
        else:
            gene_filter.missing_genes = "zero"
    return missing


# -- batches -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryShards:
    """Shards opened with the model's batch codes first and the data's other batches after them."""

    collection: ShardCollection
    n_known: int
    #: cells of each batch the model did not see, in code order (codes n_known, n_known + 1, ...)
    unseen_cells: dict[str, int]

    @property
    def unseen_categories(self) -> list[str]:
        return list(self.unseen_cells)


def open_query_shards(inputs: str | Sequence[str], *, batch_key: str | None, categories: Sequence[str] | None,
                      obs_columns: Iterable[str] = (), **open_kwargs: Any) -> QueryShards:
    """Open the shards with the model's batch categories (codes unchanged), followed by the batches of the
    data that the model did not see and that hold cells (counted from the batch column alone).
    ``open_kwargs`` go to :func:`~cellarium_steps.data.shards.open_shards` (covariates, data options)."""
    obs_columns = tuple(obs_columns)
    if not batch_key or categories is None:
        collection = open_shards(inputs, batch_key=batch_key, obs_columns=obs_columns, **open_kwargs)
        return QueryShards(collection, collection.n_batch, {})
    known = [str(c) for c in categories]
    found = open_shards(inputs, batch_key=batch_key, obs_columns=obs_columns, **open_kwargs)
    unseen = [str(c) for c in found.batch_categories if str(c) not in set(known)]
    collection = open_shards(inputs, batch_key=batch_key, obs_columns=obs_columns, batch_categories=known + unseen,
                             **open_kwargs)
    if not unseen:
        return QueryShards(collection, len(known), {})
    counts = np.zeros(len(known) + len(unseen), dtype=np.int64)
    reader = ShardReader(collection, require_counts=False)
    try:
        for shard in collection.shards:
            counts += np.bincount(reader.read_batch_index(shard, np.arange(shard.n_obs)), minlength=len(counts))
    finally:
        reader.close()
    cells = {c: int(n) for c, n in zip(unseen, counts[len(known):]) if n > 0}
    if len(cells) < len(unseen):  # categories no cell holds: leave them out of the codes
        collection = open_shards(inputs, batch_key=batch_key, obs_columns=obs_columns,
                                 batch_categories=known + list(cells), **open_kwargs)
    return QueryShards(collection, len(known), cells)


def refuse_unseen(shards: QueryShards, hint: str) -> None:
    """An ``InputError`` naming the first cell (file, row, obs name) of a batch the model did not see."""
    if not shards.unseen_cells:
        return
    collection = shards.collection
    reader = ShardReader(collection, require_counts=False)
    try:
        for shard in collection.shards:
            rows = np.arange(shard.n_obs)
            batch_n = reader.read_batch_index(shard, rows)
            if (batch_n >= shards.n_known).any():
                row = int(np.argmax(batch_n >= shards.n_known))
                name = reader.read_obs_names(shard, rows[row:row + 1])[0]
                value = collection.batch_categories[batch_n[row]]
                raise InputError(
                    f"{shard.path}: cell {name!r} (row {row}) has obs[{collection.batch_key!r}] {value!r}, a batch "
                    f"the model did not see ({sum(shards.unseen_cells.values())} cells of such batches "
                    f"{list(shards.unseen_cells)[:SHOWN]}; the model saw "
                    f"{list(collection.batch_categories[:min(shards.n_known, 8)])}); {hint}"
                )
    finally:
        reader.close()


def unseen_batch_map(shards: QueryShards, unseen_batch: str) -> BatchIndexMap | None:
    """``--unseen-batch``: ``error`` refuses cells of batches the model did not see; ``as:NAME`` encodes them
    as the model's batch NAME (logged with the number of cells); None when no such cell exists."""
    categories = [str(c) for c in shards.collection.batch_categories[:shards.n_known]]
    target = parse_unseen_batch(unseen_batch, categories)
    if not shards.unseen_cells:
        return None
    if target is None:
        refuse_unseen(shards, "--unseen-batch as:NAME encodes them as the model's batch NAME")
    assert target is not None
    n_cells = sum(shards.unseen_cells.values())
    logger.warning("%d cells of batches the model did not see (%s) are encoded as its batch %r", n_cells,
                   ", ".join(f"{c}: {n}" for c, n in list(shards.unseen_cells.items())[:SHOWN]), categories[target])
    return BatchIndexMap(list(range(shards.n_known)) + [target] * len(shards.unseen_cells))


def parse_unseen_batch(value: str, categories: Sequence[str]) -> int | None:
    """``error`` -> None; ``as:NAME`` -> NAME's code among the model's ``categories``."""
    check_unseen_batch_option(value)
    if value == "error":
        return None
    name = value[3:]
    if name not in categories:
        raise ConfigError(f"--unseen-batch: {name!r} is not one of the model's batches {list(categories)[:8]}")
    return list(categories).index(name)


def check_unseen_batch_option(value: str) -> None:
    if value != "error" and not (value.startswith("as:") and value[3:]):
        raise ConfigError(f"--unseen-batch: expected 'error' or 'as:NAME', got {value!r}")
