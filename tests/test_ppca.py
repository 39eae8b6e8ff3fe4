"""ProbabilisticPCA on real PBMC data: recovers the PCA spectrum, predicts, and behaves as a cellarium model.

The reference is exact: with ``mean_g`` fixed at the data mean, the maximum-likelihood pPCA solution has
``L_k`` equal to the top ``k`` eigenvalues of the (1/n) sample covariance and ``sigma^2`` equal to the mean of
the other ``g - k`` eigenvalues (Tipping & Bishop), so a float64 ``eigh`` is the ground truth.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pytest
import scipy.sparse as sp
import torch

from cellarium_steps.models import ProbabilisticPCA
from cellarium_steps.runner.module import CellariumModule

SHARED_PBMC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pbmc_multibatch_15493x7152_raw.h5ad"
N_CELLS, N_GENES, N_COMPONENTS = 2000, 200, 10


@dataclass(frozen=True)
class PBMCSubset:
    x_ng: np.ndarray  # float32, log1p(normalize_total(1e4)), top-variance genes
    csr: sp.csr_matrix  # the same matrix, sparse
    var_names_g: np.ndarray
    mean_g: np.ndarray  # float64 column means
    eigvals_g: np.ndarray  # float64 eigenvalues of the (1/n) covariance, decreasing

    @property
    def total_variance(self) -> float:
        return float(self.eigvals_g.sum())


@pytest.fixture(scope="module")
def pbmc() -> PBMCSubset:
    """2,000 random cells x the 200 most variable genes, normalized and log-transformed in numpy."""
    if not SHARED_PBMC.is_file():
        pytest.skip(f"shared PBMC data not found at {SHARED_PBMC.resolve()}")
    import anndata as ad

    adata = ad.read_h5ad(SHARED_PBMC)
    rng = np.random.default_rng(0)
    cells_n = np.sort(rng.choice(adata.n_obs, N_CELLS, replace=False))
    counts = sp.csr_matrix(adata.X[cells_n], dtype=np.float64)
    totals_n = np.asarray(counts.sum(axis=1)).ravel()
    assert totals_n.min() > 0
    x = sp.csr_matrix(sp.diags(1e4 / totals_n) @ counts)  # normalize_total(1e4)
    x.data = np.log1p(x.data)
    dense = x.toarray()
    genes_g = np.sort(np.argsort(dense.var(axis=0))[::-1][:N_GENES])
    x64 = dense[:, genes_g]
    mean_g = x64.mean(axis=0)
    centered = x64 - mean_g
    eigvals_g = np.linalg.eigvalsh(centered.T @ centered / N_CELLS)[::-1]
    x32 = x64.astype(np.float32)
    return PBMCSubset(
        x_ng=x32,
        csr=sp.csr_matrix(x32),
        var_names_g=adata.var_names.to_numpy()[genes_g].astype(str),
        mean_g=mean_g,
        eigvals_g=eigvals_g,
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: a step is a few small matmuls, and on a shared CPU extra threads made steps ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _csr_tensor(csr: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data),
        size=csr.shape,
        check_invariants=True,
    )


def _train(
    model: ProbabilisticPCA,
    x_ng: torch.Tensor,
    var_names_g: np.ndarray,
    n_steps: int,
    lr: float | dict[str, float],
) -> list[float]:
    """Full-batch Adam with a cosine decay: fast early progress, then a quiet finish.

    ``lr`` is one rate, or one per parameter name (``"*"`` for the rest), to give parameters of different
    scales different step sizes (Adam's steps are in parameter units).
    """
    if isinstance(lr, dict):
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            groups.setdefault(lr.get(name, lr["*"]), []).append(parameter)
        optimizer = torch.optim.Adam([{"params": params, "lr": rate} for rate, params in groups.items()])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps)
    losses = []
    # Pyro's per-step support checks of the (already validated) data cost ~30% of a step here.
    with pyro.validation_enabled(False):
        for _ in range(n_steps):
            optimizer.zero_grad()
            loss = model(x_ng, var_names_g)["loss"]
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def marginalized(pbmc: PBMCSubset) -> tuple[ProbabilisticPCA, list[float]]:
    model = ProbabilisticPCA(
        N_CELLS,
        pbmc.var_names_g,
        N_COMPONENTS,
        "marginalized",
        mean_g=torch.as_tensor(pbmc.mean_g),
        W_init_scale=0.1,
    )
    losses = _train(model, torch.from_numpy(pbmc.x_ng), pbmc.var_names_g, n_steps=500, lr=0.05)
    return model, losses


def test_marginalized_recovers_pca_spectrum(
    pbmc: PBMCSubset, marginalized: tuple[ProbabilisticPCA, list[float]]
) -> None:
    model, losses = marginalized
    assert losses[-1] < losses[0]

    L_k = model.L_k.double().numpy()
    np.testing.assert_allclose(L_k, pbmc.eigvals_g[:N_COMPONENTS], rtol=1e-3)
    assert np.all(np.diff(L_k) <= 0), "L_k is sorted in decreasing order"

    # sigma_variance is summed over genes (cellarium-ml): n_vars * sigma^2, sigma^2 = mean discarded eigenvalue.
    sigma2 = model.sigma_variance / N_GENES
    np.testing.assert_allclose(sigma2, pbmc.eigvals_g[N_COMPONENTS:].mean(), rtol=1e-2)
    # W_variance + sigma_variance = trace of the model covariance, which at the optimum is the data's total variance.
    np.testing.assert_allclose(model.W_variance + model.sigma_variance, pbmc.total_variance, rtol=1e-3)
    np.testing.assert_allclose(model.W_variance, (model.W_kg.detach().double() ** 2).sum().item(), rtol=1e-6)


def test_marginalized_principal_directions(
    pbmc: PBMCSubset, marginalized: tuple[ProbabilisticPCA, list[float]]
) -> None:
    model, _ = marginalized
    centered = pbmc.x_ng.astype(np.float64) - pbmc.mean_g
    _, eigvecs_gg = np.linalg.eigh(centered.T @ centered / N_CELLS)
    top_gk = eigvecs_gg[:, ::-1][:, :N_COMPONENTS]
    U_gk = model.U_gk.double().numpy()
    assert U_gk.shape == (N_GENES, N_COMPONENTS)
    np.testing.assert_allclose(U_gk.T @ U_gk, np.eye(N_COMPONENTS), atol=1e-5)
    # Each direction matches its eigenvector up to sign; the 10th is the least separated (eigen-gap 8%).
    abs_cos_k = np.abs(np.sum(U_gk * top_gk, axis=0))
    np.testing.assert_allclose(abs_cos_k, 1.0, atol=1e-2)
    assert abs_cos_k[:5].min() > 0.999


def test_predict_is_the_posterior_mean(pbmc: PBMCSubset, marginalized: tuple[ProbabilisticPCA, list[float]]) -> None:
    model, _ = marginalized
    x_ng = torch.from_numpy(pbmc.x_ng)
    z_nk = model.predict(x_ng, pbmc.var_names_g)["z_nk"]
    assert z_nk.shape == (N_CELLS, N_COMPONENTS)
    assert not z_nk.requires_grad

    # Closed form in float64 on a few cells: z = (x - mean) W^T (W W^T + sigma^2 I)^-1.
    W_kg = model.W_kg.detach().double().numpy()
    sigma2 = model.sigma.detach().double().item() ** 2
    cells = [0, 17, 1234, 1999]
    centered = pbmc.x_ng[cells].astype(np.float64) - pbmc.mean_g
    expected = centered @ W_kg.T @ np.linalg.inv(W_kg @ W_kg.T + sigma2 * np.eye(N_COMPONENTS))
    np.testing.assert_allclose(z_nk[cells].double().numpy(), expected, rtol=1e-4, atol=1e-4)

    sparse_z_nk = model.predict(_csr_tensor(pbmc.csr), pbmc.var_names_g)["z_nk"]
    torch.testing.assert_close(sparse_z_nk, z_nk)


def test_sparse_csr_loss_equals_dense(pbmc: PBMCSubset) -> None:
    for flavor in ("marginalized", "linear_vae"):
        model = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, N_COMPONENTS, flavor, mean_g=torch.as_tensor(pbmc.mean_g))
        torch.manual_seed(0)  # linear_vae draws z from the guide
        dense_loss = model(torch.from_numpy(pbmc.x_ng), pbmc.var_names_g)["loss"]
        torch.manual_seed(0)
        sparse_loss = model(_csr_tensor(pbmc.csr), pbmc.var_names_g)["loss"]
        torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("flavor", ["marginalized", "linear_vae"])
def test_loss_is_scaled_to_n_obs(pbmc: PBMCSubset, flavor: str) -> None:
    """A mini-batch's loss estimates the full dataset's: the batch's mean loss per cell times n_obs."""
    x_ng = torch.from_numpy(pbmc.x_ng[:100])
    mean_g = torch.as_tensor(pbmc.mean_g)
    small = ProbabilisticPCA(100, pbmc.var_names_g, N_COMPONENTS, flavor, mean_g=mean_g)
    large = ProbabilisticPCA(10**6, pbmc.var_names_g, N_COMPONENTS, flavor, mean_g=mean_g)
    torch.manual_seed(0)
    small_loss = small(x_ng, pbmc.var_names_g)["loss"]
    torch.manual_seed(0)
    large_loss = large(x_ng, pbmc.var_names_g)["loss"]
    torch.testing.assert_close(large_loss, 1e4 * small_loss)


@pytest.mark.parametrize("flavor", ["marginalized", "linear_vae"])
def test_same_seed_is_deterministic(pbmc: PBMCSubset, flavor: str) -> None:
    def build(seed: int) -> ProbabilisticPCA:
        return ProbabilisticPCA(N_CELLS, pbmc.var_names_g, N_COMPONENTS, flavor, W_init_scale=0.1, seed=seed)

    first, second, other = build(3), build(3), build(4)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.W_kg, other.W_kg)

    x_ng = torch.from_numpy(pbmc.x_ng[:256])
    torch.manual_seed(123)
    first_losses = _train(first, x_ng, pbmc.var_names_g, n_steps=10, lr=0.01)
    torch.manual_seed(123)
    second_losses = _train(second, x_ng, pbmc.var_names_g, n_steps=10, lr=0.01)
    assert first_losses == second_losses
    assert not torch.equal(first.W_kg, build(3).W_kg), "training moved W"

    # reset_parameters returns to the seeded initialization
    first.reset_parameters()
    for name, value in first.state_dict().items():
        assert torch.equal(value, build(3).state_dict()[name]), name


