"""Reference mapping for scVI: scArches' architectural surgery on a trained model (a "reference").

The query model is the reference's architecture with more batches (and categorical covariates with
more categories): the reference's batches and categories keep their codes (0 .. n - 1) and the query's
new ones follow. :func:`transfer_reference_weights` copies every reference weight into it and gives each
new batch or category its own parameters; :func:`freeze_reference` then lets training move only those,
as scvi-tools' ``load_query_data`` does with its defaults (``freeze_expression``,
``freeze_decoder_first_layer``, ``freeze_batchnorm_encoder`` on; ``freeze_batchnorm_decoder``,
``freeze_dropout`` off):

* one-hot batches and categorical covariates: the new categories' columns of every layer that reads
  them (``batch_weight`` and ``categorical_weight`` of ``LinearWithBatch`` layers, the decoder's
  additive background's weight), initialised as a new model initialises them; a variable the
  reference saw with one category had no column (scvi-tools ignores it), so that category's column
  is zero and stays zero;
* embedded batches (``batch_embedded``): the new batches' rows of the embedding (and of its log
  scale when sampled), starting at the mean of the reference's rows; every layer's weights, which
  all batches share, stay frozen;
* ``dispersion="gene-batch"``: the new batches' columns of ``px_r``, starting at the reference's mean;
* the decoder's batch norm affine weights; the encoder's batch norm keeps its affine weights.

Every dropout and batch norm layer runs as at prediction time while the query trains: no dropout, and
batch norm on the reference's running statistics, which stay as they are. scvi-tools' ``load_query_data``
puts its module in evaluation mode and its training keeps it there (Lightning 2 preserves submodules'
modes), so this is what ``load_query_data`` + ``train`` computes. It also matters: in training mode,
batch norm would normalise away the new batch's one-hot column (constant within a one-batch query), and
the new columns of a batch-normed layer could not learn the query's shift.

Everything else (the counts' and continuous covariates' weights, biases, the latent heads, the columns
of the reference's categories, the flow prior) is frozen: ``requires_grad`` off, or a gradient hook that zeroes the frozen entries of a
tensor that is only partly new. With no weight decay, Adam leaves entries whose gradient is always
zero exactly where they were, so the reference's cells keep their latent means bit for bit (unlike
scvi-tools, whose hooks still let a non-zero weight decay move frozen entries; its reference-mapping
tutorial trains the query with ``weight_decay=0``). Unlike scvi-tools, the columns of categorical
covariates' *reference* categories stay frozen too (scvi-tools trains every categorical column of a
layer, so query cells of a known category would change what reference cells of it map to).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cellarium_steps.models._scvi_layers import LinearWithBatch
from cellarium_steps.models.scvi import SingleCellVariationalInference

__all__ = ["freeze_reference", "query_model_arguments", "trainable_slices", "transfer_reference_weights"]

#: a block's columns copied from the reference (query start, reference start, width), zeroed, and new (start, stop)
BlockPlan = tuple[list[tuple[int, int, int]], list[int], list[tuple[int, int]]]


def query_model_arguments(reference_args: dict[str, Any], n_batch: int,
                          n_cats_per_cov: Sequence[int] | None = None) -> dict[str, Any]:
    """The query model's constructor arguments: the reference's, with ``n_batch`` batches in all and
    ``n_cats_per_cov`` categories per categorical covariate (default: the reference's), at least the
    reference's of each and more of some. An embedded reference keeps its embedding width
    (``n_latent_batch``), which defaults to its number of batches."""
    n_reference_batch = int(reference_args.get("n_batch", 0))
    reference_cats = [int(n) for n in reference_args.get("n_cats_per_cov") or []]
    query_cats = reference_cats if n_cats_per_cov is None else [int(n) for n in n_cats_per_cov]
    if n_reference_batch < 1:
        raise ValueError("the reference has no batches (n_batch=0); mapping adds the query's batches to its own")
    if len(query_cats) != len(reference_cats) or any(q < r for q, r in zip(query_cats, reference_cats)):
        raise ValueError(f"the query's categorical covariates need at least the reference's categories "
                         f"{reference_cats}, got {query_cats}")
    if n_batch < n_reference_batch:
        raise ValueError(f"the query model needs at least the reference's {n_reference_batch} batches, got {n_batch}")
    if n_batch == n_reference_batch and query_cats == reference_cats:
        raise ValueError("the query model adds no batch and no category to the reference's")
    args = dict(reference_args)
    args["n_batch"] = int(n_batch)
    if reference_cats:
        args["n_cats_per_cov"] = query_cats
    if args.get("batch_embedded"):
        width = args.get("n_latent_batch")
        args["n_latent_batch"] = int(width if width is not None else n_reference_batch)
    return args


def _one_hot_plan(n_reference: Sequence[int], n_query: Sequence[int]) -> BlockPlan:
    """The columns of consecutive one-hot blocks, one per variable (a variable with one category has none)."""
    copies, zeros, new = [], [], []
    query_start = reference_start = 0
    for n_r, n_q in zip(n_reference, n_query):
        width_r, width_q = (n_r if n_r > 1 else 0), (n_q if n_q > 1 else 0)
        if width_q:
            if width_r:
                copies.append((query_start, reference_start, width_r))
            else:  # the reference's single category had no column: it reads zeros
                zeros.extend(range(query_start, query_start + n_r))
            if n_q > n_r:
                new.append((query_start + n_r, query_start + n_q))
        query_start, reference_start = query_start + width_q, reference_start + width_r
    return copies, zeros, new


def _batch_plan(n_reference_batch: int, query: SingleCellVariationalInference) -> BlockPlan:
    if query.batch_embedded:  # every batch shares the layers' embedding columns
        return [(0, 0, query.n_batch_features)] if query.n_batch_features else [], [], []
    return _one_hot_plan([n_reference_batch], [query.n_batch])


def _categorical_plan(n_reference_cats_per_cov: Sequence[int], query: SingleCellVariationalInference) -> BlockPlan:
    return _one_hot_plan(n_reference_cats_per_cov, query.n_cats_per_cov)


def _apply(target: torch.Tensor, source: torch.Tensor | None, plan: BlockPlan, query_offset: int = 0,
           reference_offset: int = 0) -> None:
    copies, zeros, _ = plan
    for query_start, reference_start, width in copies:
        assert source is not None
        target[:, query_offset + query_start:query_offset + query_start + width] = \
            source[:, reference_offset + reference_start:reference_offset + reference_start + width]
    for column in zeros:
        target[:, query_offset + column] = 0.0


def _check_pair(reference: SingleCellVariationalInference, query: SingleCellVariationalInference) -> None:
    same = (query.n_genes == reference.n_genes and query.batch_embedded == reference.batch_embedded
            and query.n_batch >= reference.n_batch and len(query.n_cats_per_cov) == len(reference.n_cats_per_cov))
    if not same:
        raise ValueError("the query model must be the reference's architecture with more batches or categories")


@torch.no_grad()
def transfer_reference_weights(reference: SingleCellVariationalInference, query: SingleCellVariationalInference) -> None:
    """Copy the reference's weights into ``query`` (built by :func:`query_model_arguments`); the new
    batches' and categories' parameters keep ``query``'s initial values, except where the module
    docstring says."""
    _check_pair(reference, query)
    n_ref = reference.n_batch
    batch_plan = _batch_plan(n_ref, query)
    categorical_plan = _categorical_plan(reference.n_cats_per_cov, query)
    reference_state = reference.state_dict()
    query_state = query.state_dict()
    for name, target in query_state.items():
        source = reference_state.get(name)
        leaf = name.rsplit(".", 1)[-1]
        if source is not None and source.shape == target.shape:
            target.copy_(source)
        elif leaf == "batch_weight":
            _apply(target, source, batch_plan)
        elif leaf == "categorical_weight":
            _apply(target, source, categorical_plan)
        elif name == "decoder.additive_bias_layer.weight" and source is not None:
            # [batch block | categorical block]; a reference with neither read one zero column.
            _apply(target, source, batch_plan)
            _apply(target, source, categorical_plan, query.n_batch_features, reference.n_batch_features)
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


def _keep_only(dim: int, ranges: list[tuple[int, int]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes every entry outside ``ranges`` (start, stop) along ``dim``."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros_like(grad)
        for start, stop in ranges:
            kept.narrow(dim, start, stop - start).copy_(grad.narrow(dim, start, stop - start))
        return kept

    return hook


def trainable_slices(query: SingleCellVariationalInference, n_reference_batch: int,
                     n_reference_cats_per_cov: Sequence[int] | None = None) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """The new batches' and categories' entries of each partly new parameter: name -> (dim, [(start, stop)])."""
    n_batch = query.n_batch
    batch_new = _batch_plan(n_reference_batch, query)[2]
    reference_cats = query.n_cats_per_cov if n_reference_cats_per_cov is None else list(n_reference_cats_per_cov)
    categorical_new = _categorical_plan(reference_cats, query)[2]
    slices: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    if query.batch_embedded and n_batch > n_reference_batch:
        for name in ("batch_mean_bd", "batch_log_scale_bd"):
            if getattr(query, name) is not None:
                slices[name] = (0, [(n_reference_batch, n_batch)])
    for module_name, module in query.named_modules():
        if isinstance(module, LinearWithBatch):
            for leaf, new in (("batch_weight", batch_new), ("categorical_weight", categorical_new)):
                if getattr(module, leaf) is not None and new:
                    slices[f"{module_name}.{leaf}"] = (1, list(new))
    offset = query.n_batch_features
    additive = batch_new + [(offset + start, offset + stop) for start, stop in categorical_new]
    if query.decoder.additive_bias_layer is not None and additive:
        slices["decoder.additive_bias_layer.weight"] = (1, additive)
    if query.px_r is not None and query.dispersion == "gene-batch" and n_batch > n_reference_batch:
        slices["px_r"] = (1, [(n_reference_batch, n_batch)])
    return slices


def freeze_reference(
    query: SingleCellVariationalInference,
    n_reference_batch: int,
    n_reference_cats_per_cov: Sequence[int] | None = None,
    *,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
) -> list[RemovableHandle]:
    """Let training move only the new batches' and categories' parameters (and the decoder's batch norm, as
    scvi-tools), with dropout and batch norm layers in evaluation mode (see the module's docstring); returns
    the hooks' handles. Not saved with the weights: apply it to every model built for training, also one
    resumed from a checkpoint."""
    if not 1 <= n_reference_batch <= query.n_batch:
        raise ValueError(f"n_reference_batch must be in [1, {query.n_batch}], got {n_reference_batch}")
    slices = trainable_slices(query, n_reference_batch, n_reference_cats_per_cov)
    handles = []
    for name, parameter in query.named_parameters():
        parameter.requires_grad_(name in slices)
        if name in slices:
            handles.append(parameter.register_hook(_keep_only(*slices[name])))
    for side, freeze in (("z_encoder", freeze_batchnorm_encoder), ("decoder", freeze_batchnorm_decoder)):
        for module in getattr(query, side).modules():
            if isinstance(module, nn.BatchNorm1d):
                for parameter in module.parameters():
                    parameter.requires_grad_(not freeze)
    # Hooks on the layers rather than one .eval(): the trainer and callers may switch the whole model to
    # training mode (and the runner calls the model's forward directly, so hooks on the model never run).
    for module in query.modules():
        if isinstance(module, (nn.Dropout, nn.BatchNorm1d)):
            handles.append(module.register_forward_pre_hook(_run_as_at_prediction_time))
    return handles


def _run_as_at_prediction_time(layer: nn.Module, args: Any) -> None:
    layer.train(False)
