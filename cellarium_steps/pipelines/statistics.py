"""Per-gene statistics in one or two passes: mean/var (and per batch), t-digest quantiles of the
non-zero counts, and highly variable genes by Seurat v3."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from typing import Any

from cellarium_steps.data import ShardCollection, open_shards
from cellarium_steps.data.errors import ConfigError, InputError
from cellarium_steps.data.options import DataOptions
from cellarium_steps.models import HVGSeuratV3, OnePassMeanVarStd, TDigest
from cellarium_steps.models.hvg_seurat_v3 import BatchStatisticsMismatchError, HVGWarning, NoBatchLeftError
from cellarium_steps.outputs.statistics import (
    read_mean_var_statistics,
    write_hvg_tables,
    write_mean_var_tables,
    write_tdigest_tables,
)
from cellarium_steps.runner import fit_statistics

logger = logging.getLogger("cellarium_steps")


def _meta(provenance: dict[str, Any] | None) -> str:
    return json.dumps(provenance or {}, default=str, sort_keys=True)


def mean_var(
    *, inputs: Sequence[str], output: str, batch_key: str | None = None, algorithm: str = "naive",
    batch_size: int = 10_000, num_workers: int = 0, devices: int | str = 1, accelerator: str = "auto",
    num_nodes: int = 1, seed: int = 0, data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> OnePassMeanVarStd:
    """Per-gene mean, population variance and std over all cells (the model writes ``output``), and per batch."""
    collection = open_shards(inputs, batch_key=batch_key, **(data_options or DataOptions()).open_kwargs())
    model = OnePassMeanVarStd(collection.var_names_g, algorithm=algorithm, n_batch=collection.n_batch,
                              output_path=output)
    trainer = fit_statistics(model, collection, batch_size=batch_size, num_workers=num_workers, seed=seed,
                             devices=devices, accelerator=accelerator, num_nodes=num_nodes)
    if trainer.global_rank == 0:
        write_mean_var_tables(model.batch_summary_df(collection.batch_categories), output, _meta(provenance))
    return model


def tdigest(
    *, inputs: Sequence[str], output: str, batch_size: int = 10_000, num_workers: int = 0,
    devices: int | str = 1, accelerator: str = "auto", num_nodes: int = 1, seed: int = 0,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> TDigest:
    """Per-gene median and quartiles of the non-zero counts."""
    collection = open_shards(inputs, **(data_options or DataOptions()).open_kwargs())
    model = TDigest(collection.var_names_g)
    trainer = fit_statistics(model, collection, batch_size=batch_size, num_workers=num_workers, seed=seed,
                             devices=devices, accelerator=accelerator, num_nodes=num_nodes)
    if trainer.global_rank == 0:
        write_tdigest_tables(model.summary_df(), output, _meta(provenance))
    return model


def _check_hvg_options(collection: ShardCollection, *, n_top_genes: int | Sequence[int], span: float,
                       batch_n_cell_minimum: int, n_batch_minimum: int, batch_key: str | None) -> list[int]:
    n_top_genes = list(n_top_genes) if isinstance(n_top_genes, (list, tuple)) else [n_top_genes]
    n_top_genes = [int(n) for n in n_top_genes]
    for n in n_top_genes:
        if n < 1:
            raise ConfigError(f"--n-top-genes: must be positive, got {n}")
        if n > collection.n_vars:
            raise InputError(
                f"--n-top-genes {n} is larger than the number of genes ({collection.n_vars}) in "
                f"{collection.shards[0].path}"
            )
    if not span > 0:
        raise ConfigError(f"--span: must be positive, got {span}")
    if batch_n_cell_minimum < 2:
        raise ConfigError(
            f"--batch-n-cell-minimum: must be at least 2 (a variance needs two cells), got {batch_n_cell_minimum}"
        )
    n_batch = collection.n_batch if batch_key else 1
    if not 1 <= n_batch_minimum <= n_batch:
        raise ConfigError(f"--n-batch-minimum: must be between 1 and the number of batches ({n_batch}), "
                          f"got {n_batch_minimum}")
    return n_top_genes


def hvg(
    *, inputs: Sequence[str], output: str, batch_key: str | None = None, n_top_genes: int | Sequence[int] = 2000,
    flavor: str = "seurat_v3", span: float = 0.3, batch_n_cell_minimum: int = 2, n_batch_minimum: int = 1,
    mean_var: str | None = None, batch_size: int = 10_000, num_workers: int = 0, devices: int | str = 1,
    accelerator: str = "auto", num_nodes: int = 1, seed: int = 0, data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> HVGSeuratV3:
    """Seurat v3 highly variable genes as scanpy's; ``mean_var`` (the mean-var step's CSV on the same
    shards and batch key) saves the first pass. One table per ``n_top_genes``."""
    collection = open_shards(inputs, batch_key=batch_key, **(data_options or DataOptions()).open_kwargs())
    n_top_genes = _check_hvg_options(collection, n_top_genes=n_top_genes, span=span, batch_key=batch_key,
                                     batch_n_cell_minimum=batch_n_cell_minimum, n_batch_minimum=n_batch_minimum)
    use_batch_key = batch_key is not None
    model = HVGSeuratV3(
        collection.var_names_g, n_top_genes=n_top_genes, n_batch=collection.n_batch, flavor=flavor,
        use_batch_key=use_batch_key, span=span, output_path=output, batch_n_cell_minimum=batch_n_cell_minimum,
        n_batch_minimum=n_batch_minimum, batch_names=list(collection.batch_categories) if use_batch_key else None,
    )
    source = f"--mean-var {mean_var}: " if mean_var else ""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HVGWarning)
            if mean_var:
                model.set_batch_statistics(*read_mean_var_statistics(mean_var, collection, batch_key))
            trainer = fit_statistics(
                model, collection, batch_size=batch_size, num_workers=num_workers, seed=seed,
                devices=devices, accelerator=accelerator, num_nodes=num_nodes, max_epochs=model.n_epochs_needed,
            )
    except (NoBatchLeftError, BatchStatisticsMismatchError) as e:
        raise InputError(f"{source}{e}") from None
    finally:
        # Outside the recording context: replaying inside it would record each warning again, forever.
        _replay_warnings(caught)
    if trainer.global_rank == 0:
        meta = dict(provenance or {})
        meta["batches"] = {"excluded": model.excluded_batches, "loess_fallbacks": model.loess_fallbacks,
                           "mean_var_statistics": mean_var}
        write_hvg_tables(model.hvg_dfs, n_top_genes, output, meta)
    return model


def _replay_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The model's warnings as log lines (one line each); anything else as Python shows it."""
    for w in caught:
        if issubclass(w.category, HVGWarning):
            logger.warning("%s", w.message)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
