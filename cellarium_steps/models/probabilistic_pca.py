"""Probabilistic PCA in Pyro: the marginalized model of Tipping & Bishop and the linear VAE of Lucas et al.

The model is trained by stochastic gradient descent on mini-batches, so it scales to datasets that do not
fit in memory: each batch's negative log-likelihood (or negative ELBO) is scaled by ``n_obs / batch_size``
through a subsampled ``pyro.plate``, which makes the mini-batch loss an unbiased estimate of the loss of the
full dataset. The principal components are read off the learned loading matrix ``W_kg`` afterwards.
"""

from __future__ import annotations

from abc import ABCMeta
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints, transform_to

from cellarium_steps.models._tensors import densify
from cellarium_steps.models.base import CellariumModel, PredictMixin, check_var_names

PPCAFlavor = Literal["marginalized", "linear_vae"]


class _PyroABCMeta(type(PyroModule), ABCMeta):  # type: ignore[misc]
    """Lets a class be both a :class:`PyroModule` and an abstract :class:`CellariumModel`.

    ``PyroModule`` and ``CellariumModel`` each bring their own metaclass; Python needs one metaclass that
    derives from both before a class may inherit from both.
    """


class ProbabilisticPCA(CellariumModel, PredictMixin, PyroModule, metaclass=_PyroABCMeta):
    """Probabilistic PCA implemented in Pyro.

    Two flavors of probabilistic PCA are available - marginalized pPCA [1] and linear VAE [2].

    ``marginalized``: the latent factors are integrated out analytically, so each cell is
    ``x_g ~ MVN(mean_g, W_kg^T W_kg + sigma^2 I_g)`` and the loss is the exact negative log-likelihood.
    The covariance is used in its low-rank-plus-diagonal form, so a step costs ``O(n g k)`` rather than
    ``O(g^3)``. Its maximum-likelihood solution (Tipping & Bishop) has ``W_kg^T W_kg + sigma^2`` sharing the
    top ``k`` eigenpairs of the sample covariance, and ``sigma^2`` equal to the mean of the discarded
    eigenvalues; so ``L_k`` converges to the top ``k`` PC variances.

    ``linear_vae``: ``z_k ~ N(0, I)``, ``x_g | z_k ~ N(mean_g + z_k W_kg, sigma^2)``, trained by the ELBO with an
    amortized linear Gaussian encoder ``q(z_k | x_g) = N((x_g - mean_g) V_gk, diag(D_k^2))`` with learnable
    ``V_gk`` and ``D_k`` (``D_k`` is the standard deviation). Lucas et al. show that its stationary points
    coincide with the marginalized model's, so it recovers the same ``L_k``; it is the linear special case of
    a VAE, useful to check VAE machinery against a known answer. Its loss is stochastic (one reparameterized
    sample of ``z`` per cell).

    **References:**

    1. Probabilistic Principal Component Analysis (Tipping et al.).
    2. Understanding Posterior Collapse in Generative Latent Variable Models (Lucas et al.).

    Args:
        n_obs:
            Number of cells in the full dataset; the mini-batch loss is scaled to it.
        var_names_g:
            The variable names schema for the input data validation.
        n_components:
            Number of principal components ``k``.
        ppca_flavor:
            Type of the PPCA model. Has to be one of ``marginalized`` or ``linear_vae``.
        mean_g:
            Mean gene expression of the input data; kept fixed (a buffer). If ``None`` then the mean is a
            learnable parameter initialized at zero.
        W_init_scale:
            Standard deviation of the random normal initialization of ``W_kg``.
        sigma_init_scale:
            Initialization value of the ``sigma`` parameter (the noise standard deviation).
        seed:
            Random seed used to initialize parameters. A local :class:`torch.Generator` is used, so the
            initialization neither depends on nor disturbs the global random state.
    """

    def __init__(
        self,
        n_obs: int,
        var_names_g: Sequence[str] | np.ndarray,
        n_components: int,
        ppca_flavor: PPCAFlavor,
        mean_g: torch.Tensor | None = None,
        W_init_scale: float = 1.0,
        sigma_init_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if ppca_flavor not in ("marginalized", "linear_vae"):
            raise ValueError(f"ppca_flavor must be 'marginalized' or 'linear_vae', got {ppca_flavor!r}")
        if n_components < 1:
            raise ValueError(f"n_components must be positive, got {n_components}")
        if n_obs < 1:
            raise ValueError(f"n_obs must be positive, got {n_obs}")
        if sigma_init_scale <= 0:
            raise ValueError(f"sigma_init_scale must be positive, got {sigma_init_scale}")

        self.n_obs = int(n_obs)
        self.var_names_g = np.asarray(var_names_g)
        self.n_vars = len(self.var_names_g)
        self.n_components = int(n_components)
        self.ppca_flavor: PPCAFlavor = ppca_flavor
        self.W_init_scale = float(W_init_scale)
        self.sigma_init_scale = float(sigma_init_scale)
        self.seed = int(seed)
        # One plate (cells); declaring it saves Trace_ELBO a trial run of model and guide on the first call.
        self.elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)

        dtype = torch.get_default_dtype()
        self.mean_g: torch.Tensor
        if mean_g is None:
            self.mean_g = torch.nn.Parameter(torch.zeros(self.n_vars, dtype=dtype))
        else:
            mean = torch.as_tensor(mean_g, dtype=dtype).detach()
            if mean.dim() == 0:
                mean = mean.expand(self.n_vars)
            if mean.shape != (self.n_vars,):
                raise ValueError(f"mean_g must have shape ({self.n_vars},), got {tuple(mean.shape)}")
            self.register_buffer("mean_g", mean.clone())

        self.W_kg = torch.nn.Parameter(torch.zeros(self.n_components, self.n_vars, dtype=dtype))
        # PyroParam stores log(sigma) as ``sigma_unconstrained``; ``self.sigma`` is always positive.
        self.sigma = PyroParam(torch.ones((), dtype=dtype), constraint=constraints.positive)
        if self.ppca_flavor == "linear_vae":
            self.V_gk = torch.nn.Parameter(torch.zeros(self.n_vars, self.n_components, dtype=dtype))
            self.D_k = PyroParam(torch.ones(self.n_components, dtype=dtype), constraint=constraints.positive)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialize the parameters deterministically from ``seed``.

        ``W_kg`` is drawn on the CPU from a local generator and then copied to the parameter's device, so the
        same seed gives the same initialization on every device. A learnable ``mean_g`` restarts at zero; a
        given ``mean_g`` is data, not a parameter, and is left as it is. For ``linear_vae`` the encoder starts
        at the exact mean-field posterior of the initial decoder (``V_gk = W_kg^T M_kk^-1``,
        ``D_k = sigma / sqrt(diag M_kk)``): a random encoder would give a very noisy initial ELBO, and a
        zero encoder would start at posterior collapse.
        """
        rng = torch.Generator(device="cpu")
        rng.manual_seed(self.seed)
        if isinstance(self.mean_g, torch.nn.Parameter):
            self.mean_g.zero_()
        W_kg = torch.randn(self.n_components, self.n_vars, generator=rng, dtype=torch.float64) * self.W_init_scale
        self.W_kg.copy_(W_kg)
        positive = transform_to(constraints.positive)
        sigma = torch.tensor(self.sigma_init_scale, dtype=torch.float64)
        self.sigma_unconstrained.copy_(positive.inv(sigma))
        if self.ppca_flavor == "linear_vae":
            M_kk = W_kg @ W_kg.T + sigma**2 * torch.eye(self.n_components, dtype=torch.float64)
            self.V_gk.copy_(torch.linalg.solve(M_kk, W_kg).T)
            self.D_k_unconstrained.copy_(positive.inv(sigma / torch.sqrt(torch.diagonal(M_kk))))

    def _check_input(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> torch.Tensor:
        """Validate the genes and return a dense batch in the parameters' dtype."""
        if x_ng.shape[1] != len(var_names_g):
            raise ValueError(f"x_ng has {x_ng.shape[1]} columns but var_names_g has {len(var_names_g)} names")
        check_var_names(self.var_names_g, np.asarray(var_names_g))
        # The low-rank likelihood touches every entry, so sparse batches are densified.
        return densify(x_ng).to(self.W_kg.dtype)

    def forward(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, torch.Tensor | None]:
        """Negative log-likelihood (``marginalized``) or negative ELBO (``linear_vae``), scaled to ``n_obs``.

        Args:
            x_ng:
                Gene expression matrix (dense or sparse CSR), typically log-normalized.
            var_names_g:
                The list of the variable names in the input data.

        Returns:
            A dictionary with the loss value.
        """
        x_ng = self._check_input(x_ng, var_names_g)
        # Module-local parameters: without this, Pyro routes PyroParams through its global param store, where
        # two models in one process would share ``sigma`` by name and an optimizer built from
        # ``self.parameters()`` could end up holding a stale tensor.
        with pyro.settings.context(module_local_params=True):
            loss = self.elbo.differentiable_loss(self.model, self.guide, x_ng)
        return {"loss": loss}

    def _cells_plate(self, x_ng: torch.Tensor) -> pyro.plate:
        """The cell plate, scaled by ``n_obs / batch_size``.

        The subsample indices are passed explicitly: the model never indexes with them, and leaving them to
        Pyro would draw ``randperm(n_obs)`` on every step, an ``O(n_obs)`` cost and a draw from the global RNG.
        """
        n = x_ng.shape[0]
        return pyro.plate(
            "cells", size=self.n_obs, subsample_size=n, subsample=torch.arange(n, device=x_ng.device)
        )

    def model(self, x_ng: torch.Tensor) -> None:
        """The generative model; ``x_ng`` is observed."""
        with self._cells_plate(x_ng):
            if self.ppca_flavor == "marginalized":
                pyro.sample(
                    "counts",
                    dist.LowRankMultivariateNormal(
                        loc=self.mean_g,
                        cov_factor=self.W_kg.T,
                        cov_diag=self.sigma**2 * x_ng.new_ones(self.n_vars),
                    ),
                    obs=x_ng,
                )
            else:
                z_nk = pyro.sample("z", dist.Normal(x_ng.new_zeros(self.n_components), 1.0).to_event(1))
                pyro.sample(
                    "counts",
                    dist.Normal(self.mean_g + z_nk @ self.W_kg, self.sigma).to_event(1),
                    obs=x_ng,
                )

    def guide(self, x_ng: torch.Tensor) -> None:
        """The amortized linear Gaussian encoder of ``linear_vae``; nothing for ``marginalized``."""
        if self.ppca_flavor == "marginalized":
            return
        with self._cells_plate(x_ng):
            pyro.sample("z", dist.Normal((x_ng - self.mean_g) @ self.V_gk, self.D_k).to_event(1))

    @property
    def M_kk(self) -> torch.Tensor:
        """``W_kg W_kg^T + sigma^2 I_k``: ``sigma^2 M_kk^-1`` is the posterior covariance of ``z``."""
        eye_kk = torch.eye(self.n_components, dtype=self.W_kg.dtype, device=self.W_kg.device)
        return self.W_kg @ self.W_kg.T + self.sigma**2 * eye_kk

    @torch.no_grad()
    def predict(self, x_ng: torch.Tensor, var_names_g: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
        """Centering and embedding of the input data ``x_ng`` into the principal component space.

        For ``marginalized`` this is the exact posterior mean ``E[z | x] = (x - mean) W^T M^-1``; for
        ``linear_vae`` it is the encoder's mean ``(x - mean) V``, which is what that model was trained to
        produce (the two agree at the optimum).

        .. note::
           Gradients are disabled, used for inference only.

        Args:
            x_ng:
                Gene expression matrix (dense or sparse CSR).
            var_names_g:
                The list of the variable names in the input data.

        Returns:
            A dictionary with the following keys:

            - ``z_nk``: Embedding of the input data into the principal component space.
        """
        x_ng = self._check_input(x_ng, var_names_g)
        xc_ng = x_ng - self.mean_g
        if self.ppca_flavor == "linear_vae":
            return {"z_nk": xc_ng @ self.V_gk}
        # M_kk is symmetric, so (xc W^T) M^-1 = (M^-1 W xc^T)^T.
        z_nk = torch.linalg.solve(self.M_kk, self.W_kg @ xc_ng.T).T
        return {"z_nk": z_nk}

    @property
    @torch.no_grad()
    def L_k(self) -> torch.Tensor:
        """Vector with elements given by the PC eigenvalues, in decreasing order.

        These are the top ``k`` eigenvalues of the model covariance ``W^T W + sigma^2 I``, i.e. the squared
        singular values of ``W`` plus ``sigma^2``; at the maximum-likelihood solution they equal the top ``k``
        eigenvalues of the data covariance (the PC variances).

        .. note::
           Gradients are disabled, used for inference only.
        """
        S_k = torch.linalg.svdvals(self.W_kg.T)
        return S_k**2 + self.sigma**2

    @property
    @torch.no_grad()
    def U_gk(self) -> torch.Tensor:
        """Principal components corresponding to eigenvalues ``L_k``: the left singular vectors of ``W^T``.

        ``W`` is identifiable only up to a rotation of the latent space, but its column space and singular
        vectors are not, so these are the PC directions (each up to sign).

        .. note::
           Gradients are disabled, used for inference only.
        """
        return torch.linalg.svd(self.W_kg.T, full_matrices=False).U

    @property
    @torch.no_grad()
    def W_variance(self) -> float:
        """Total variance carried by the loadings, ``trace(W^T W)`` (= sum of squared ``W``), as cellarium-ml.

        Together with :attr:`sigma_variance` it splits the model's total variance,
        ``trace(W^T W + sigma^2 I) = W_variance + sigma_variance``; at the optimum that equals the data's total
        variance, so ``W_variance / (W_variance + sigma_variance)`` is the fraction explained by ``k`` PCs.

        .. note::
           Gradients are disabled, used for inference only.
        """
        return torch.sum(self.W_kg**2).item()

    @property
    @torch.no_grad()
    def sigma_variance(self) -> float:
        """Total isotropic noise variance, ``n_vars * sigma^2``, as cellarium-ml defines it.

        It is summed over genes (not the per-gene ``sigma^2``) so that it adds up with :attr:`W_variance`
        to the model's total variance. The per-gene noise variance is ``sigma_variance / n_vars``.

        .. note::
           Gradients are disabled, used for inference only.
        """
        return (self.n_vars * self.sigma**2).item()
