"""scVI's distributions: negative binomial and Poisson likelihoods (also from non-zero entries), the flow prior.

Used by :class:`~cellarium_steps.models.scvi.SingleCellVariationalInference`; the negative binomial
is scvi-tools' expression and ``eps``, so losses agree with scvi-tools to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, Gamma, constraints
from torch.distributions.utils import broadcast_all

#: the flow prior: spline coupling layers (each dimension is transformed by half of them) and spline shape.
FLOW_N_COUPLINGS = 4
FLOW_COUNT_BINS = 8
FLOW_BOUND = 5.0


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
