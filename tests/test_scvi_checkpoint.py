"""A train-scvi checkpoint written before ``models/scvi.py`` was split still loads and predicts the same.

``tests/fixtures/legacy_1c2ae1f/scvi.ckpt`` was trained by ``make_scvi.py`` beside it with the code of
commit 1c2ae1f on 64 simulated cells; ``scvi_cells.npz`` holds those cells and what that code computed
from the checkpoint: the latent means, the loss terms and two reconstructions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import RECIPE_KEY

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_1c2ae1f"
# The same code gives the same floats; the margin is for another machine's float rounding only.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Values computed at sampled z (the loss terms, importance-weighted reconstructions) move more with the
# CPU than the latent means: on an AMD EPYC, for a fixture made on another CPU, 3.6e-5 (relative) on 2 of
# 64 cells' reconstruction losses and 2.7e-4 on 2 of 128 importance-weighted values (the weights
# exponentiate the log-likelihoods), while the latent means stay within 1e-5.
SAMPLED_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def test_checkpoint_from_before_the_split_predicts_the_stored_latent() -> None:
    path = FIXTURES / "scvi.ckpt"
    stored = np.load(FIXTURES / "scvi_cells.npz")
    recipe = torch.load(path, weights_only=True)[RECIPE_KEY]
    assert recipe["model"]["class_path"] == "cellarium_steps.models.scvi.SingleCellVariationalInference"

    module = CellariumModule.from_checkpoint(str(path))
    module.eval()
    x_ng = torch.from_numpy(stored["x_ng"]).float()
    var_names_g, batch_index_n = stored["var_names_g"].astype(object), torch.from_numpy(stored["batch_index_n"])
    batch = {"x_ng": x_ng.to_sparse_csr(), "var_names_g": var_names_g, "batch_index_n": batch_index_n,
             "obs_names_n": np.arange(x_ng.shape[0]).astype(str)}
    model = module.model
    with torch.no_grad():
        torch.testing.assert_close(module.predict_step(batch, 0)["x_ng"].numpy(), stored["latent_nk"], **TOLERANCE)
        torch.manual_seed(0)
        loss = model(x_ng, var_names_g, batch_index_n)
        torch.testing.assert_close(loss["reconstruction_loss"].numpy(), stored["reconstruction_loss_n"],
                                   **SAMPLED_TOLERANCE)
        torch.testing.assert_close(loss["kl_divergence_z"].numpy(), stored["kl_divergence_z_n"], **SAMPLED_TOLERANCE)
        mean_ng = model.reconstruct(x_ng, var_names_g, [0, 5, 7], batch_index_n, transform_batch="mean",
                                    use_latent_mean=True)["x_ng"]
        torch.testing.assert_close(mean_ng.numpy(), stored["mean_reconstruction_ng"], **TOLERANCE)
        torch.manual_seed(0)
        weighted_ng = model.reconstruct(x_ng, var_names_g, [1, 2], batch_index_n, transform_batch=1,
                                        n_latent_samples=5, use_importance_sampling=True)["x_ng"]
        torch.testing.assert_close(weighted_ng.numpy(), stored["weighted_reconstruction_ng"], **SAMPLED_TOLERANCE)
