"""scVI's argument checks: the constructor's options, and each call's covariates.

:class:`~cellarium_steps.models.scvi.SingleCellVariationalInference` runs :func:`check_arguments`
before it builds anything, and the ``check_*`` functions on every minibatch; each raises a
``ValueError`` (``NotImplementedError`` for scvi-tools options not implemented) naming the argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from cellarium_steps.models._scvi_layers import check_architecture_dict

if TYPE_CHECKING:
    import pandas as pd


def check_arguments(
    *,
    encoder: Mapping[str, Any],
    decoder: Mapping[str, Any],
    n_batch: int,
    n_latent: int,
    n_continuous_cov: int,
    n_cats_per_cov: list[int] | None,
    dropout_rate: float,
    dispersion: str,
    gene_likelihood: str,
    latent_distribution: str,
    batch_embedded: bool,
    batch_representation_sampled: bool,
    n_latent_batch: int | None,
    z_kl_weight_max: float,
    batch_kl_weight_max: float,
    input_gene_dropout_rate: float,
    kl_warmup_epochs: int | None,
    kl_warmup_steps: int | None,
    kl_annealing_start: float,
    cell_type_categories: list[str] | None,
    ontology_distance_matrix: pd.DataFrame | None,
    val_cell_type_classifier_reservoir_size: int,
) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """Raise on an invalid or unimplemented option; return the checked encoder and decoder dicts, ``n_cats_per_cov``."""
    if ontology_distance_matrix is not None and cell_type_categories is None:
        raise ValueError("ontology_distance_matrix needs cell_type_categories (the order of its rows)")
    if int(val_cell_type_classifier_reservoir_size) < 1:
        raise ValueError(
            f"val_cell_type_classifier_reservoir_size must be positive, got {val_cell_type_classifier_reservoir_size}"
        )
    if gene_likelihood == "zinb":
        raise NotImplementedError("gene_likelihood='zinb' is not implemented; use 'nb' or 'poisson'")
    if gene_likelihood not in ("nb", "poisson"):
        raise ValueError(f"gene_likelihood must be 'nb' or 'poisson', got {gene_likelihood!r}")
    if latent_distribution == "ln":
        raise NotImplementedError("latent_distribution='ln' (logistic normal) is not implemented; use 'normal'")
    if latent_distribution != "normal":
        raise ValueError(f"latent_distribution must be 'normal', got {latent_distribution!r}")
    if dispersion == "gene-label":
        raise NotImplementedError(
            "dispersion='gene-label' is not implemented: forward() takes no per-cell labels; "
            "use 'gene', 'gene-batch' or 'gene-cell'"
        )
    if dispersion not in ("gene", "gene-batch", "gene-cell"):
        raise ValueError(f"dispersion must be 'gene', 'gene-batch' or 'gene-cell', got {dispersion!r}")
    if n_batch < 0 or n_latent < 1 or n_continuous_cov < 0:
        raise ValueError(
            "need n_batch >= 0, n_latent >= 1, n_continuous_cov >= 0; "
            f"got {n_batch}, {n_latent}, {n_continuous_cov}"
        )
    n_cats_per_cov = [int(n) for n in (n_cats_per_cov or [])]
    if any(n < 1 for n in n_cats_per_cov):
        raise ValueError(f"n_cats_per_cov must be positive, got {n_cats_per_cov}")
    if not 0.0 <= dropout_rate < 1.0 or not 0.0 <= input_gene_dropout_rate < 1.0:
        raise ValueError("dropout_rate and input_gene_dropout_rate must be in [0, 1)")
    if not 0.0 <= kl_annealing_start <= 1.0:
        raise ValueError(
            f"kl_annealing_start is a fraction of the maximum KL weight, in [0, 1]; got {kl_annealing_start}"
        )
    if z_kl_weight_max < 0 or batch_kl_weight_max < 0:
        raise ValueError("z_kl_weight_max and batch_kl_weight_max must be non-negative")
    if batch_representation_sampled and not batch_embedded:
        raise ValueError("batch_representation_sampled=True needs batch_embedded=True")
    if batch_kl_weight_max > 0 and not batch_representation_sampled:
        raise ValueError(
            "batch_kl_weight_max > 0 needs batch_representation_sampled=True (a KL needs a distribution)"
        )
    if not batch_embedded and n_latent_batch is not None and n_latent_batch != n_batch:
        raise ValueError(
            f"one-hot batches have n_batch={n_batch} features; n_latent_batch={n_latent_batch} "
            "needs batch_embedded=True"
        )
    if batch_embedded and n_batch < 1:
        raise ValueError("batch_embedded=True needs n_batch >= 1")
    for name, value in (("kl_warmup_epochs", kl_warmup_epochs), ("kl_warmup_steps", kl_warmup_steps)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be non-negative or None, got {value}")

    encoder_spec = check_architecture_dict(encoder, "encoder", {"input_continuous_covariates"})
    decoder_spec = check_architecture_dict(decoder, "decoder", {"final_additive_bias"})
    return encoder_spec, decoder_spec, n_cats_per_cov


def on_side(option: str, side: Literal["encoder", "decoder"], name: str) -> bool:
    """Whether ``use_batch_norm`` or ``use_layer_norm`` (``name``) set to ``option`` applies to ``side``."""
    if option not in ("encoder", "decoder", "none", "both"):
        raise ValueError(f"{name} must be 'encoder', 'decoder', 'none' or 'both', got {option!r}")
    return option in (side, "both")


def reconstruction_gene_inds(var_names_g: np.ndarray, reconstruction_var_names_g: Sequence[str] | None) -> np.ndarray:
    """Positions in ``var_names_g`` of the genes to reconstruct (all when None), in their order."""
    if reconstruction_var_names_g is None:
        return np.arange(len(var_names_g))
    position = {name: i for i, name in enumerate(var_names_g)}
    missing = [name for name in reconstruction_var_names_g if name not in position]
    if missing:
        raise ValueError(
            f"reconstruction_var_names_g: {len(missing)} genes are not in var_names_g, e.g. {missing[:5]}"
        )
    return np.array([position[name] for name in reconstruction_var_names_g], dtype=np.int64)


def check_batch_index(
    batch_index_n: torch.Tensor | None, n_batch: int, n_cells: int, device: torch.device
) -> torch.Tensor:
    """Each cell's batch as a long tensor on ``device``, in ``[0, max(n_batch, 1))`` (zeros when optional)."""
    n_allowed = max(n_batch, 1)
    if batch_index_n is None:
        if n_allowed > 1:
            raise ValueError(f"batch_index_n is required: the model has n_batch={n_batch}")
        return torch.zeros(n_cells, dtype=torch.long, device=device)
    batch_index_n = torch.as_tensor(batch_index_n, device=device).reshape(-1).long()
    if batch_index_n.shape[0] != n_cells:
        raise ValueError(f"batch_index_n has {batch_index_n.shape[0]} entries for {n_cells} cells")
    bad_n = (batch_index_n < 0) | (batch_index_n >= n_allowed)
    if n_cells and bool(bad_n.any()):
        i = int(torch.nonzero(bad_n)[0, 0])
        raise ValueError(
            f"batch index {int(batch_index_n[i])} (cell {i} of the minibatch) is outside [0, {n_allowed}): "
            f"the model was built with n_batch={n_batch}"
        )
    return batch_index_n


