"""Transformer models trained by self-supervision on streamed counts: Geneformer (masked rank-value
tokens) and CellariumGPT (a prompt of genes predicts the counts of others). Both resume from their
epoch checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from cellarium_steps.data import ShardDataModule
from cellarium_steps.data.errors import ConfigError
from cellarium_steps.data.options import DataOptions, recorded_source
from cellarium_steps.models.cellarium_gpt import CellariumGPT
from cellarium_steps.models.geneformer import Geneformer
from cellarium_steps.outputs.genes import selected_genes
from cellarium_steps.outputs.statistics import read_norm_factor
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import spec
from cellarium_steps.runner.training import fit_and_publish, resumable_trainer
from cellarium_steps.transforms.filter import Filter
from cellarium_steps.transforms.gpt_tokenizer import GPTTokenizer

logger = logging.getLogger("cellarium_steps")

def _require_checkpoint_path(output: str) -> None:
    if not str(output).endswith(".ckpt"):
        raise ConfigError(f"--output: the checkpoint path must end in .ckpt, got {output!r}")


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")


def _open(inputs: Sequence[str], genes: str | None, data_options: DataOptions | None,
          **datamodule_kwargs: Any) -> tuple[ShardDataModule, list[str] | None, np.ndarray]:
    datamodule = ShardDataModule(inputs, shuffle=True, **datamodule_kwargs,
                                 **(data_options or DataOptions()).open_kwargs())
    collection = datamodule.collection
    gene_list = selected_genes(genes, collection.var_names_g, collection.shards[0].path)
    return datamodule, gene_list, np.asarray(gene_list if gene_list is not None else collection.var_names_g)


def train_geneformer(
    *,
    inputs: Sequence[str],
    output: str,
    tdigest: str | None = None,
    genes: str | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    mlm_probability: float = 0.15,
    max_epochs: int = 1,
    max_steps: int | None = None,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    num_workers: int = 0,
    devices: int | str = 1,
    accelerator: str = "auto",
    num_nodes: int = 1,
    seed: int = 0,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> CellariumModule:
    """Geneformer by masked language modelling; ``tdigest``'s per-gene medians divide the normalised
    counts before ranking."""
    size = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings}
    _positive(max_epochs=max_epochs, max_steps=max_steps, **size)
    if hidden_size % num_attention_heads:
        raise ConfigError(
            f"--hidden-size ({hidden_size}) must be a multiple of --num-attention-heads ({num_attention_heads})"
        )
    if not 0 < mlm_probability < 1:
        raise ConfigError(f"--mlm-probability: must be between 0 and 1, got {mlm_probability}")
    if not learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {learning_rate}")
    _require_checkpoint_path(output)
    datamodule, gene_list, var_names_g = _open(inputs, genes, data_options, batch_size=batch_size, num_workers=num_workers,
                                               seed=seed)
    collection = datamodule.collection
    factor_g = read_norm_factor(tdigest, var_names_g) if tdigest else None

    trainer, resume_from = resumable_trainer(output=output, devices=devices, accelerator=accelerator,
                                             num_nodes=num_nodes, max_epochs=max_epochs, max_steps=max_steps)
    datamodule.dataset.set_distributed(0, trainer.world_size)
    logger.info(
        "%d cells, %d genes; %d steps per epoch per device, up to %d genes per cell",
        collection.n_obs, len(var_names_g), len(datamodule.dataset), max_position_embeddings,
    )
    pl.seed_everything(seed, workers=True, verbose=False)
    provenance = provenance or {}
    recipe = {
        "model": spec(Geneformer, var_names_g=var_names_g, mlm_probability=mlm_probability, **size),
        "transforms": [spec(Filter, filter_list=gene_list)] if gene_list is not None else [],
        # No per-cell "prediction": Geneformer's outputs are per token (hidden states, attentions).
        "data": {"input_var_names_g": collection.var_names_g, "source": recorded_source(collection),
                 "norm_factor_source": tdigest},
        "provenance": provenance,
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": learning_rate}, seed=seed)
    if factor_g is not None:
        # A buffer, so the factor travels in the checkpoint's weights.
        module.model.set_norm_factor(factor_g)
    fit_and_publish(trainer, module, datamodule, resume_from, output, provenance)
    return module


def train_gpt(
    *,
    inputs: Sequence[str],
    output: str,
    genes: str | None = None,
    batch_key: str | None = None,
    max_epochs: int = 10,
    max_steps: int | None = None,
    learning_rate: float = 1e-3,
    context_len: int = 128,
    gene_value_vocab: int = 128,
    d_model: int = 64,
    d_ffn: int | None = None,
    n_heads: int = 2,
    n_blocks: int = 2,
    dropout: float = 0.0,
    attention_backend: str = "torch",
    batch_size: int = 128,
    num_workers: int = 0,
    devices: int | str = 1,
    accelerator: str = "auto",
    num_nodes: int = 1,
    seed: int = 0,
    data_options: DataOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> CellariumModule:
    """CellariumGPT: each cell's ``context_len`` random genes, a prompt of them predicting the others' counts."""
    _positive(max_epochs=max_epochs, context_len=context_len, d_model=d_model, n_heads=n_heads,
              n_blocks=n_blocks, max_steps=max_steps, d_ffn=d_ffn)
    if gene_value_vocab < 2:
        raise ConfigError(f"--gene-value-vocab: must be at least 2, got {gene_value_vocab}")
    if d_model % n_heads:
        raise ConfigError(f"--d-model {d_model} must be a multiple of --n-heads {n_heads}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout: must be in [0, 1), got {dropout}")
    if not learning_rate > 0:
        raise ConfigError(f"--learning-rate: must be positive, got {learning_rate}")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and attention_backend in ("mem_efficient", "flex"):
        # mem_efficient has CUDA kernels only; flex attention has no backward pass on CPU.
        raise ConfigError(f"--attention-backend {attention_backend} cannot train on CPU: use torch or math")
    if attention_backend == "flex" and dropout > 0:
        raise ConfigError("--attention-backend flex does not support --dropout > 0")
    _require_checkpoint_path(output)
    datamodule, gene_list, var_names_g = _open(inputs, genes, data_options, batch_size=batch_size, batch_key=batch_key,
                                               num_workers=num_workers, seed=seed)
    collection = datamodule.collection
    if context_len > len(var_names_g):
        raise ConfigError(f"--context-len {context_len} is larger than the {len(var_names_g)} genes modelled")

    trainer, resume_from = resumable_trainer(output=output, devices=devices, accelerator=accelerator,
                                             num_nodes=num_nodes, max_epochs=max_epochs, max_steps=max_steps)
    datamodule.dataset.set_distributed(0, trainer.world_size)
    logger.info(
        "%d cells, %d genes; context %d genes; %d steps per epoch per device",
        collection.n_obs, len(var_names_g), context_len, len(datamodule.dataset),
    )
    pl.seed_everything(seed, workers=True, verbose=False)
    provenance = provenance or {}
    transforms = [spec(Filter, filter_list=gene_list)] if gene_list is not None else []
    transforms.append(spec(GPTTokenizer, var_names_g=var_names_g, context_len=context_len,
                           gene_value_vocab_size=gene_value_vocab, prompt_fraction=None))
    recipe = {
        "model": spec(
            CellariumGPT,
            categorical_token_size_dict={"gene_id": len(var_names_g), "gene_value": gene_value_vocab},
            d_model=d_model, d_ffn=d_ffn or 2 * d_model, n_heads=n_heads,
            n_blocks=n_blocks, dropout_p=dropout, use_bias=True, attention_backend=attention_backend,
            attention_softmax_fp32=True, loss_scale_dict={"gene_value": 1.0},
        ),
        "transforms": transforms,
        "data": {"input_var_names_g": collection.var_names_g, "source": recorded_source(collection),
                 "batch_key": collection.batch_key},
        "provenance": provenance,
    }
    module = CellariumModule.from_recipe(recipe, optim_kwargs={"lr": learning_rate}, seed=seed)
    fit_and_publish(trainer, module, datamodule, resume_from, output, provenance)
    return module