def test_learnable_mean_is_a_parameter_and_given_mean_a_buffer(pbmc: PBMCSubset) -> None:
    learned = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "marginalized")
    assert isinstance(learned.mean_g, torch.nn.Parameter)
    assert torch.equal(learned.mean_g.detach(), torch.zeros(N_GENES))
    fixed = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "marginalized", mean_g=torch.as_tensor(pbmc.mean_g))
    assert "mean_g" in dict(fixed.named_buffers())
    assert "mean_g" not in dict(fixed.named_parameters())
    names = {name for name, _ in ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "linear_vae").named_parameters()}
    assert names == {"mean_g", "W_kg", "sigma_unconstrained", "V_gk", "D_k_unconstrained"}


def test_var_names_mismatch_raises(pbmc: PBMCSubset) -> None:
    model = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "marginalized")
    x_ng = torch.from_numpy(pbmc.x_ng[:10])
    shuffled_g = pbmc.var_names_g[::-1].copy()
    with pytest.raises(ValueError, match="var_names_g"):
        model(x_ng, shuffled_g)
    with pytest.raises(ValueError, match="var_names_g"):
        model.predict(x_ng, shuffled_g)
    with pytest.raises(ValueError):
        model(x_ng[:, :-1], pbmc.var_names_g[:-1])
    with pytest.raises(ValueError, match="ppca_flavor"):
        ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "kernel")  # type: ignore[arg-type]


