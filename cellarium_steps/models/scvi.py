"""Single-cell variational inference (scVI), with encoder and decoder described by dicts.

The numbers are scvi-tools' ``VAE`` (module ``scvi.module.VAE``) where the architectures agree:
the same layers, initialisation, dressing (batch norm, layer norm, ReLU, dropout), observed
library size, negative binomial log-likelihood (with scvi-tools' ``eps=1e-8``) and KL warm-up
schedule, so weights copied from a trained ``scvi.model.SCVI`` give the same loss, latent
means and gradients (see ``tests/test_scvi.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Normal, Poisson
from torch.distributions import kl_divergence as kl

from cellarium_steps.models._latent_metrics import ValidationState, cell_type_metrics, ordered_distance_matrix
from cellarium_steps.models._scvi_checks import (
    check_arguments,
    check_batch_index,
    check_categorical_index,
    check_continuous,
    on_side,
    reconstruction_gene_inds,
)
from cellarium_steps.models._scvi_distributions import NegativeBinomial, SplineFlowPrior, log_poisson_sum
from cellarium_steps.models._scvi_layers import (
    DecoderSCVI,
    EncoderSCVI,
    LinearWithBatch,
    LinearWithBatchAndCovariates,
    scvi_tools_default_architecture,
)
from cellarium_steps.models._scvi_reconstruct import reconstruct_counts
from cellarium_steps.models._tensors import densify, nonzero_entries
from cellarium_steps.models.base import CellariumModel, PredictMixin, ValidateMixin, check_var_names

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import pandas as pd

__all__ = [
    "LinearWithBatch",
    "LinearWithBatchAndCovariates",
    "NegativeBinomial",
    "SingleCellVariationalInference",
    "SplineFlowPrior",
    "scvi_tools_default_architecture",
]


class SingleCellVariationalInference(CellariumModel, PredictMixin, ValidateMixin):
    """Flexible single-cell variational inference (scVI) [1], streaming-friendly.

    Counts ``x`` are modelled as ``NB(library * softmax(decoder(z, batch, covariates)), theta)``
    (or Poisson) with ``z ~ N(0, I)`` (or a learned spline flow prior) and an amortized Gaussian
    posterior ``q(z | x)``. The library is the observed total count of the cell over the model's
    genes (scvi-tools' ``use_observed_lib_size=True``), or ``total_mrna_umis_n`` with
    ``use_size_factor_key=True``.

    References:
        1. Deep generative modeling for single-cell transcriptomics (Lopez et al., 2018).

    Args:
        var_names_g: The genes the model reads, in order; every input must have exactly these.
        encoder: The encoder's layers, as a dict (format in :mod:`cellarium_steps.models._scvi_layers`):
            ``{"hidden_layers": [...], "final_layer": {...}}`` and optionally
            ``"input_continuous_covariates": True`` to concatenate the continuous covariates to the
            counts (scvi-tools' ``encode_covariates`` for continuous covariates).
        decoder: The decoder's layers: ``{"hidden_layers": [...], "final_layer": {...},
            "final_additive_bias": bool}``. The final layer is the normalized-expression head;
            ``final_additive_bias`` adds to the mean counts a learned, non-negative per-batch
            (and per-category) background count per gene: ``softplus(W [b, c] + w0)``, starting
            near 1e-3 counts. The decoder's input is ``[z, continuous covariates]``.
            :func:`scvi_tools_default_architecture` gives scvi-tools' default dicts.
        n_batch: Number of batches; ``batch_index_n`` must be in ``[0, max(n_batch, 1))``. With
            one-hot batches, ``n_batch <= 1`` injects nothing (scvi-tools ignores single categories).
        n_latent: Dimension of the latent space.
        n_continuous_cov: Number of continuous covariates (``continuous_covariates_nc``).
        n_cats_per_cov: Number of categories of each categorical covariate
            (``categorical_covariate_index_nd``); covariates with one category are ignored, as in scvi-tools.
        dropout_rate: Dropout after each encoder hidden layer (the decoder has none).
        dispersion: ``"gene"``, ``"gene-batch"`` or ``"gene-cell"`` (the inverse dispersion is per
            gene, per gene and batch, or decoded per cell). ``"gene-label"`` is not implemented:
            ``forward`` takes no labels.
        log_variational: Encode ``log1p(x)`` rather than ``x`` (for stability, not normalization).
        gene_likelihood: ``"nb"`` or ``"poisson"``; ``"zinb"`` is not implemented.
        latent_distribution: ``"normal"``; ``"ln"`` (logistic normal) is not implemented.
        batch_embedded: Represent batches by a learned ``n_latent_batch``-dimensional embedding
            (initialised as one-hot) instead of a one-hot vector.
        batch_representation_sampled: With ``batch_embedded``, each batch's embedding is a Gaussian
            (mean and scale learned; scale initialised to 1), sampled per cell in training, with
            a KL to N(0, I) weighted by ``batch_kl_weight_max`` (warmed up as the z KL). Prediction
            and reconstruction use the means.
        n_latent_batch: Embedding dimension (default: ``n_batch``); one-hot needs ``n_batch``.
        z_kl_weight_max: The weight of KL(q(z|x) || p(z)) after warm-up.
        batch_kl_weight_max: The weight of the batch embedding KL after warm-up.
        input_gene_dropout_rate: In training, each (cell, gene) count is zeroed with this probability
            in the encoder's input only (the library size and likelihood use the full counts), so
            the encoder learns not to rely on any one gene.
        use_batch_norm: Where hidden layers get ``BatchNorm1d``: ``"encoder"``, ``"decoder"``,
            ``"none"`` or ``"both"`` (scvi-tools' default).
        use_layer_norm: Where hidden layers get ``LayerNorm`` (after batch norm when both are on).
        kl_warmup_epochs: KL weights rise linearly from ``kl_annealing_start`` times their maximum
            at epoch 0 to the maximum at this epoch. Takes precedence over ``kl_warmup_steps``,
            as in scvi-tools; None to warm up by steps.
        kl_warmup_steps: The same in optimizer steps (when ``kl_warmup_epochs`` is None).
        kl_annealing_start: The KL weights' fraction of their maximum at the start of warm-up.
        use_size_factor_key: Use ``total_mrna_umis_n`` (required in ``forward``) as the library
            size, with a softplus instead of a softmax head, as scvi-tools' ``size_factor_key``.
        reconstruct_counts_on_predict: ``predict`` returns reconstructed counts (with the
            ``reconstruction_*`` settings below) instead of the latent means.
        reconstruction_var_names_g: Genes ``predict`` reconstructs, in this order (default: all).
        reconstruction_transform_batch: ``transform_batch`` for ``predict``'s reconstruction.
        reconstruction_n_latent_samples: ``n_latent_samples`` for ``predict``'s reconstruction.
        reconstruction_use_latent_mean: ``use_latent_mean`` for ``predict``'s reconstruction.
        reconstruction_use_importance_sampling: ``use_importance_sampling`` for ``predict``.
        reconstructed_library_size: ``reconstructed_library_size`` for ``predict``.
        reconstruction_transform_categorical_covariates: ``transform_categorical_covariates`` for ``predict``.
        use_flow: Replace the N(0, I) prior by a :class:`SplineFlowPrior`, trained jointly; the KL
            is then the one-sample Monte Carlo estimate ``log q(z|x) - log p_flow(z)``.
        flow_hidden_features: Hidden widths of the flow's coupling networks.
        cell_type_categories: Ordered cell type ids (e.g. CL ids); ``validation_cell_type_index_n``
            codes index this list (-1: unlabelled). Enables the validation cell type classifier
            (``val_cell_type_classifier_accuracy``); see :meth:`validate`.
        ontology_distance_matrix: Square DataFrame of distances between cell types (CL ids on both
            axes, e.g. :func:`cellarium_steps.ontology.compute_cl_distance_matrix`), sliced and
            reordered here to ``cell_type_categories``. Enables ``val_ontology_spearman``. Kept as
            a non-persistent buffer: not saved to checkpoints.
        val_cell_type_classifier_reservoir_size: Most cells kept per split (train: even validation
            batches, test: odd ones) for the classifier, by reservoir sampling.
    """

    def __init__(
        self,
        var_names_g: Sequence[str],
        encoder: dict[str, list[dict] | dict | bool],
        decoder: dict[str, list[dict] | dict | bool],
        n_batch: int = 0,
        n_latent: int = 10,
        n_continuous_cov: int = 0,
        n_cats_per_cov: list[int] | None = None,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        log_variational: bool = True,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        batch_embedded: bool = False,
        batch_representation_sampled: bool = False,
        n_latent_batch: int | None = None,
        z_kl_weight_max: float = 1.0,
        batch_kl_weight_max: float = 0.0,
        input_gene_dropout_rate: float = 0.0,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
        kl_warmup_epochs: int | None = 400,
        kl_warmup_steps: int | None = None,
        kl_annealing_start: float = 0.0,
        use_size_factor_key: bool = False,
        reconstruct_counts_on_predict: bool = False,
        reconstruction_var_names_g: np.ndarray | list | None = None,
        reconstruction_transform_batch: None | int | str = 0,
        reconstruction_n_latent_samples: int = 30,
        reconstruction_use_latent_mean: bool = False,
        reconstruction_use_importance_sampling: bool = False,
        reconstructed_library_size: int = 10000,
        reconstruction_transform_categorical_covariates: list[int] | None = None,
        use_flow: bool = False,
        flow_hidden_features: list[int] = [64, 64],  # noqa: B006 - the API's default, never mutated
        cell_type_categories: list[str] | None = None,
        ontology_distance_matrix: pd.DataFrame | None = None,
        val_cell_type_classifier_reservoir_size: int = 50000,
    ) -> None:
        super().__init__()
        encoder_spec, decoder_spec, n_cats_per_cov = check_arguments(
            encoder=encoder, decoder=decoder, n_batch=n_batch, n_latent=n_latent, n_continuous_cov=n_continuous_cov,
            n_cats_per_cov=n_cats_per_cov, dropout_rate=dropout_rate, dispersion=dispersion,
            gene_likelihood=gene_likelihood, latent_distribution=latent_distribution, batch_embedded=batch_embedded,
            batch_representation_sampled=batch_representation_sampled, n_latent_batch=n_latent_batch,
            z_kl_weight_max=z_kl_weight_max, batch_kl_weight_max=batch_kl_weight_max,
            input_gene_dropout_rate=input_gene_dropout_rate, kl_warmup_epochs=kl_warmup_epochs,
            kl_warmup_steps=kl_warmup_steps, kl_annealing_start=kl_annealing_start,
            cell_type_categories=cell_type_categories, ontology_distance_matrix=ontology_distance_matrix,
            val_cell_type_classifier_reservoir_size=val_cell_type_classifier_reservoir_size,
        )

        self.var_names_g = np.asarray(var_names_g)
        self.n_genes = len(self.var_names_g)
        self.n_batch = int(n_batch)
        self.n_latent = int(n_latent)
        self.n_continuous_cov = int(n_continuous_cov)
        self.n_cats_per_cov = n_cats_per_cov
        self.dispersion = dispersion
        self.log_variational = log_variational
        self.gene_likelihood = gene_likelihood
        self.batch_embedded = batch_embedded
        self.batch_representation_sampled = batch_representation_sampled
        self.n_latent_batch = int(n_latent_batch if n_latent_batch is not None else n_batch)
        self.z_kl_weight_max = float(z_kl_weight_max)
        self.batch_kl_weight_max = float(batch_kl_weight_max)
        self.input_gene_dropout_rate = float(input_gene_dropout_rate)
        self.kl_warmup_epochs = kl_warmup_epochs
        self.kl_warmup_steps = kl_warmup_steps
        self.kl_annealing_start = float(kl_annealing_start)
        self.use_size_factor_key = use_size_factor_key
        self.reconstruct_counts_on_predict = reconstruct_counts_on_predict
        self.reconstruction_transform_batch = reconstruction_transform_batch
        self.reconstruction_n_latent_samples = int(reconstruction_n_latent_samples)
        self.reconstruction_use_latent_mean = reconstruction_use_latent_mean
        self.reconstruction_use_importance_sampling = reconstruction_use_importance_sampling
        self.reconstructed_library_size = reconstructed_library_size
        self.reconstruction_transform_categorical_covariates = reconstruction_transform_categorical_covariates
        self.use_flow = use_flow
        self.encode_continuous_covariates = bool(encoder_spec.get("input_continuous_covariates", False))

        self.reconstruction_gene_inds = reconstruction_gene_inds(self.var_names_g, reconstruction_var_names_g)

        # scvi-tools drops covariates with a single category: they carry no information.
        if batch_embedded:
            self.n_batch_features = self.n_latent_batch
        else:
            self.n_batch_features = self.n_batch if self.n_batch > 1 else 0
        self.n_categorical_features = sum(n for n in n_cats_per_cov if n > 1)

        self.batch_mean_bd: nn.Parameter | None = None
        self.batch_log_scale_bd: nn.Parameter | None = None
        if batch_embedded:
            self.batch_mean_bd = nn.Parameter(torch.empty(self.n_batch, self.n_latent_batch))
            if batch_representation_sampled:
                self.batch_log_scale_bd = nn.Parameter(torch.empty(self.n_batch, self.n_latent_batch))

        self.px_r: nn.Parameter | None = None
        if gene_likelihood == "nb" and dispersion == "gene":
            self.px_r = nn.Parameter(torch.empty(self.n_genes))
        elif gene_likelihood == "nb" and dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.empty(self.n_genes, max(self.n_batch, 1)))

        self.z_encoder = EncoderSCVI(
            self.n_genes + self.n_continuous_cov * self.encode_continuous_covariates,
            self.n_latent,
            encoder_spec,
            n_batch_features=self.n_batch_features,
            n_categorical_features=self.n_categorical_features,
            use_batch_norm=on_side(use_batch_norm, "encoder", "use_batch_norm"),
            use_layer_norm=on_side(use_layer_norm, "encoder", "use_layer_norm"),
            dropout_rate=dropout_rate,
        )
        self.decoder = DecoderSCVI(
            self.n_latent + self.n_continuous_cov,
            self.n_genes,
            decoder_spec,
            n_batch_features=self.n_batch_features,
            n_categorical_features=self.n_categorical_features,
            use_batch_norm=on_side(use_batch_norm, "decoder", "use_batch_norm"),
            use_layer_norm=on_side(use_layer_norm, "decoder", "use_layer_norm"),
            scale_activation="softplus" if use_size_factor_key else "softmax",
            cell_dispersion=gene_likelihood == "nb" and dispersion == "gene-cell",
        )
        self.flow_prior = SplineFlowPrior(self.n_latent, flow_hidden_features) if use_flow else None

        #: constructor arguments as plain JSON values, to rebuild the model from a checkpoint.
        self.hyper_parameters: dict[str, Any] = {
            "var_names_g": [str(v) for v in self.var_names_g],
            "encoder": encoder_spec,
            "decoder": decoder_spec,
            "n_batch": self.n_batch,
            "n_latent": self.n_latent,
            "n_continuous_cov": self.n_continuous_cov,
            "n_cats_per_cov": list(n_cats_per_cov),
            "dropout_rate": float(dropout_rate),
            "dispersion": dispersion,
            "log_variational": bool(log_variational),
            "gene_likelihood": gene_likelihood,
            "latent_distribution": latent_distribution,
            "batch_embedded": bool(batch_embedded),
            "batch_representation_sampled": bool(batch_representation_sampled),
            "n_latent_batch": n_latent_batch,
            "z_kl_weight_max": self.z_kl_weight_max,
            "batch_kl_weight_max": self.batch_kl_weight_max,
            "input_gene_dropout_rate": self.input_gene_dropout_rate,
            "use_batch_norm": use_batch_norm,
            "use_layer_norm": use_layer_norm,
            "kl_warmup_epochs": kl_warmup_epochs,
            "kl_warmup_steps": kl_warmup_steps,
            "kl_annealing_start": self.kl_annealing_start,
            "use_size_factor_key": bool(use_size_factor_key),
            "reconstruct_counts_on_predict": bool(reconstruct_counts_on_predict),
            "reconstruction_var_names_g": (
                None if reconstruction_var_names_g is None else [str(v) for v in reconstruction_var_names_g]
            ),
            "reconstruction_transform_batch": reconstruction_transform_batch,
            "reconstruction_n_latent_samples": self.reconstruction_n_latent_samples,
            "reconstruction_use_latent_mean": bool(reconstruction_use_latent_mean),
            "reconstruction_use_importance_sampling": bool(reconstruction_use_importance_sampling),
            "reconstructed_library_size": reconstructed_library_size,
            "reconstruction_transform_categorical_covariates": reconstruction_transform_categorical_covariates,
            "use_flow": bool(use_flow),
            "flow_hidden_features": list(flow_hidden_features),
            "cell_type_categories": None if cell_type_categories is None else [str(c) for c in cell_type_categories],
            "val_cell_type_classifier_reservoir_size": int(val_cell_type_classifier_reservoir_size),
        }
        # Validation metrics: configuration and per-epoch state, none of it in the state dict.
        self.cell_type_categories = self.hyper_parameters["cell_type_categories"]
        self.val_cell_type_classifier_reservoir_size = int(val_cell_type_classifier_reservoir_size)
        self.ontology_distance_cc: torch.Tensor | None
        self.register_buffer(
            "ontology_distance_cc",
            None if ontology_distance_matrix is None
            else ordered_distance_matrix(ontology_distance_matrix, self.cell_type_categories),
            persistent=False,
        )
        self._val_state: ValidationState | None = None
        self._var_names_checked: Any = None
        # The warm-up position, synchronised from the trainer by the hooks below.
        self.current_epoch = 0
        self.global_step = 0
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and hooks

    def reset_parameters(self) -> None:
        """scvi-tools' initialisation: torch's defaults for layers, N(0, 1) log inverse dispersions."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
                module.reset_parameters()
        self.decoder.reset_additive_bias()
        if self.px_r is not None:
            nn.init.normal_(self.px_r)
        with torch.no_grad():
            if self.batch_mean_bd is not None:
                # One-hot to start with, so an embedded model starts where the one-hot model does.
                self.batch_mean_bd.copy_(torch.eye(self.n_batch, self.n_latent_batch))
            if self.batch_log_scale_bd is not None:
                self.batch_log_scale_bd.zero_()
        if self.flow_prior is not None:
            self.flow_prior.reset_parameters()

    def _sync_position(self, trainer: pl.Trainer) -> None:
        self.current_epoch = int(trainer.current_epoch)
        self.global_step = int(trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer) -> None:
        self._sync_position(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        """Read the epoch and global step (also after a resume); forward counts steps within the epoch."""
        self._sync_position(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer) -> None:
        """Exact global step when the runner forwards this hook (the in-forward counter is then redundant)."""
        self._sync_position(trainer)

    def kl_annealing_fraction(self) -> float:
        """Fraction of the maximum KL weights now: scvi-tools' linear warm-up, from ``kl_annealing_start``."""
        if self.kl_warmup_epochs:
            position, length = self.current_epoch, self.kl_warmup_epochs
        elif self.kl_warmup_steps:
            position, length = self.global_step, self.kl_warmup_steps
        else:
            return 1.0
        if position >= length:
            return 1.0
        return self.kl_annealing_start + (1.0 - self.kl_annealing_start) * position / length

    @property
    def z_kl_weight(self) -> float:
        return self.z_kl_weight_max * self.kl_annealing_fraction()

    @property
    def batch_kl_weight(self) -> float:
        return self.batch_kl_weight_max * self.kl_annealing_fraction()

    # ------------------------------------------------------------------ covariates

    def batch_embedding_distribution(self, batch_index_n: torch.Tensor) -> Normal:
        """The Gaussian of each cell's batch embedding (``batch_representation_sampled`` only)."""
        assert self.batch_mean_bd is not None and self.batch_log_scale_bd is not None
        return Normal(self.batch_mean_bd[batch_index_n], self.batch_log_scale_bd[batch_index_n].exp() + 1e-5)

    def batch_representation_from_batch_index(
        self, batch_index_n: torch.Tensor, use_mean_though_sampling: bool = False
    ) -> torch.Tensor:
        """The batch representation of each cell, shape (n, n_batch_features).

        One-hot (like scvi-tools; zero columns when ``n_batch <= 1``) unless ``batch_embedded``;
        embedded batches are sampled when ``batch_representation_sampled``, unless
        ``use_mean_though_sampling`` asks for the embedding's mean.
        """
        batch_index_n = batch_index_n.reshape(-1).long()
        if not self.batch_embedded:
            if self.n_batch_features == 0:
                return torch.zeros(batch_index_n.shape[0], 0, device=batch_index_n.device)
            return nn.functional.one_hot(batch_index_n, self.n_batch).float()
        assert self.batch_mean_bd is not None
        if self.batch_representation_sampled and not use_mean_though_sampling:
            return self.batch_embedding_distribution(batch_index_n).rsample()
        return self.batch_mean_bd[batch_index_n]

    def categorical_onehot_from_categorical_index(
        self, categorical_covariate_index_nd: torch.Tensor | None
    ) -> torch.Tensor | None:
        """One-hot categorical covariates, concatenated in order; single-category covariates are left out."""
        if categorical_covariate_index_nd is None or not self.n_cats_per_cov:
            return None
        index_nd = categorical_covariate_index_nd.long()
        if index_nd.dim() == 1:
            index_nd = index_nd[:, None]
        onehots = [
            nn.functional.one_hot(index_nd[:, d], n_cats).float()
            for d, n_cats in enumerate(self.n_cats_per_cov)
            if n_cats > 1
        ]
        if not onehots:
            return torch.zeros(index_nd.shape[0], 0, device=index_nd.device)
        return torch.cat(onehots, dim=1)

    # ------------------------------------------------------------------ the model

    def inference(
        self,
        x_ng: torch.Tensor,
        batch_nb: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_np: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Encode: ``qz`` (Normal), a reparametrised sample ``z_nk``, and the observed log library size."""
        x_ng = densify(x_ng).float()
        library_size_n1 = torch.log(x_ng.sum(dim=-1, keepdim=True))
        encoder_input_ng = x_ng
        if self.training and self.input_gene_dropout_rate > 0:
            keep_ng = torch.rand_like(x_ng) >= self.input_gene_dropout_rate
            encoder_input_ng = encoder_input_ng * keep_ng
        if self.log_variational:
            encoder_input_ng = torch.log1p(encoder_input_ng)
        if self.encode_continuous_covariates and continuous_covariates_nc is not None:
            encoder_input_ng = torch.cat([encoder_input_ng, continuous_covariates_nc], dim=-1)
        qz = self.z_encoder(encoder_input_ng, batch_nb, categorical_covariate_np)
        return {"qz": qz, "z_nk": qz.rsample(), "library_size_n1": library_size_n1}

    def generative(
        self,
        z_nk: torch.Tensor,
        library_size_n1: torch.Tensor,
        batch_nb: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_np: torch.Tensor | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, Distribution]:
        """Decode: ``px`` (the count distribution) and ``pz`` (the prior; the flow's when ``use_flow``).

        ``batch_index_n`` is needed only for ``dispersion="gene-batch"`` with embedded batches
        (one-hot batches give it); its dispersion is per batch, not per embedding.
        """
        decoder_input_nk = z_nk
        if continuous_covariates_nc is not None:
            decoder_input_nk = torch.cat([z_nk, continuous_covariates_nc], dim=-1)
        scale_ng, rate_ng, log_theta_ng = self.decoder(
            decoder_input_nk, library_size_n1, batch_nb, categorical_covariate_np
        )
        px: Distribution
        if self.gene_likelihood == "poisson":
            px = Poisson(rate_ng, validate_args=False)
        else:
            if self.dispersion == "gene":
                assert self.px_r is not None
                log_theta = self.px_r
            elif self.dispersion == "gene-batch":
                assert self.px_r is not None
                if batch_index_n is not None:
                    log_theta = self.px_r.T[batch_index_n.reshape(-1).long()]
                elif not self.batch_embedded and self.n_batch > 1:
                    log_theta = nn.functional.linear(batch_nb, self.px_r)
                elif self.n_batch <= 1:
                    log_theta = self.px_r[:, 0]
                else:
                    raise ValueError("dispersion='gene-batch' with embedded batches needs batch_index_n")
            else:
                assert log_theta_ng is not None
                log_theta = log_theta_ng
            px = NegativeBinomial(rate_ng, torch.exp(log_theta))
        px.scale = scale_ng  # type: ignore[attr-defined]  # normalized expression, as scvi-tools keeps it
        pz: Distribution
        if self.flow_prior is not None:
            pz = self.flow_prior.distribution()
        else:
            pz = Normal(torch.zeros_like(z_nk), torch.ones_like(z_nk))
        return {"px": px, "pz": pz}

    def _kl_divergence_z(self, qz: Normal, pz: Distribution, z_nk: torch.Tensor) -> torch.Tensor:
        if self.flow_prior is not None:
            return qz.log_prob(z_nk).sum(-1) - pz.log_prob(z_nk)
        return kl(qz, pz).sum(-1)

    def _prepare(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        batch_index_n: torch.Tensor | None,
        continuous_covariates_nc: torch.Tensor | None,
        categorical_covariate_index_nd: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if var_names_g is not self._var_names_checked:
            # Transforms hand on the same gene array every batch: compare the strings once per array.
            check_var_names(self.var_names_g, var_names_g)
            self._var_names_checked = var_names_g
        x_ng = densify(x_ng).float()
        n_cells = x_ng.shape[0]
        batch_index_n = check_batch_index(batch_index_n, self.n_batch, n_cells, x_ng.device)
        continuous_nc = check_continuous(continuous_covariates_nc, self.n_continuous_cov, n_cells, x_ng.device)
        categorical_index_nd = check_categorical_index(
            categorical_covariate_index_nd, self.n_cats_per_cov, n_cells, x_ng.device
        )
        return x_ng, batch_index_n, continuous_nc, categorical_index_nd

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        batch_index_n: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_index_nd: torch.Tensor | None = None,
        total_mrna_umis_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The negative ELBO of a minibatch, as scvi-tools' ``VAE.loss``.

        Args:
            x_ng: Counts, dense or sparse CSR.
            var_names_g: The input's genes; must equal the model's.
            batch_index_n: Batch of each cell, in ``[0, max(n_batch, 1))``.
            continuous_covariates_nc: Continuous covariates, shape (n, n_continuous_cov).
            categorical_covariate_index_nd: Integer category codes, shape (n, len(n_cats_per_cov)).
            total_mrna_umis_n: Total UMIs of each cell; the library size with ``use_size_factor_key``.

        Returns:
            ``loss``: mean over cells of reconstruction loss + KL weights x KLs (scalar);
            ``reconstruction_loss``, ``kl_divergence_z``, ``kl_divergence_batch``: per cell, shape (n,);
            ``z_nk``: the latent sample the reconstruction used.
        """
        # The counts' stored entries, for the likelihood (every term with x is zero elsewhere).
        row_e, col_e, x_e = nonzero_entries(x_ng)
        x_ng, batch_index_n, continuous_nc, categorical_index_nd = self._prepare(
            x_ng, var_names_g, batch_index_n, continuous_covariates_nc, categorical_covariate_index_nd
        )
        row_e, col_e, x_e = row_e.long(), col_e.long(), x_e.to(x_ng.dtype)
        z_kl_weight, batch_kl_weight = self.z_kl_weight, self.batch_kl_weight
        if self.training and torch.is_grad_enabled():
            # One forward per optimizer step; the epoch hook resets this from the trainer.
            self.global_step += 1
        batch_nb = self.batch_representation_from_batch_index(batch_index_n)
        categorical_np = self.categorical_onehot_from_categorical_index(categorical_index_nd)
        inference_outputs = self.inference(x_ng, batch_nb, continuous_nc, categorical_np)
        library_size_n1 = inference_outputs["library_size_n1"]
        if self.use_size_factor_key:
            if total_mrna_umis_n is None:
                raise ValueError("use_size_factor_key=True needs total_mrna_umis_n")
            library_size_n1 = torch.log(torch.as_tensor(total_mrna_umis_n, device=x_ng.device).float().reshape(-1, 1))
        z_nk = inference_outputs["z_nk"]
        self._last_qz_loc_nk = inference_outputs["qz"].loc.detach()  # validate() reads the latent means here
        generative_outputs = self.generative(
            z_nk, library_size_n1, batch_nb, continuous_nc, categorical_np, batch_index_n=batch_index_n
        )
        px = generative_outputs["px"]
        if isinstance(px, NegativeBinomial):
            reconstruction_loss_n = -px.log_prob_sum(row_e, col_e, x_e)
        elif isinstance(px, Poisson):
            reconstruction_loss_n = -log_poisson_sum(row_e, col_e, x_e, px.rate)
        else:
            reconstruction_loss_n = -px.log_prob(x_ng).sum(-1)
        kl_divergence_z_n = self._kl_divergence_z(inference_outputs["qz"], generative_outputs["pz"], z_nk)
        kl_divergence_batch_n = torch.zeros_like(kl_divergence_z_n)
        if self.batch_representation_sampled:
            qb = self.batch_embedding_distribution(batch_index_n)
            kl_divergence_batch_n = kl(qb, Normal(torch.zeros_like(qb.loc), torch.ones_like(qb.scale))).sum(-1)
        loss = torch.mean(
            reconstruction_loss_n + z_kl_weight * kl_divergence_z_n + batch_kl_weight * kl_divergence_batch_n
        )
        return {
            "loss": loss,
            "reconstruction_loss": reconstruction_loss_n,
            "kl_divergence_z": kl_divergence_z_n,
            "kl_divergence_batch": kl_divergence_batch_n,
            "z_nk": z_nk,
        }

    def validate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch_idx: int,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        batch_index_n: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_index_nd: torch.Tensor | None = None,
        total_mrna_umis_n: torch.Tensor | None = None,
        validation_cell_type_index_n: torch.Tensor | None = None,
    ) -> None:
        """Log the validation loss and its terms; feed the cell type metrics when labels are given.

        ``validation_cell_type_index_n``: each cell's index into ``cell_type_categories``, -1 for an
        unlabelled cell. With ``cell_type_categories`` set, the latent means of the labelled cells
        of even-numbered validation batches go to the classifier's training reservoir, those of
        odd-numbered batches to its test reservoir (each at most
        ``val_cell_type_classifier_reservoir_size`` cells, uniformly sampled), and every labelled
        cell adds to its type's latent centroid. At the end of the epoch (``on_validation_epoch_end``,
        after gathering the ranks' reservoirs and sums) a logistic regression is fitted on the
        training reservoir and ``val_cell_type_classifier_accuracy`` is its accuracy on the test
        reservoir; with an ``ontology_distance_matrix``, ``val_ontology_spearman`` is
        :func:`~cellarium_steps.models._latent_metrics.ontology_spearman` of the centroids.
        """
        output = self(x_ng, var_names_g, batch_index_n, continuous_covariates_nc, categorical_covariate_index_nd,
                      total_mrna_umis_n)
        n_cells = x_ng.shape[0]
        pl_module.log("val_loss", output["loss"], sync_dist=True, on_epoch=True, batch_size=n_cells)
        pl_module.log("val_reconstruction_loss", output["reconstruction_loss"].mean(), sync_dist=True,
                      on_epoch=True, batch_size=n_cells)
        pl_module.log("val_kl_divergence_z", output["kl_divergence_z"].mean(), sync_dist=True, on_epoch=True,
                      batch_size=n_cells)
        if self.cell_type_categories is None or validation_cell_type_index_n is None:
            return
        state = self._validation_state(trainer)
        state.add(self._last_qz_loc_nk, validation_cell_type_index_n, train=batch_idx % 2 == 0)

    def _validation_state(self, trainer: pl.Trainer | None) -> ValidationState:
        if self._val_state is None:
            assert self.cell_type_categories is not None
            epoch = int(getattr(trainer, "current_epoch", 0) or 0)
            rank = int(getattr(trainer, "global_rank", 0) or 0)
            self._val_state = ValidationState(
                len(self.cell_type_categories), self.n_latent, self.val_cell_type_classifier_reservoir_size,
                seed=(epoch * 1009 + rank) * 7919 + 17,
            )
        return self._val_state

    def on_validation_epoch_start(self, trainer: pl.Trainer) -> None:
        self._val_state = None

    def on_validation_epoch_end(self, trainer: pl.Trainer) -> None:
        """Fit and score the cell type classifier, compute the ontology Spearman, and log both."""
        state, self._val_state = self._val_state, None
        if self.cell_type_categories is None:
            return
        metrics = self.validation_cell_type_metrics(state, trainer)
        pl_module = getattr(trainer, "lightning_module", None)
        if pl_module is None:
            return
        for name, value in metrics.items():
            if not math.isnan(value):
                pl_module.log(name, value, sync_dist=True, on_epoch=True)

    def validation_cell_type_metrics(
        self, state: ValidationState | None, trainer: pl.Trainer | None = None
    ) -> dict[str, float]:
        """``val_cell_type_classifier_accuracy`` and ``val_ontology_spearman`` of an epoch's state (NaN if undefined).

        Under DDP the ranks' reservoirs and centroid sums are gathered first, so every rank
        fits the same classifier on the union of the reservoirs and gets the same numbers.
        """
        assert self.cell_type_categories is not None
        if state is None:  # no labelled validation cell here; the collectives still need this rank
            state = ValidationState(len(self.cell_type_categories), self.n_latent,
                                    self.val_cell_type_classifier_reservoir_size, seed=0)
        world_size = int(getattr(trainer, "world_size", 1) or 1)
        return cell_type_metrics(state, self.ontology_distance_cc, world_size)

    @torch.no_grad()
    def predict(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        batch_index_n: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_index_nd: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"x_ng": latent means (n, n_latent)}``, or reconstructed counts with ``reconstruct_counts_on_predict``.

        The latent mean, not a sample, so that an embedding is a deterministic function of the cell.
        """
        if self.reconstruct_counts_on_predict:
            return self.reconstruct(
                x_ng, var_names_g, self.reconstruction_gene_inds, batch_index_n, continuous_covariates_nc,
                categorical_covariate_index_nd,
                transform_batch=self.reconstruction_transform_batch,
                transform_categorical_covariates=self.reconstruction_transform_categorical_covariates,
                use_latent_mean=self.reconstruction_use_latent_mean,
                n_latent_samples=self.reconstruction_n_latent_samples,
                use_importance_sampling=self.reconstruction_use_importance_sampling,
                reconstructed_library_size=self.reconstructed_library_size,
            )
        x_ng, batch_index_n, continuous_nc, categorical_index_nd = self._prepare(
            x_ng, var_names_g, batch_index_n, continuous_covariates_nc, categorical_covariate_index_nd
        )
        batch_nb = self.batch_representation_from_batch_index(batch_index_n, use_mean_though_sampling=True)
        categorical_np = self.categorical_onehot_from_categorical_index(categorical_index_nd)
        return {"x_ng": self.inference(x_ng, batch_nb, continuous_nc, categorical_np)["qz"].loc}

    @torch.no_grad()
    def reconstruct(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray,
        gene_inds: np.ndarray | list[int],
        batch_index_n: torch.Tensor,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_index_nd: torch.Tensor | None = None,
        transform_batch: str | int | None = None,
        transform_categorical_covariates: list[int] | None = None,
        use_latent_mean: bool = False,
        n_latent_samples: int = 1000,
        use_importance_sampling: bool = False,
        reconstructed_library_size: float = 10000,
    ) -> dict[str, torch.Tensor]:
        """Expected counts at a common library size, optionally in another batch (scvi-tools' strategy).

        Encode each cell (with its own batch), draw ``n_latent_samples`` latents (or take the mean),
        decode each in every target batch (``None``: the cell's own; an int; ``"mean"``: the first
        ``min(10, n_batch)`` batches) at library size ``reconstructed_library_size``, and average the
        decoded means over target batches and latent samples. With ``use_importance_sampling`` the
        samples are weighted by ``p(x | z) p(z) / q(z | x)`` (with the cell's own batch and library),
        normalised per cell. Samples are decoded in chunks, so memory does not grow with
        ``n_latent_samples``.

        Returns:
            ``{"x_ng": (n, len(gene_inds))}``, columns in the order of ``gene_inds``.
        """
        x_ng, batch_index_n, continuous_nc, categorical_index_nd = self._prepare(
            x_ng, var_names_g, batch_index_n, continuous_covariates_nc, categorical_covariate_index_nd
        )
        return reconstruct_counts(
            self, x_ng, gene_inds, batch_index_n, continuous_nc, categorical_index_nd,
            transform_batch=transform_batch, transform_categorical_covariates=transform_categorical_covariates,
            use_latent_mean=use_latent_mean, n_latent_samples=n_latent_samples,
            use_importance_sampling=use_importance_sampling, reconstructed_library_size=reconstructed_library_size,
        )
