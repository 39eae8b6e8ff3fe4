"""scVI trained on raw counts streamed from the shards: the defaults users get (scvi-tools' model and
optimizer, a KL warm-up that ends on large data; the architecture in :mod:`.scvi_model`), the held-out
split and its validation, the recipe; and a reference mapping (:mod:`.mapping`) trained the same way."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.dataset import ShardedCellDataset, collate_identity
from cellarium_steps.data.errors import ConfigError
from cellarium_steps.data.labels import require_labels, scan_labels
from cellarium_steps.data.options import DataOptions, recorded_covariates, recorded_source
from cellarium_steps.data.shards import open_shards
from cellarium_steps.models.scvi import SingleCellVariationalInference
from cellarium_steps.ontology import compute_cl_distance_matrix, is_unlabelled, ontology_version
from cellarium_steps.outputs.genes import selected_genes
from cellarium_steps.pipelines.mapping import (
    Query,
    Reference,
    load_reference,
    open_query,
    prepare_query_module,
    reference_entry,
    refuse_architecture_options,
)
from cellarium_steps.pipelines.query_data import DEFAULT_MAX_MISSING_GENES_FRACTION, check_missing_genes_options
from cellarium_steps.pipelines.scvi_model import (
    model_arguments,
    query_model_spec,
    read_model_config,
    scvi_model_spec,
    warmup_is_set,
)
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint, spec
from cellarium_steps.runner.training import fit_and_publish, resumable_trainer
from cellarium_steps.transforms._sparse import select_rows
from cellarium_steps.transforms.filter import Filter

logger = logging.getLogger("cellarium_steps")

#: the default KL warm-up: a quarter of the run's steps, at most this many.
MAX_DEFAULT_KL_WARMUP_STEPS = 5000


def optimizer_kwargs(learning_rate: float, weight_decay: float = 1e-6) -> dict[str, Any]:
    """scvi-tools' training plan's Adam (eps 0.01, weight decay 1e-6), as one fused kernel per step. A reference
    mapping trains without weight decay (as scvi-tools' reference-mapping tutorial), so that entries kept
    frozen by their gradient hooks never move."""
    return {"lr": learning_rate, "eps": 0.01, "weight_decay": weight_decay, "fused": True}


def default_kl_warmup_steps(max_epochs: int, steps_per_epoch: int) -> int:
    return max(1, min(MAX_DEFAULT_KL_WARMUP_STEPS, (max_epochs * steps_per_epoch) // 4))


def check_options(*, output: str, max_epochs: int, learning_rate: float, kl_warmup_steps: int | None,
                  val_fraction: float, cell_type_key: str | None, val_reservoir_size: int,
                  architecture: dict[str, Any]) -> None:
    for name in ("max_epochs", "n_latent", "n_hidden", "n_layers"):
        value = max_epochs if name == "max_epochs" else architecture.get(name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    dropout_rate = architecture.get("dropout_rate")
    if dropout_rate is not None and not 0.0 <= dropout_rate < 1.0:
        raise ConfigError(f"--dropout-rate: must be in [0, 1), got {dropout_rate}")
    if not learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {learning_rate}")
    if kl_warmup_steps is not None and kl_warmup_steps < 0:
        raise ConfigError(f"--kl-warmup-steps: must be 0 or more, got {kl_warmup_steps}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction: must be in [0, 1), got {val_fraction}")
    if cell_type_key and val_fraction <= 0:
        raise ConfigError("--cell-type-key: the cell type metrics are computed on held-out cells; give --val-fraction")
    if val_reservoir_size < 1:
        raise ConfigError(f"--val-reservoir-size: must be at least 1, got {val_reservoir_size}")
    if not str(output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {output!r}")


# -- validation: held-out cells, their loader, the module that routes them ---------------------------------


class HeldOutCells:
    """Cells held out of training: those whose obs name hashes (SipHash, keyed by the seed) below ``fraction``.

    A function of the name and seed alone, so the split is the same in every epoch, after a resume, and
    on any number of devices or loader workers, and needs no pass over the data to set up.
    """

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction = float(fraction)
        self.hash_key = f"{seed % 10**16:016d}"

    def mask(self, obs_names_n: np.ndarray) -> np.ndarray:
        """True for held-out (validation) cells."""
        names = np.asarray(obs_names_n, dtype=object).astype(str).astype(object)
        hashes = pd.util.hash_array(names, hash_key=self.hash_key, categorize=False)
        return hashes.astype(np.float64) / 2.0**64 < self.fraction


def select_cells(batch: dict[str, Any], keep_n: np.ndarray) -> dict[str, Any]:
    """The batch restricted to the cells where ``keep_n`` is True, on the batch's device (CSR stays CSR)."""
    if keep_n.all():
        return batch
    x_ng = batch["x_ng"]
    index_n = torch.from_numpy(np.flatnonzero(keep_n)).to(x_ng.device)
    if x_ng.layout == torch.sparse_csr:
        x_ng = select_rows(x_ng, index_n)
    else:
        x_ng = x_ng[index_n]
    out = {**batch, "x_ng": x_ng}
    for key, value in batch.items():
        if key != "x_ng" and key.rpartition("_")[2].startswith("n"):  # a per-cell key: _n, _nd, _nc
            out[key] = value[index_n.to(value.device)] if isinstance(value, torch.Tensor) else value[index_n.cpu().numpy()]
    return out


class ScviDataModule(ShardDataModule):
    """The training shards, plus a validation loader over the same shards (in order; the module keeps held-out cells)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_dataset = ShardedCellDataset(
            self.collection, batch_size=self.dataset.batch_size, shuffle=False, seed=self.dataset.seed,
            require_counts=self.dataset.require_counts, with_totals=self.dataset.with_totals,
        )

    def select_genes(self, genes: Sequence[str]) -> None:
        super().select_genes(genes)
        self.val_dataset.select_genes(genes)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.trainer is not None:
            self.val_dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=None, num_workers=self.num_workers,
                          collate_fn=collate_identity, prefetch_factor=2 if self.num_workers else None)


class ScviTrainingModule(CellariumModule):
    """CellariumModule that trains on the cells not held out and validates on the held-out ones.

    Validation batches get ``validation_cell_type_index_n`` (index into ``cell_type_categories``, -1 when
    unlabelled) from the ``<cell_type_key>_n`` column. Only training uses this class: the checkpoint's
    recipe rebuilds a plain CellariumModule.
    """

    def __init__(self, model: torch.nn.Module, transforms: Sequence[torch.nn.Module] = (), *,
                 held_out: HeldOutCells | None = None, cell_type_key: str | None = None,
                 cell_type_categories: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(model, transforms=transforms, **kwargs)
        self.held_out = held_out
        self.cell_type_key = cell_type_key
        self._code = {str(c): i for i, c in enumerate(cell_type_categories)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.held_out is not None:
            batch = select_cells(batch, ~self.held_out.mask(batch["obs_names_n"]))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.held_out is not None:
            batch = select_cells(batch, self.held_out.mask(batch["obs_names_n"]))
        if batch["x_ng"].shape[0] == 0:
            return
        if self.cell_type_key is not None:
            values_n = batch[f"{self.cell_type_key}_n"]
            codes = [-1 if is_unlabelled(v) else self._code.get(str(v), -1) for v in values_n]
            batch = {**batch, "validation_cell_type_index_n": torch.tensor(codes, dtype=torch.long)}
        super().validation_step(batch, batch_idx)


def train_scvi(
    *,
    inputs: Sequence[str],
    output: str,
    genes: str | None = None,
    batch_key: str | None = None,
    categorical_covariate_keys: str | Sequence[str] | None = None,
    continuous_covariate_keys: str | Sequence[str] | None = None,
    max_epochs: int = 20,
    n_latent: int | None = None,
    n_hidden: int | None = None,
    n_layers: int | None = None,
    encode_covariates: bool | None = None,
    use_layer_norm: str | None = None,
    use_batch_norm: str | None = None,
    dropout_rate: float | None = None,
    dispersion: str | None = None,
    gene_likelihood: str | None = None,
    use_flow: bool | None = None,
    batch_embedded: bool | None = None,
    model_config: str | Mapping[str, Any] | None = None,
    reference: str | None = None,
    missing_genes: str = "error",
    max_missing_genes_fraction: float = DEFAULT_MAX_MISSING_GENES_FRACTION,
    learning_rate: float = 1e-3,
    kl_warmup_steps: int | None = None,
    val_fraction: float = 0.0,
    cell_type_key: str | None = None,
    val_reservoir_size: int = 50_000,
    batch_size: int = 1024,
    num_workers: int = 0,
    devices: int | str = 1,
    accelerator: str = "auto",
    num_nodes: int = 1,
    seed: int = 0,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> CellariumModule:
    """Train scVI (resuming from ``<output>.d/last.ckpt`` if an interrupted run left one) and publish the
    checkpoint at ``output`` with its per-epoch metrics and provenance.

    The architecture options left None are scvi-tools' defaults (:data:`ARCHITECTURE_DEFAULTS`), or
    ``model_config``'s (a YAML path or a dict of the constructor's arguments). With ``reference`` (a
    train-scvi checkpoint) the model is instead the reference's, mapped onto the query ``inputs``
    (:mod:`cellarium_steps.pipelines.mapping`): read with the reference's covariates, counts matrix and gene
    names (unless ``data_options`` say otherwise), its new batches and covariate categories added; the
    reference's genes it lacks are read as zeros when ``missing_genes="zero"``.
    """
    architecture = {"n_latent": n_latent, "n_hidden": n_hidden, "n_layers": n_layers,
                    "encode_covariates": encode_covariates, "use_layer_norm": use_layer_norm,
                    "use_batch_norm": use_batch_norm, "dropout_rate": dropout_rate, "dispersion": dispersion,
                    "gene_likelihood": gene_likelihood, "use_flow": use_flow, "batch_embedded": batch_embedded}
    check_options(output=output, max_epochs=max_epochs, learning_rate=learning_rate, kl_warmup_steps=kl_warmup_steps,
                  val_fraction=val_fraction, cell_type_key=cell_type_key, val_reservoir_size=val_reservoir_size,
                  architecture=architecture)
    check_missing_genes_options(missing_genes, max_missing_genes_fraction)
    validating = val_fraction > 0
    obs_columns = (cell_type_key,) if cell_type_key else ()
    mapped: Reference | None = None
    query: Query | None = None
    arguments: dict[str, Any] = {}
    if reference:
        refuse_architecture_options({**architecture, "genes": genes, "model_config": model_config,
                                     "categorical_covariate_keys": categorical_covariate_keys,
                                     "continuous_covariate_keys": continuous_covariate_keys})
        mapped = load_reference(reference)
        query = open_query(mapped, inputs, batch_key=batch_key, obs_columns=obs_columns, missing_genes=missing_genes,
                           max_missing_genes_fraction=max_missing_genes_fraction, data_options=data_options)
        batch_key, collection = query.batch_key, query.collection
        gene_list: list[str] | None = mapped.genes
        read_genes = [g for g in mapped.genes if g not in set(query.missing_genes)]
    else:
        config = read_model_config(model_config) if isinstance(model_config, str) else model_config
        arguments = model_arguments(architecture, config, str(model_config or ""))
        if kl_warmup_steps is not None and warmup_is_set(arguments):
            raise ConfigError(f"--kl-warmup-steps: --model-config {model_config} sets the KL warm-up")
        collection = open_shards(
            inputs, batch_key=batch_key, obs_columns=obs_columns, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys, **(data_options or DataOptions()).open_kwargs(),
        )
        gene_list = selected_genes(genes, collection.var_names_g, collection.shards[0].path)
        read_genes = gene_list
    datamodule = (ScviDataModule if validating else ShardDataModule)(
        inputs, batch_size=batch_size, num_workers=num_workers, shuffle=True, seed=seed, collection=collection,
        # The model's library size is the observed one (no use_size_factor_key), and only the
        # held-out split names cells: neither column is read otherwise.
        with_totals=False, with_obs_names=validating,
    )
    cell_types: list[str] = []
    if cell_type_key:
        summary = scan_labels(collection, cell_type_key)
        require_labels(summary, inputs)
        cell_types = summary.labels
    var_names_g = np.asarray(gene_list if gene_list is not None else collection.var_names_g)
    if read_genes is not None:
        datamodule.select_genes(read_genes)
    n_batch = collection.n_batch if batch_key else 1

    trainer, resume_from = resumable_trainer(output=output, devices=devices, accelerator=accelerator,
                                             num_nodes=num_nodes, max_epochs=max_epochs, metrics=True)
    datamodule.dataset.set_distributed(0, trainer.world_size)
    steps_per_epoch = len(datamodule.dataset)
    if kl_warmup_steps is None and resume_from:
        # A resumed run keeps the interrupted run's schedule, even if max_epochs changed.
        kl_warmup_steps = load_checkpoint(resume_from)[RECIPE_KEY]["model"]["init_args"]["kl_warmup_steps"]
    if kl_warmup_steps is None and not warmup_is_set(arguments):
        kl_warmup_steps = default_kl_warmup_steps(max_epochs, steps_per_epoch)
    if mapped is not None:
        assert kl_warmup_steps is not None
        model_spec = query_model_spec(mapped.recipe["model"], n_batch=n_batch, kl_warmup_steps=kl_warmup_steps,
                                      n_cats_per_cov=[len(c) for c in collection.covariate_categories])
    else:
        model_spec = scvi_model_spec(var_names_g, n_batch=n_batch, kl_warmup_steps=kl_warmup_steps,
                                     arguments=arguments, n_cats_per_cov=[len(c) for c in collection.covariate_categories],
                                     n_continuous_cov=len(collection.continuous_covariate_keys))
    n_latent = int(model_spec["init_args"]["n_latent"])
    logger.info(
        "%d cells, %d genes, %d batches%s; %d steps per epoch per device, KL warm-up over %s steps",
        collection.n_obs, len(var_names_g), n_batch,
        f" ({n_batch - mapped.model.n_batch} new, mapped onto {reference})" if mapped is not None else "",
        steps_per_epoch, model_spec["init_args"]["kl_warmup_steps"],
    )

    pl.seed_everything(seed, workers=True, verbose=False)
    provenance = provenance or {}
    data: dict[str, Any] = {
        "input_var_names_g": collection.var_names_g,
        "source": recorded_source(collection),
        "batch_key": collection.batch_key,
        "batch_categories": collection.batch_categories,
        "covariates": recorded_covariates(collection),
        "prediction": {"key": "x_ng", "column": "scvi_latent", "dim": n_latent},
        "validation": {"val_fraction": val_fraction, "cell_type_key": cell_type_key,
                       "cell_types": cell_types, "ontology": ontology_version() if cell_types else None},
    }
    if mapped is not None and query is not None:
        data["reference"] = reference_entry(mapped, query)
    recipe = {
        "model": model_spec,
        "transforms": [spec(Filter, filter_list=gene_list)] if gene_list is not None else [],
        "data": data,
        "provenance": provenance,
    }
    module_kwargs: dict[str, Any] = {
        "optim_kwargs": optimizer_kwargs(learning_rate, weight_decay=0.0 if mapped is not None else 1e-6),
        "seed": seed,
    }
    if not validating:
        module = CellariumModule.from_recipe(recipe, **module_kwargs)
    else:
        # The validation metrics' settings stay out of the recipe: prediction needs none of them.
        model_args = dict(recipe["model"]["init_args"])
        if cell_types:
            model_args.update(
                cell_type_categories=cell_types, ontology_distance_matrix=compute_cl_distance_matrix(cell_types),
                val_cell_type_classifier_reservoir_size=val_reservoir_size,
            )
        module = ScviTrainingModule(
            SingleCellVariationalInference(**model_args),
            [Filter(filter_list=gene_list)] if gene_list is not None else [],
            held_out=HeldOutCells(val_fraction, seed), cell_type_key=cell_type_key,
            cell_type_categories=cell_types, recipe=recipe, **module_kwargs,
        )
    if mapped is not None and query is not None:
        prepare_query_module(module, mapped, query, fresh=not resume_from)
    fit_and_publish(trainer, module, datamodule, resume_from, output, provenance)
    return module