def test_models_do_not_share_parameters_through_pyro(pbmc: PBMCSubset) -> None:
    """Pyro's global param store must not link two instances, nor hide a model's tensors from its optimizer."""
    x_ng = torch.from_numpy(pbmc.x_ng[:256])
    store_before = set(pyro.get_param_store().keys())
    first = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "linear_vae", sigma_init_scale=2.0)
    _train(first, x_ng, pbmc.var_names_g, n_steps=5, lr=0.1)
    second = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "linear_vae", sigma_init_scale=2.0)
    second(x_ng, pbmc.var_names_g)
    assert second.sigma.item() == pytest.approx(2.0)
    assert first.sigma.item() != pytest.approx(2.0)
    assert set(pyro.get_param_store().keys()) == store_before


def test_trains_through_cellarium_module(pbmc: PBMCSubset) -> None:
    model = ProbabilisticPCA(N_CELLS, pbmc.var_names_g, 3, "marginalized")
    module = CellariumModule(model, optim_kwargs={"lr": 0.05})
    optimizer = module.configure_optimizers()
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}
    batch = {"x_ng": torch.from_numpy(pbmc.x_ng[:256]), "var_names_g": pbmc.var_names_g}
    sigma_before = model.sigma.item()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        losses = []
        for step in range(20):
            optimizer.zero_grad()
            loss = module.training_step(batch, step)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.sigma.item() != sigma_before


