"""Single-cell variational inference (scVI), with encoder and decoder described by dicts.

The numbers are scvi-tools' ``VAE`` (module ``scvi.module.VAE``) where the architectures agree:
the same layers, initialisation, dressing (batch norm, layer norm, ReLU, dropout), observed
library size, negative binomial log-likelihood (with scvi-tools' ``eps=1e-8``) and KL warm-up
schedule, so weights copied from a trained ``scvi.model.SCVI`` give the same loss, latent
means and gradients (see ``tests/test_scvi.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Gamma, Normal, Poisson, constraints
from torch.distributions import kl_divergence as kl
from torch.distributions.utils import broadcast_all

from cellarium_steps.models._scvi_layers import (
    HiddenStack,
    LinearWithBatch,
    LinearWithBatchAndCovariates,
    apply_layer,
    build_layer,
    check_architecture_dict,
)
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

#: scvi-tools' floor on the encoder's variance.
VAR_EPS = 1e-4
#: the additive bias (``final_additive_bias``) starts near zero counts: softplus(-6.9) ~ 1e-3.
ADDITIVE_BIAS_INIT = math.log(math.expm1(1e-3))
#: "mean" reconstructs in at most this many batches (the API's "first 10 batches").
MEAN_TRANSFORM_MAX_BATCHES = 10
#: the flow prior: spline coupling layers (each dimension is transformed by half of them) and spline shape.
FLOW_N_COUPLINGS = 4
FLOW_COUNT_BINS = 8
FLOW_BOUND = 5.0
#: reconstruct() decodes latent samples in chunks of at most this many (cells x genes x samples) values.
RECONSTRUCT_CHUNK_ELEMENTS = 2**24


def scvi_tools_default_architecture(n_hidden: int = 128, n_layers: int = 1) -> tuple[dict, dict]:
    """Encoder and decoder dicts of scvi-tools' default ``VAE``.

    The encoder sees only the (log1p) counts (``encode_covariates=False``); each decoder hidden
    layer sees the batch and categorical covariates (``deeply_inject_covariates=True``); the
    normalized-expression head is a plain linear layer.
    """
    encoder = {
        "hidden_layers": [{"class_path": "Linear", "init_args": {"out_features": n_hidden}} for _ in range(n_layers)],
        "final_layer": {"class_path": "Linear", "init_args": {}},
    }
    decoder = {
        "hidden_layers": [
            {"class_path": "LinearWithBatchAndCovariates", "init_args": {"out_features": n_hidden}}
            for _ in range(n_layers)
        ],
        "final_layer": {"class_path": "Linear", "init_args": {}},
        "final_additive_bias": False,
    }
    return encoder, decoder


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative binomial log-likelihood in the (mean, inverse dispersion) parametrisation.

    The same expression and ``eps`` as scvi-tools, so that the losses agree to rounding.
    """
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_nb_positive_sum(
    row_e: torch.Tensor, col_e: torch.Tensor, x_e: torch.Tensor, mu_ng: torch.Tensor, theta: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-cell sum over genes of :func:`log_nb_positive`, given the counts as their non-zero entries.

    The same expression, split by where it is non-zero: for ``x = 0`` only
    ``theta * (log(theta + eps) - log(theta + mu + eps))`` remains (the lgamma terms cancel), so
    that part is dense and everything with ``x`` (lgammas and logs) runs on the stored entries
    only. ``theta`` is per gene (shape ``(g,)``) or per cell and gene (``(n, g)``).
    """
    n_cells, n_genes = mu_ng.shape
    flat_e = row_e * n_genes + col_e
    mu_e = mu_ng.reshape(-1).index_select(0, flat_e)
    if theta.dim() == 1:
        theta_eps_g = theta + eps
        # sum_g theta_g log(theta_g + eps) is the same for every cell.
        dense_n = (theta * torch.log(theta_eps_g)).sum() - torch.log(mu_ng + theta_eps_g) @ theta
        theta_e = theta.index_select(0, col_e)
        # Per entry, not lgamma(theta) per gene gathered: the gradient then differences digamma(x + theta)
        # and digamma(theta) entry by entry, as the dense expression does, instead of two large sums.
        lgamma_theta_e = torch.lgamma(theta_e)
        log_theta_mu_eps_e = torch.log(mu_e + theta_eps_g.index_select(0, col_e))
    else:
        log_theta_mu_eps_ng = torch.log(theta + mu_ng + eps)
        dense_n = (theta * (torch.log(theta + eps) - log_theta_mu_eps_ng)).sum(-1)
        theta_e = theta.reshape(-1).index_select(0, flat_e)
        lgamma_theta_e = torch.lgamma(theta_e)
        log_theta_mu_eps_e = log_theta_mu_eps_ng.reshape(-1).index_select(0, flat_e)
    sparse_e = (
        x_e * (torch.log(mu_e + eps) - log_theta_mu_eps_e)
        + torch.lgamma(x_e + theta_e)
        - lgamma_theta_e
        - torch.lgamma(x_e + 1)
    )
    return dense_n + torch.zeros(n_cells, dtype=sparse_e.dtype, device=sparse_e.device).index_add(0, row_e, sparse_e)


def log_poisson_sum(
    row_e: torch.Tensor, col_e: torch.Tensor, x_e: torch.Tensor, rate_ng: torch.Tensor
) -> torch.Tensor:
    """Per-cell sum over genes of ``Poisson(rate).log_prob(x)``, given the counts' non-zero entries."""
    n_cells, n_genes = rate_ng.shape
    rate_e = rate_ng.reshape(-1).index_select(0, row_e * n_genes + col_e)
    sparse_e = x_e * torch.log(rate_e) - torch.lgamma(x_e + 1)
    return -rate_ng.sum(-1) + torch.zeros(n_cells, dtype=sparse_e.dtype, device=sparse_e.device).index_add(
        0, row_e, sparse_e
    )


class NegativeBinomial(Distribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta`` (scvi-tools' parametrisation)."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.greater_than_eq(0)}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8, validate_args: bool = False) -> None:
        self._theta_given = theta  # before broadcasting: per gene when the dispersion is
        self.mu, self.theta = broadcast_all(mu, theta)
        self.eps = eps
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            rate = Gamma(self.theta, self.theta / (self.mu + self.eps)).sample(sample_shape)
            return torch.poisson(rate)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_nb_positive(value, self.mu, self.theta, self.eps)

    def log_prob_sum(self, row_e: torch.Tensor, col_e: torch.Tensor, value_e: torch.Tensor) -> torch.Tensor:
        """``log_prob(x).sum(-1)`` for a 2-d batch ``x`` given by its non-zero entries (see :func:`log_nb_positive_sum`)."""
        theta = self._theta_given
        if not (theta.dim() == 1 and theta.shape[0] == self.mu.shape[-1]):
            theta = self.theta
        return log_nb_positive_sum(row_e, col_e, value_e, self.mu, theta, self.eps)


class SplineFlowPrior(nn.Module):
    """An unconditional neural spline flow prior p(z) on the latent space, from Pyro's transforms.

    ``z = f(u)``, ``u ~ N(0, I)``, with ``f`` an elementwise rational-quadratic spline followed by
    ``FLOW_N_COUPLINGS`` spline coupling layers (Durkan et al. 2019) whose conditioner networks
    have ``hidden_features`` hidden units; the coordinates are reversed between couplings so every
    dimension is transformed conditionally on the others. Splines act on ``[-FLOW_BOUND, FLOW_BOUND]``
    and are the identity outside, so far-out latents keep a Gaussian tail.
    """

    def __init__(self, n_latent: int, hidden_features: Sequence[int]) -> None:
        super().__init__()
        from pyro.distributions.transforms import Spline, spline_coupling

        self.n_latent = n_latent
        self.elementwise = Spline(n_latent, count_bins=FLOW_COUNT_BINS, bound=FLOW_BOUND)
        self.couplings = nn.ModuleList(
            spline_coupling(n_latent, hidden_dims=list(hidden_features), count_bins=FLOW_COUNT_BINS, bound=FLOW_BOUND)
            for _ in range(FLOW_N_COUPLINGS if n_latent >= 2 else 0)
        )
        self.reverse_k: torch.Tensor
        self.register_buffer("reverse_k", torch.arange(n_latent - 1, -1, -1), persistent=False)

    def reset_parameters(self) -> None:
        # Pyro's own initialisation of the spline knots.
        for name in ("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives"):
            nn.init.normal_(getattr(self.elementwise, name))
        for module in self.couplings.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def distribution(self) -> Distribution:
        import pyro.distributions as pdist
        from pyro.distributions.transforms import Permute

        loc_k = torch.zeros(self.n_latent, device=self.reverse_k.device)
        base = pdist.Normal(loc_k, torch.ones_like(loc_k)).to_event(1)
        transforms: list[Any] = [self.elementwise]
        for coupling in self.couplings:
            transforms += [coupling, Permute(self.reverse_k)]
        return pdist.TransformedDistribution(base, transforms)

    def log_prob(self, z_nk: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(z_nk)


class EncoderSCVI(nn.Module):
    """q(z | x): hidden stack, then two copies of the final layer for the mean and the log-variance."""

    def __init__(
        self,
        in_features: int,
        n_latent: int,
        spec: Mapping[str, Any],
        *,
        n_batch_features: int,
        n_categorical_features: int,
        use_batch_norm: bool,
        use_layer_norm: bool,
        dropout_rate: float,
    ) -> None:
        super().__init__()
        self.hidden = HiddenStack(
            in_features, spec["hidden_layers"], n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, dropout_rate=dropout_rate, where="encoder",
        )
        build = dict(out_features=n_latent, n_batch_features=n_batch_features,
                     n_categorical_features=n_categorical_features, where="encoder.final_layer")
        self.mean_layer = build_layer(spec["final_layer"], self.hidden.out_features, **build)  # type: ignore[arg-type]
        self.var_layer = build_layer(spec["final_layer"], self.hidden.out_features, **build)  # type: ignore[arg-type]

    def forward(
        self, x_ng: torch.Tensor, batch_nb: torch.Tensor | None, categorical_np: torch.Tensor | None
    ) -> Normal:
        q_nh = self.hidden(x_ng, batch_nb, categorical_np)
        mean_nk = apply_layer(self.mean_layer, q_nh, batch_nb, categorical_np)
        var_nk = torch.exp(apply_layer(self.var_layer, q_nh, batch_nb, categorical_np)) + VAR_EPS
        return Normal(mean_nk, var_nk.sqrt())


class DecoderSCVI(nn.Module):
    """p(x | z): hidden stack, normalized expression head, optional per-cell dispersion and additive bias."""

    def __init__(
        self,
        in_features: int,
        n_genes: int,
        spec: Mapping[str, Any],
        *,
        n_batch_features: int,
        n_categorical_features: int,
        use_batch_norm: bool,
        use_layer_norm: bool,
        scale_activation: Literal["softmax", "softplus"],
        cell_dispersion: bool,
    ) -> None:
        super().__init__()
        self.hidden = HiddenStack(
            in_features, spec["hidden_layers"], n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, dropout_rate=0.0, where="decoder",
        )
        width = self.hidden.out_features
        self.scale_layer = build_layer(
            spec["final_layer"], width, out_features=n_genes, n_batch_features=n_batch_features,
            n_categorical_features=n_categorical_features, where="decoder.final_layer",
        )
        self.scale_activation = nn.Softmax(dim=-1) if scale_activation == "softmax" else nn.Softplus()
        # scvi-tools' px_r_decoder: a plain linear head, as for 'gene-cell' there.
        self.dispersion_layer = nn.Linear(width, n_genes) if cell_dispersion else None
        self.additive_bias_layer: nn.Linear | None = None
        self.n_batch_features = n_batch_features
        self.n_categorical_features = n_categorical_features
        if bool(spec.get("final_additive_bias", False)):
            # Without covariates it reads one zero column: a per-gene bias, and no zero-size weight for DDP.
            self.additive_bias_layer = nn.Linear(max(n_batch_features + n_categorical_features, 1), n_genes)

    def reset_additive_bias(self) -> None:
        if self.additive_bias_layer is not None:
            nn.init.zeros_(self.additive_bias_layer.weight)
            nn.init.constant_(self.additive_bias_layer.bias, ADDITIVE_BIAS_INIT)

    def forward(
        self,
        decoder_input_nk: torch.Tensor,
        library_size_n1: torch.Tensor,
        batch_nb: torch.Tensor | None,
        categorical_np: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(normalized expression, mean counts, log inverse dispersion per cell or None)."""
        q_nh = self.hidden(decoder_input_nk, batch_nb, categorical_np)
        scale_ng = self.scale_activation(apply_layer(self.scale_layer, q_nh, batch_nb, categorical_np))
        rate_ng = torch.exp(library_size_n1) * scale_ng
        if self.additive_bias_layer is not None:
            covariates = [t for t in (batch_nb, categorical_np) if t is not None and t.shape[-1] > 0]
            n_cells = decoder_input_nk.shape[0]
            covariates_nc = torch.cat(covariates, dim=-1) if covariates else decoder_input_nk.new_zeros(n_cells, 1)
            # Background counts per batch (and covariate), independent of the cell's state and depth.
            rate_ng = rate_ng + nn.functional.softplus(self.additive_bias_layer(covariates_nc.to(rate_ng.dtype)))
        log_theta_ng = self.dispersion_layer(q_nh) if self.dispersion_layer is not None else None
        return scale_ng, rate_ng, log_theta_ng


def _side(option: str, side: Literal["encoder", "decoder"], name: str) -> bool:
    if option not in ("encoder", "decoder", "none", "both"):
        raise ValueError(f"{name} must be 'encoder', 'decoder', 'none' or 'both', got {option!r}")
    return option in (side, "both")


# ---------------------------------------------------------------------------------------------------------------
# Validation metrics: a reservoir-sampled logistic regression on the latent means, and the ontology Spearman

#: the validation classifier: multinomial logistic regression on standardised latent means, fitted by L-BFGS.
CLASSIFIER_MAX_ITER = 200
CLASSIFIER_L2 = 1e-3


class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream (Vitter's algorithm R, vectorised per batch).

    After ``seen`` rows, every row seen so far is in the sample with probability ``size / seen``.
    Rows of one batch that draw the same slot resolve as the sequential algorithm would: the later wins.
    """

    def __init__(self, size: int, n_features: int, generator: torch.Generator) -> None:
        self.size = int(size)
        self.z_rk = torch.zeros(self.size, n_features)
        self.y_r = torch.zeros(self.size, dtype=torch.long)
        self.seen = 0
        self.generator = generator

    @property
    def fill(self) -> int:
        return min(self.seen, self.size)

    def add(self, z_nk: torch.Tensor, y_n: torch.Tensor) -> None:
        n = z_nk.shape[0]
        if n == 0:
            return
        z_nk, y_n = z_nk.detach().float().cpu(), y_n.detach().long().cpu()
        t_n = torch.arange(self.seen, self.seen + n)  # each row's 0-based position in the stream
        slot_n = t_n.clone()
        late_n = t_n >= self.size
        if bool(late_n.any()):
            # Row t replaces a uniform slot of [0, t] when that slot is inside the reservoir.
            u_n = torch.rand(int(late_n.sum()), generator=self.generator, dtype=torch.float64)
            slot_n[late_n] = torch.floor(u_n * (t_n[late_n] + 1).double()).long()
        kept = torch.nonzero(slot_n < self.size).flatten()
        if kept.numel():
            # The last row per slot wins, as in the sequential algorithm.
            slots = slot_n[kept].numpy()
            _, last_from_end = np.unique(slots[::-1], return_index=True)
            rows = torch.from_numpy(kept.numpy()[::-1][last_from_end].copy())
            self.z_rk[slot_n[rows]] = z_nk[rows]
            self.y_r[slot_n[rows]] = y_n[rows]
        self.seen += n

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z_rk[: self.fill], self.y_r[: self.fill]


class _ValidationState:
    """What one validation epoch accumulates: the two reservoirs and per-type latent sums."""

    def __init__(self, n_types: int, n_latent: int, reservoir_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.train = Reservoir(reservoir_size, n_latent, generator)
        self.test = Reservoir(reservoir_size, n_latent, generator)
        self.z_sum_ck = torch.zeros(n_types, n_latent, dtype=torch.float64)
        self.count_c = torch.zeros(n_types, dtype=torch.float64)


def fit_logistic_regression(
    z_nk: torch.Tensor, y_n: torch.Tensor, n_classes: int, max_iter: int = CLASSIFIER_MAX_ITER,
    l2: float = CLASSIFIER_L2,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression, returning a function from latents to class probabilities.

    Features are standardised with the training rows' mean and standard deviation; the weights
    (not the biases) get an L2 penalty ``l2 * ||W||^2 / 2``; L-BFGS with a strong-Wolfe line search
    minimises the mean cross-entropy. Deterministic (zero start). Classes absent from ``y_n`` get
    probability ~0.
    """
    with torch.inference_mode(False), torch.enable_grad():
        z_nk = z_nk.detach().double().clone()
        y_n = y_n.detach().long().clone()
        mean_k = z_nk.mean(0)
        std_k = z_nk.std(0, unbiased=False).clamp_min(1e-6)
        x_nk = (z_nk - mean_k) / std_k
        weight_kc = torch.zeros(x_nk.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias_c = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        absent_c = torch.bincount(y_n, minlength=n_classes) == 0
        optimizer = torch.optim.LBFGS([weight_kc, bias_c], max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits_nc = (x_nk @ weight_kc + bias_c).masked_fill(absent_c, -1e4)
            loss = nn.functional.cross_entropy(logits_nc, y_n) + 0.5 * l2 * weight_kc.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    weight_kc, bias_c = weight_kc.detach(), bias_c.detach()

    def predict_proba(z_mk: torch.Tensor) -> torch.Tensor:
        logits_mc = ((z_mk.double() - mean_k) / std_k) @ weight_kc + bias_c
        return torch.softmax(logits_mc.masked_fill(absent_c, -1e4), dim=-1)

    return predict_proba


def _average_ranks(values_m: torch.Tensor) -> torch.Tensor:
    """Ranks 0..m-1, ties sharing their average rank (as scipy.stats.rankdata - 1)."""
    order = torch.argsort(values_m, stable=True)
    sorted_m = values_m[order]
    ranks_m = torch.empty_like(values_m, dtype=torch.float64)
    m = values_m.numel()
    start = 0
    while start < m:
        end = start + 1
        while end < m and sorted_m[end] == sorted_m[start]:
            end += 1
        ranks_m[order[start:end]] = (start + end - 1) / 2.0
        start = end
    return ranks_m


def spearman_correlation(a_m: torch.Tensor, b_m: torch.Tensor) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either side is constant."""
    ra_m, rb_m = _average_ranks(a_m.double()), _average_ranks(b_m.double())
    ra_m, rb_m = ra_m - ra_m.mean(), rb_m - rb_m.mean()
    denominator = float(ra_m.norm() * rb_m.norm())
    return float((ra_m * rb_m).sum()) / denominator if denominator > 0 else math.nan


def ontology_spearman(z_sum_ck: torch.Tensor, count_c: torch.Tensor, distance_cc: torch.Tensor) -> float:
    """Frequency-weighted Spearman correlation between latent and ontology distances of the cell types.

    Each cell type present (``count_c > 0``) has a latent centroid. For each such type ``c``, rho_c is
    Spearman's correlation, over the other present types ``d`` with a finite ontology distance, between
    the centroid distance ``|mu_c - mu_d|`` and the ontology distance ``D[c, d]``: 1 when the latent
    space orders the other types as the ontology does, as seen from ``c``. The result is the mean of
    rho_c weighted by ``count_c``, over the types where rho_c is defined (at least two others, neither
    side constant); NaN when none is.
    """
    present = torch.nonzero(count_c > 0).flatten()
    if present.numel() < 3:
        return math.nan
    centroid_pk = (z_sum_ck[present] / count_c[present, None]).double()
    latent_pp = torch.cdist(centroid_pk, centroid_pk)
    ontology_pp = distance_cc[present][:, present].double().cpu()
    total, weight = 0.0, 0.0
    for i in range(present.numel()):
        others = torch.ones(present.numel(), dtype=torch.bool)
        others[i] = False
        others &= torch.isfinite(ontology_pp[i])
        if int(others.sum()) < 2:
            continue
        rho = spearman_correlation(latent_pp[i, others], ontology_pp[i, others])
        if math.isnan(rho):
            continue
        w = float(count_c[present[i]])
        total += w * rho
        weight += w
    return total / weight if weight > 0 else math.nan


def _collective_device() -> torch.device:
    """Where tensors must live for the process group's collectives (CUDA for nccl)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(z_rk: torch.Tensor, y_r: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's reservoir rows, concatenated in rank order (padded to ``size`` for the collective)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    device = _collective_device()
    fill = torch.tensor([z_rk.shape[0]], device=device)
    padded_z = torch.zeros(size, z_rk.shape[1], device=device)
    padded_z[: z_rk.shape[0]] = z_rk.to(device)
    padded_y = torch.zeros(size, dtype=torch.long, device=device)
    padded_y[: y_r.shape[0]] = y_r.to(device)
    fills = [torch.zeros_like(fill) for _ in range(world_size)]
    zs = [torch.zeros_like(padded_z) for _ in range(world_size)]
    ys = [torch.zeros_like(padded_y) for _ in range(world_size)]
    dist.all_gather(fills, fill)
    dist.all_gather(zs, padded_z)
    dist.all_gather(ys, padded_y)
    n = [int(f) for f in fills]
    return (torch.cat([z[:m] for z, m in zip(zs, n)]).cpu(), torch.cat([y[:m] for y, m in zip(ys, n)]).cpu())


def _ordered_distance_matrix(matrix: pd.DataFrame, categories: Sequence[str]) -> torch.Tensor:
    """``matrix`` restricted and reordered to ``categories`` on both axes, as a float64 tensor."""
    import pandas as pd

    if not isinstance(matrix, pd.DataFrame):
        raise TypeError("ontology_distance_matrix must be a pandas DataFrame indexed by cell type ids on both axes")
    missing = [c for c in categories if c not in matrix.index or c not in matrix.columns]
    if missing:
        raise ValueError(f"ontology_distance_matrix has no row or column for {missing[:5]}")
    values = matrix.loc[list(categories), list(categories)].to_numpy(dtype=np.float64)
    return torch.from_numpy(values.copy())


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

        if reconstruction_var_names_g is None:
            self.reconstruction_gene_inds = np.arange(self.n_genes)
        else:
            position = {name: i for i, name in enumerate(self.var_names_g)}
            missing = [name for name in reconstruction_var_names_g if name not in position]
            if missing:
                raise ValueError(
                    f"reconstruction_var_names_g: {len(missing)} genes are not in var_names_g, e.g. {missing[:5]}"
                )
            self.reconstruction_gene_inds = np.array(
                [position[name] for name in reconstruction_var_names_g], dtype=np.int64
            )

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
            use_batch_norm=_side(use_batch_norm, "encoder", "use_batch_norm"),
            use_layer_norm=_side(use_layer_norm, "encoder", "use_layer_norm"),
            dropout_rate=dropout_rate,
        )
        self.decoder = DecoderSCVI(
            self.n_latent + self.n_continuous_cov,
            self.n_genes,
            decoder_spec,
            n_batch_features=self.n_batch_features,
            n_categorical_features=self.n_categorical_features,
            use_batch_norm=_side(use_batch_norm, "decoder", "use_batch_norm"),
            use_layer_norm=_side(use_layer_norm, "decoder", "use_layer_norm"),
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
            else _ordered_distance_matrix(ontology_distance_matrix, self.cell_type_categories),
            persistent=False,
        )
        self._val_state: _ValidationState | None = None
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

    def _check_batch_index(
        self, batch_index_n: torch.Tensor | None, n_cells: int, device: torch.device
    ) -> torch.Tensor:
        n_allowed = max(self.n_batch, 1)
        if batch_index_n is None:
            if n_allowed > 1:
                raise ValueError(f"batch_index_n is required: the model has n_batch={self.n_batch}")
            return torch.zeros(n_cells, dtype=torch.long, device=device)
        batch_index_n = torch.as_tensor(batch_index_n, device=device).reshape(-1).long()
        if batch_index_n.shape[0] != n_cells:
            raise ValueError(f"batch_index_n has {batch_index_n.shape[0]} entries for {n_cells} cells")
        bad_n = (batch_index_n < 0) | (batch_index_n >= n_allowed)
        if n_cells and bool(bad_n.any()):
            i = int(torch.nonzero(bad_n)[0, 0])
            raise ValueError(
                f"batch index {int(batch_index_n[i])} (cell {i} of the minibatch) is outside [0, {n_allowed}): "
                f"the model was built with n_batch={self.n_batch}"
            )
        return batch_index_n

    def _check_categorical_index(
        self, categorical_covariate_index_nd: torch.Tensor | None, n_cells: int, device: torch.device
    ) -> torch.Tensor | None:
        if not self.n_cats_per_cov:
            return None
        if categorical_covariate_index_nd is None:
            raise ValueError(
                f"categorical_covariate_index_nd is required: the model has n_cats_per_cov={self.n_cats_per_cov}"
            )
        index_nd = torch.as_tensor(categorical_covariate_index_nd, device=device).long()
        if index_nd.dim() == 1:
            index_nd = index_nd[:, None]
        if tuple(index_nd.shape) != (n_cells, len(self.n_cats_per_cov)):
            raise ValueError(
                f"categorical_covariate_index_nd has shape {tuple(index_nd.shape)}, "
                f"expected ({n_cells}, {len(self.n_cats_per_cov)})"
            )
        for d, n_cats in enumerate(self.n_cats_per_cov):
            bad_n = (index_nd[:, d] < 0) | (index_nd[:, d] >= n_cats)
            if n_cells and bool(bad_n.any()):
                i = int(torch.nonzero(bad_n)[0, 0])
                raise ValueError(
                    f"categorical covariate {d}: index {int(index_nd[i, d])} (cell {i}) is outside [0, {n_cats})"
                )
        return index_nd

    def _check_continuous(
        self, continuous_covariates_nc: torch.Tensor | None, n_cells: int, device: torch.device
    ) -> torch.Tensor | None:
        if self.n_continuous_cov == 0:
            return None
        if continuous_covariates_nc is None:
            raise ValueError(
                f"continuous_covariates_nc is required: the model has n_continuous_cov={self.n_continuous_cov}"
            )
        if tuple(continuous_covariates_nc.shape) != (n_cells, self.n_continuous_cov):
            raise ValueError(
                f"continuous_covariates_nc has shape {tuple(continuous_covariates_nc.shape)}, "
                f"expected ({n_cells}, {self.n_continuous_cov})"
            )
        return torch.as_tensor(continuous_covariates_nc, device=device).float()

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
        batch_index_n = self._check_batch_index(batch_index_n, n_cells, x_ng.device)
        continuous_nc = self._check_continuous(continuous_covariates_nc, n_cells, x_ng.device)
        categorical_index_nd = self._check_categorical_index(categorical_covariate_index_nd, n_cells, x_ng.device)
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
        :func:`ontology_spearman` of the centroids.
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
        codes_n = torch.as_tensor(validation_cell_type_index_n).reshape(-1).long().cpu()
        n_types = len(self.cell_type_categories)
        bad_n = (codes_n < -1) | (codes_n >= n_types)
        if bool(bad_n.any()):
            i = int(torch.nonzero(bad_n)[0, 0])
            raise ValueError(
                f"validation_cell_type_index_n: {int(codes_n[i])} (cell {i} of the minibatch) is outside "
                f"[-1, {n_types}) for {n_types} cell_type_categories"
            )
        state = self._validation_state(trainer)
        labelled_n = codes_n >= 0
        z_mk = self._last_qz_loc_nk.detach().float().cpu()[labelled_n]
        y_m = codes_n[labelled_n]
        (state.train if batch_idx % 2 == 0 else state.test).add(z_mk, y_m)
        state.z_sum_ck.index_add_(0, y_m, z_mk.double())
        state.count_c.index_add_(0, y_m, torch.ones(y_m.shape[0], dtype=torch.float64))

    def _validation_state(self, trainer: pl.Trainer | None) -> _ValidationState:
        if self._val_state is None:
            assert self.cell_type_categories is not None
            epoch = int(getattr(trainer, "current_epoch", 0) or 0)
            rank = int(getattr(trainer, "global_rank", 0) or 0)
            self._val_state = _ValidationState(
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
        self, state: _ValidationState | None, trainer: pl.Trainer | None = None
    ) -> dict[str, float]:
        """``val_cell_type_classifier_accuracy`` and ``val_ontology_spearman`` of an epoch's state (NaN if undefined).

        Under DDP the ranks' reservoirs and centroid sums are gathered first, so every rank
        fits the same classifier on the union of the reservoirs and gets the same numbers.
        """
        assert self.cell_type_categories is not None
        n_types, k = len(self.cell_type_categories), self.n_latent
        if state is None:  # no labelled validation cell here; the collectives below still need this rank
            state = _ValidationState(n_types, k, self.val_cell_type_classifier_reservoir_size, seed=0)
        train_z, train_y = state.train.rows()
        test_z, test_y = state.test.rows()
        z_sum_ck, count_c = state.z_sum_ck, state.count_c
        world_size = int(getattr(trainer, "world_size", 1) or 1)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            train_z, train_y = _gather_rows(train_z, train_y, state.train.size)
            test_z, test_y = _gather_rows(test_z, test_y, state.test.size)
            device = _collective_device()
            z_sum_ck, count_c = z_sum_ck.to(device), count_c.to(device)
            for t in (z_sum_ck, count_c):
                torch.distributed.all_reduce(t)
            z_sum_ck, count_c = z_sum_ck.cpu(), count_c.cpu()
        metrics = {"val_cell_type_classifier_accuracy": math.nan, "val_ontology_spearman": math.nan}
        if train_y.numel() and test_y.numel() and int(torch.unique(train_y).numel()) >= 2:
            predict_proba = fit_logistic_regression(train_z, train_y, n_types)
            accuracy = (predict_proba(test_z).argmax(-1) == test_y).double().mean()
            metrics["val_cell_type_classifier_accuracy"] = float(accuracy)
        if self.ontology_distance_cc is not None:
            metrics["val_ontology_spearman"] = ontology_spearman(z_sum_ck, count_c, self.ontology_distance_cc)
        return metrics

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
        n_cells, device = x_ng.shape[0], x_ng.device
        gene_index_p = torch.as_tensor(np.asarray(gene_inds, dtype=np.int64), device=device).reshape(-1)
        if gene_index_p.numel() and (int(gene_index_p.min()) < 0 or int(gene_index_p.max()) >= self.n_genes):
            raise ValueError(f"gene_inds must be in [0, {self.n_genes})")
        if n_latent_samples < 1:
            raise ValueError(f"n_latent_samples must be positive, got {n_latent_samples}")

        n_allowed = max(self.n_batch, 1)
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

        categorical_np = self.categorical_onehot_from_categorical_index(categorical_index_nd)
        decoder_categorical_np = categorical_np
        if transform_categorical_covariates is not None:
            if len(transform_categorical_covariates) != len(self.n_cats_per_cov):
                raise ValueError(
                    f"transform_categorical_covariates needs one category per covariate ({len(self.n_cats_per_cov)}), "
                    f"got {list(transform_categorical_covariates)}"
                )
            fixed_d = torch.as_tensor(list(transform_categorical_covariates), device=device, dtype=torch.long)
            for d, (code, n_cats) in enumerate(zip(fixed_d.tolist(), self.n_cats_per_cov)):
                if not 0 <= code < n_cats:
                    raise ValueError(f"transform_categorical_covariates[{d}] = {code} is outside [0, {n_cats})")
            decoder_categorical_np = self.categorical_onehot_from_categorical_index(fixed_d.expand(n_cells, -1))
        elif transform_batch is not None and self.n_categorical_features and self._decoder_uses_categorical():
            raise ValueError(
                "transform_categorical_covariates is required with transform_batch when the decoder uses "
                "categorical covariates: a cell's observed categories may never occur in the target batch"
            )

        own_batch_nb = self.batch_representation_from_batch_index(batch_index_n, use_mean_though_sampling=True)
        inference_outputs = self.inference(x_ng, own_batch_nb, continuous_nc, categorical_np)
        qz: Normal = inference_outputs["qz"]
        targets = [
            (b_n, self.batch_representation_from_batch_index(b_n, use_mean_though_sampling=True))
            for b_n in target_batches_n
        ]
        library_n1 = torch.full((n_cells, 1), math.log(reconstructed_library_size), device=device)
        n_samples = 1 if use_latent_mean else int(n_latent_samples)
        chunk = max(1, min(n_samples, RECONSTRUCT_CHUNK_ELEMENTS // max(1, n_cells * self.n_genes * len(targets))))

        def repeat(t: torch.Tensor | None, s: int) -> torch.Tensor | None:
            return None if t is None else t.repeat(s, *([1] * (t.dim() - 1)))

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
                px = self.generative(
                    z_mk, repeat(library_n1, s), repeat(target_batch_nb, s), repeat(continuous_nc, s),
                    repeat(decoder_categorical_np, s), batch_index_n=repeat(target_batch_index_n, s),
                )["px"]
                mean_sp += px.mean[:, gene_index_p]
            mean_snp = (mean_sp / len(targets)).reshape(s, n_cells, -1)
            if use_importance_sampling and not use_latent_mean:
                log_weight_sn = self._log_importance_weights(
                    x_ng, z_mk, qz, inference_outputs["library_size_n1"], own_batch_nb, continuous_nc,
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

    def _decoder_uses_categorical(self) -> bool:
        layers = [m for m in self.decoder.modules() if isinstance(m, LinearWithBatch)]
        return any(layer.n_categorical_features for layer in layers) or self.decoder.additive_bias_layer is not None

    def _log_importance_weights(
        self,
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

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(s, *([1] * (t.dim() - 1)))

        outputs = self.generative(z_mk, repeat(library_size_n1), repeat(batch_nb), repeat(continuous_nc),
                                  repeat(categorical_np), batch_index_n=repeat(batch_index_n))
        log_px_m = outputs["px"].log_prob(repeat(x_ng)).sum(-1)
        log_pz_m = outputs["pz"].log_prob(z_mk)
        if log_pz_m.dim() == 2:
            log_pz_m = log_pz_m.sum(-1)
        z_snk = z_mk.reshape(s, n_cells, -1)
        log_qz_sn = qz.log_prob(z_snk).sum(-1)
        return (log_px_m + log_pz_m).reshape(s, n_cells) - log_qz_sn