def check_categorical_index(
    categorical_covariate_index_nd: torch.Tensor | None, n_cats_per_cov: list[int], n_cells: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The category codes, shape (n, len(n_cats_per_cov)), each in range; None for a model without any."""
    if not n_cats_per_cov:
        return None
    if categorical_covariate_index_nd is None:
        raise ValueError(
            f"categorical_covariate_index_nd is required: the model has n_cats_per_cov={n_cats_per_cov}"
        )
    index_nd = torch.as_tensor(categorical_covariate_index_nd, device=device).long()
    if index_nd.dim() == 1:
        index_nd = index_nd[:, None]
    if tuple(index_nd.shape) != (n_cells, len(n_cats_per_cov)):
        raise ValueError(
            f"categorical_covariate_index_nd has shape {tuple(index_nd.shape)}, "
            f"expected ({n_cells}, {len(n_cats_per_cov)})"
        )
    for d, n_cats in enumerate(n_cats_per_cov):
        bad_n = (index_nd[:, d] < 0) | (index_nd[:, d] >= n_cats)
        if n_cells and bool(bad_n.any()):
            i = int(torch.nonzero(bad_n)[0, 0])
            raise ValueError(
                f"categorical covariate {d}: index {int(index_nd[i, d])} (cell {i}) is outside [0, {n_cats})"
            )
    return index_nd


def check_continuous(
    continuous_covariates_nc: torch.Tensor | None, n_continuous_cov: int, n_cells: int, device: torch.device
) -> torch.Tensor | None:
    """The continuous covariates as float on ``device``, shape (n, n_continuous_cov); None for a model without any."""
    if n_continuous_cov == 0:
        return None
    if continuous_covariates_nc is None:
        raise ValueError(
            f"continuous_covariates_nc is required: the model has n_continuous_cov={n_continuous_cov}"
        )
    if tuple(continuous_covariates_nc.shape) != (n_cells, n_continuous_cov):
        raise ValueError(
            f"continuous_covariates_nc has shape {tuple(continuous_covariates_nc.shape)}, "
            f"expected ({n_cells}, {n_continuous_cov})"
        )
    return torch.as_tensor(continuous_covariates_nc, device=device).float()