def test_linear_vae_trains_to_the_pca_spectrum(pbmc: PBMCSubset) -> None:
    """The linear VAE's optimum is pPCA's (Lucas et al.); reaching it quickly takes a sensible schedule.

    With a diagonal posterior, the ELBO is only maximized when every latent is aligned with one eigenvector;
    latents that grow together end up as rotated mixtures of close eigenvectors, which gradient descent
    untangles very slowly (from sigma_init_scale=1 and one learning rate, L_k was still 10-20% off after
    1,200 steps). So sigma starts high (sigma^2 = 16, above all but three eigenvalues) and descends slowly:
    a latent only becomes active once sigma^2 falls below its eigenvalue (the posterior-collapse threshold),
    so latents switch on one by one in order of variance, each onto its own eigenvector. The encoder V_gk
    gets a smaller step because its optimal entries (W^T / (s^2 + sigma^2)) are several times smaller than
    W's; with W's rate, its jitter biased the top eigenvalues ~5% low.
    """
    model = ProbabilisticPCA(
        N_CELLS,
        pbmc.var_names_g,
        N_COMPONENTS,
        "linear_vae",
        mean_g=torch.as_tensor(pbmc.mean_g),
        W_init_scale=0.01,
        sigma_init_scale=4.0,
    )
    x_ng = torch.from_numpy(pbmc.x_ng)
    torch.manual_seed(0)  # the loss samples z from the guide
    lr = {"*": 0.05, "V_gk": 0.01, "sigma_unconstrained": 0.006}
    losses = _train(model, x_ng, pbmc.var_names_g, n_steps=800, lr=lr)

    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    np.testing.assert_allclose(model.L_k.double().numpy(), pbmc.eigvals_g[:N_COMPONENTS], rtol=5e-2)
    np.testing.assert_allclose(model.sigma_variance / N_GENES, pbmc.eigvals_g[N_COMPONENTS:].mean(), rtol=5e-2)

    # predict is the encoder's mean, which at the optimum is the exact posterior mean (x - mean) W^T M^-1.
    z_nk = model.predict(x_ng, pbmc.var_names_g)["z_nk"].double().numpy()
    centered = pbmc.x_ng.astype(np.float64) - pbmc.mean_g
    np.testing.assert_allclose(z_nk, centered @ model.V_gk.detach().double().numpy(), rtol=1e-4, atol=1e-4)
    W_kg = model.W_kg.detach().double().numpy()
    M_kk = W_kg @ W_kg.T + model.sigma.item() ** 2 * np.eye(N_COMPONENTS)
    posterior_mean_nk = centered @ W_kg.T @ np.linalg.inv(M_kk)
    assert np.linalg.norm(z_nk - posterior_mean_nk) < 0.05 * np.linalg.norm(posterior_mean_nk)
