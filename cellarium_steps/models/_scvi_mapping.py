"""Reference mapping for scVI: scArches' architectural surgery on a trained model (a "reference").

The query model is the reference's architecture with more batches: the reference's batches keep
their codes (0 .. n_reference_batch - 1) and the query's new ones follow. :func:`transfer_reference_weights`
copies every reference weight into it and gives each new batch its own parameters;
:func:`freeze_reference` then lets training move only those, as scvi-tools' ``load_query_data`` does
with its defaults (``freeze_expression``, ``freeze_decoder_first_layer``, ``freeze_batchnorm_encoder``
on; ``freeze_batchnorm_decoder``, ``freeze_dropout`` off):

* one-hot batches: the new batches' columns of every layer that reads the batch (``batch_weight`` of
  ``LinearWithBatch`` layers, the decoder's additive background's weight), initialised as a new
  model initialises them;
* embedded batches (``batch_embedded``): the new batches' rows of the embedding (and of its log
  scale when sampled), starting at the mean of the reference's rows; every layer's weights, which
  all batches share, stay frozen;
* ``dispersion="gene-batch"``: the new batches' columns of ``px_r``, starting at the reference's mean;
* the decoder's batch norm affine weights (and its running statistics keep updating); the encoder's
  batch norm keeps its running statistics (momentum 0) and affine weights.

Everything else (the counts' weights, biases, the latent heads, categorical covariates' columns, the
flow prior) is frozen: ``requires_grad`` off, or a gradient hook that zeroes the frozen entries of a
tensor that is only partly new. With no weight decay, Adam leaves entries whose gradient is always
zero exactly where they were, so the reference's cells keep their latent means bit for bit (unlike
scvi-tools, whose hooks still let a non-zero weight decay move frozen entries; its reference-mapping
tutorial trains the query with ``weight_decay=0``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cellarium_steps.models._scvi_layers import LinearWithBatch
from cellarium_steps.models.scvi import SingleCellVariationalInference

__all__ = ["freeze_reference", "query_model_arguments", "transfer_reference_weights"]


def query_model_arguments(reference_args: dict[str, Any], n_batch: int) -> dict[str, Any]:
    """The query model's constructor arguments: the reference's, with ``n_batch`` batches in all.

    An embedded reference keeps its embedding width (``n_latent_batch``), which defaults to its
    number of batches.
    """
    n_reference_batch = int(reference_args.get("n_batch", 0))
    if n_reference_batch < 1:
        raise ValueError("the reference has no batches (n_batch=0); mapping adds the query's batches to its own")
    if n_batch <= n_reference_batch:
        raise ValueError(f"the query model needs more batches than the reference's {n_reference_batch}, got {n_batch}")
    args = dict(reference_args)
    args["n_batch"] = int(n_batch)
    if args.get("batch_embedded"):
        width = args.get("n_latent_batch")
        args["n_latent_batch"] = int(width if width is not None else n_reference_batch)
    return args


def _one_hot_columns(model: SingleCellVariationalInference) -> int:
    """Width of the one-hot batch block the layers read (0: no block, as with a single batch)."""
    return 0 if model.batch_embedded else model.n_batch_features


@torch.no_grad()
def transfer_reference_weights(reference: SingleCellVariationalInference, query: SingleCellVariationalInference) -> None:
    """Copy the reference's weights into ``query`` (built by :func:`query_model_arguments`); the new
    batches' parameters keep ``query``'s initial values, except where the module docstring says."""
    n_ref = reference.n_batch
    if query.n_batch <= n_ref or query.n_genes != reference.n_genes or query.batch_embedded != reference.batch_embedded:
        raise ValueError("the query model must be the reference's architecture with more batches")
    reference_state = reference.state_dict()
    query_state = query.state_dict()
    n_ref_columns = _one_hot_columns(reference)  # 0 when the reference had one batch: it had no column
    n_columns = _one_hot_columns(query)
    for name, target in query_state.items():
        source = reference_state.get(name)
        leaf = name.rsplit(".", 1)[-1]
        if source is not None and source.shape == target.shape:
            target.copy_(source)
        elif leaf == "batch_weight" and n_columns:
            # The reference's batches keep their columns; its one batch, which had none, reads zeros.
            target[:, :n_ref] = source if source is not None else 0.0
        elif name == "decoder.additive_bias_layer.weight" and source is not None:
            # [batch block | categorical block]; a reference with neither read one zero column.
            n_categorical = reference.n_categorical_features
            target[:, :n_ref] = source[:, :n_ref_columns] if n_ref_columns else 0.0
            if n_categorical:
                target[:, n_columns:].copy_(source[:, n_ref_columns:n_ref_columns + n_categorical])
        elif name == "px_r" and source is not None:  # gene-batch dispersion: (genes, batches)
            target[:, :n_ref].copy_(source[:, :n_ref])
            target[:, n_ref:] = source[:, :n_ref].mean(dim=1, keepdim=True)
        elif name in ("batch_mean_bd", "batch_log_scale_bd") and source is not None:
            target[:n_ref].copy_(source)
            target[n_ref:] = source.mean(dim=0, keepdim=True) if name == "batch_mean_bd" else 0.0
        else:
            shape = None if source is None else tuple(source.shape)
            raise ValueError(f"reference mapping: no rule for {name} (reference {shape}, query {tuple(target.shape)})")
    unexpected = set(reference_state) - set(query_state)
    if unexpected:
        raise ValueError(f"reference mapping: the query model lacks {sorted(unexpected)}")
    query.load_state_dict(query_state)


def _keep_only(dim: int, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes every entry outside ``[start, stop)`` along ``dim``."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros_like(grad)
        kept.narrow(dim, start, stop - start).copy_(grad.narrow(dim, start, stop - start))
        return kept

    return hook


def trainable_slices(query: SingleCellVariationalInference, n_reference_batch: int) -> dict[str, tuple[int, int, int]]:
    """The new batches' entries of each partly new parameter: name -> (dim, start, stop)."""
    n_batch = query.n_batch
    slices: dict[str, tuple[int, int, int]] = {}
    if query.batch_embedded:
        for name in ("batch_mean_bd", "batch_log_scale_bd"):
            if getattr(query, name) is not None:
                slices[name] = (0, n_reference_batch, n_batch)
    else:
        for module_name, module in query.named_modules():
            if isinstance(module, LinearWithBatch) and module.batch_weight is not None:
                slices[f"{module_name}.batch_weight"] = (1, n_reference_batch, n_batch)
        if query.decoder.additive_bias_layer is not None:
            slices["decoder.additive_bias_layer.weight"] = (1, n_reference_batch, n_batch)
    if query.px_r is not None and query.dispersion == "gene-batch":
        slices["px_r"] = (1, n_reference_batch, n_batch)
    return slices


def freeze_reference(
    query: SingleCellVariationalInference,
    n_reference_batch: int,
    *,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
) -> list[RemovableHandle]:
    """Let training move only the new batches' parameters (and the decoder's batch norm, as scvi-tools);
    returns the gradient hooks' handles. Not saved with the weights: apply it to every model built
    for training, also one resumed from a checkpoint."""
    if not 1 <= n_reference_batch < query.n_batch:
        raise ValueError(f"n_reference_batch must be in [1, {query.n_batch}), got {n_reference_batch}")
    slices = trainable_slices(query, n_reference_batch)
    handles = []
    for name, parameter in query.named_parameters():
        parameter.requires_grad_(name in slices)
        if name in slices:
            handles.append(parameter.register_hook(_keep_only(*slices[name])))
    for side, freeze in (("z_encoder", freeze_batchnorm_encoder), ("decoder", freeze_batchnorm_decoder)):
        for module in getattr(query, side).modules():
            if isinstance(module, nn.BatchNorm1d):
                if freeze:
                    module.momentum = 0.0  # running statistics stay the reference's
                for parameter in module.parameters():
                    parameter.requires_grad_(not freeze)
    return handles
