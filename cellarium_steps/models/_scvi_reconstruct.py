"""scVI's reconstruction: expected counts at a common library size, optionally in other batches.

``SingleCellVariationalInference.reconstruct`` (in :mod:`cellarium_steps.models.scvi`) checks its
inputs and calls :func:`reconstruct_counts`, which follows scvi-tools' strategy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.distributions import Normal

from cellarium_steps.models._scvi_layers import LinearWithBatch

#: the type of ``model`` below: a ``SingleCellVariationalInference``, not imported, as scvi.py imports this module.
ScviModel = Any

#: "mean" reconstructs in at most this many batches (the API's "first 10 batches").
MEAN_TRANSFORM_MAX_BATCHES = 10
#: reconstruct() decodes latent samples in chunks of at most this many (cells x genes x samples) values.
RECONSTRUCT_CHUNK_ELEMENTS = 2**24


def reconstruct_counts(
    model: ScviModel,
    x_ng: torch.Tensor,
    gene_inds: np.ndarray | list[int],
    batch_index_n: torch.Tensor,
    continuous_nc: torch.Tensor | None,
    categorical_index_nd: torch.Tensor | None,
    *,
    transform_batch: str | int | None,
    transform_categorical_covariates: list[int] | None,
    use_latent_mean: bool,
    n_latent_samples: int,
    use_importance_sampling: bool,
    reconstructed_library_size: float,
) -> dict[str, torch.Tensor]:
    """The body of ``SingleCellVariationalInference.reconstruct``, on inputs its ``_prepare`` checked."""
    n_cells, device = x_ng.shape[0], x_ng.device
    gene_index_p = torch.as_tensor(np.asarray(gene_inds, dtype=np.int64), device=device).reshape(-1)
    if gene_index_p.numel() and (int(gene_index_p.min()) < 0 or int(gene_index_p.max()) >= model.n_genes):
        raise ValueError(f"gene_inds must be in [0, {model.n_genes})")
    if n_latent_samples < 1:
        raise ValueError(f"n_latent_samples must be positive, got {n_latent_samples}")

    n_allowed = max(model.n_batch, 1)
    if transform_batch is None:
        target_batches_n = [batch_index_n]
    elif isinstance(transform_batch, str):
        if transform_batch != "mean":
            raise ValueError(f"transform_batch must be None, an integer or 'mean', got {transform_batch!r}")
        n_targets = min(MEAN_TRANSFORM_MAX_BATCHES, n_allowed)
        target_batches_n = [torch.full_like(batch_index_n, b) for b in range(n_targets)]
    else:
        if not 0 <= int(transform_batch) < n_allowed:
            raise ValueError(f"transform_batch {transform_batch} is outside [0, {n_allowed})")
        target_batches_n = [torch.full_like(batch_index_n, int(transform_batch))]

    categorical_np = model.categorical_onehot_from_categorical_index(categorical_index_nd)
    decoder_categorical_np = categorical_np
    if transform_categorical_covariates is not None:
        if len(transform_categorical_covariates) != len(model.n_cats_per_cov):
            raise ValueError(
                f"transform_categorical_covariates needs one category per covariate ({len(model.n_cats_per_cov)}), "
                f"got {list(transform_categorical_covariates)}"
            )
        fixed_d = torch.as_tensor(list(transform_categorical_covariates), device=device, dtype=torch.long)
        for d, (code, n_cats) in enumerate(zip(fixed_d.tolist(), model.n_cats_per_cov)):
            if not 0 <= code < n_cats:
                raise ValueError(f"transform_categorical_covariates[{d}] = {code} is outside [0, {n_cats})")
        decoder_categorical_np = model.categorical_onehot_from_categorical_index(fixed_d.expand(n_cells, -1))
    elif transform_batch is not None and model.n_categorical_features and decoder_uses_categorical(model):
        raise ValueError(
            "transform_categorical_covariates is required with transform_batch when the decoder uses "
            "categorical covariates: a cell's observed categories may never occur in the target batch"
        )

    own_batch_nb = model.batch_representation_from_batch_index(batch_index_n, use_mean_though_sampling=True)
    inference_outputs = model.inference(x_ng, own_batch_nb, continuous_nc, categorical_np)
    qz: Normal = inference_outputs["qz"]
    targets = [
        (b_n, model.batch_representation_from_batch_index(b_n, use_mean_though_sampling=True))
        for b_n in target_batches_n
    ]
    library_n1 = torch.full((n_cells, 1), math.log(reconstructed_library_size), device=device)
    n_samples = 1 if use_latent_mean else int(n_latent_samples)
    chunk = max(1, min(n_samples, RECONSTRUCT_CHUNK_ELEMENTS // max(1, n_cells * model.n_genes * len(targets))))
    total_np = torch.zeros(n_cells, gene_index_p.numel(), device=device)
    log_weight_max_n1 = torch.full((n_cells, 1), -math.inf, device=device)
    weight_sum_n1 = torch.zeros(n_cells, 1, device=device)
    done = 0
    while done < n_samples:
        s = min(chunk, n_samples - done)
        done += s
        z_snk = qz.loc.unsqueeze(0) if use_latent_mean else qz.sample((s,))
        z_mk = z_snk.reshape(s * n_cells, -1)  # m = s * n: every sample of every cell
        mean_sp = torch.zeros(s * n_cells, gene_index_p.numel(), device=device)
        for target_batch_index_n, target_batch_nb in targets:
            px = model.generative(
                z_mk, _repeat(library_n1, s), _repeat(target_batch_nb, s), _repeat(continuous_nc, s),
                _repeat(decoder_categorical_np, s), batch_index_n=_repeat(target_batch_index_n, s),
            )["px"]
            mean_sp += px.mean[:, gene_index_p]
        mean_snp = (mean_sp / len(targets)).reshape(s, n_cells, -1)
        if use_importance_sampling and not use_latent_mean:
            log_weight_sn = log_importance_weights(
                model, x_ng, z_mk, qz, inference_outputs["library_size_n1"], own_batch_nb, continuous_nc,
                categorical_np, batch_index_n, s,
            )
            # Running, numerically stable weighted mean over sample chunks.
            new_max_n1 = torch.maximum(log_weight_max_n1, log_weight_sn.max(0).values[:, None])
            rescale_n1 = torch.exp(log_weight_max_n1 - new_max_n1)
            weight_sn1 = torch.exp(log_weight_sn[:, :, None] - new_max_n1)
            total_np = total_np * rescale_n1 + (weight_sn1 * mean_snp).sum(0)
            weight_sum_n1 = weight_sum_n1 * rescale_n1 + weight_sn1.sum(0)
            log_weight_max_n1 = new_max_n1
        else:
            total_np += mean_snp.sum(0)
            weight_sum_n1 += s
    return {"x_ng": total_np / weight_sum_n1}


def _repeat(t: torch.Tensor | None, s: int) -> torch.Tensor | None:
    """``t`` stacked ``s`` times along the cells: row ``i * n + c`` is cell ``c`` (sample ``i``)."""
    return None if t is None else t.repeat(s, *([1] * (t.dim() - 1)))


def decoder_uses_categorical(model: ScviModel) -> bool:
    layers = [m for m in model.decoder.modules() if isinstance(m, LinearWithBatch)]
    return any(layer.n_categorical_features for layer in layers) or model.decoder.additive_bias_layer is not None


def log_importance_weights(
    model: ScviModel,
    x_ng: torch.Tensor,
    z_mk: torch.Tensor,
    qz: Normal,
    library_size_n1: torch.Tensor,
    batch_nb: torch.Tensor,
    continuous_nc: torch.Tensor | None,
    categorical_np: torch.Tensor | None,
    batch_index_n: torch.Tensor,
    s: int,
) -> torch.Tensor:
    """log p(x | z) + log p(z) - log q(z | x) for s samples of every cell, shape (s, n)."""
    n_cells = x_ng.shape[0]
    outputs = model.generative(z_mk, _repeat(library_size_n1, s), _repeat(batch_nb, s), _repeat(continuous_nc, s),
                               _repeat(categorical_np, s), batch_index_n=_repeat(batch_index_n, s))
    log_px_m = outputs["px"].log_prob(_repeat(x_ng, s)).sum(-1)
    log_pz_m = outputs["pz"].log_prob(z_mk)
    if log_pz_m.dim() == 2:
        log_pz_m = log_pz_m.sum(-1)
    z_snk = z_mk.reshape(s, n_cells, -1)
    log_qz_sn = qz.log_prob(z_snk).sum(-1)
    return (log_px_m + log_pz_m).reshape(s, n_cells) - log_qz_sn
