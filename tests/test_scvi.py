"""scVI: parity with scvi-tools on real data, the model's options, and the train-scvi step."""

from __future__ import annotations

import types
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from scvi_tools_parity import (
    paired_gradients,
    replay_in_scvi_tools,
    scvi_tools_state_to_ours,
    train_scvi_from_scvi_tools_weights,
)
from torch.utils.data import DataLoader

from cellarium_steps.data.dataset import collate_identity
from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.models import SingleCellVariationalInference
from cellarium_steps.models._latent_metrics import (
    Reservoir,
    fit_logistic_regression,
    ontology_spearman,
    spearman_correlation,
)
from cellarium_steps.models.scvi import scvi_tools_default_architecture
from cellarium_steps.runner import CellariumModule, build_trainer
from cellarium_steps.steps.cli import main as cli_main

RELATIVE_TOLERANCE = 1e-5
# Measured 1.2e-5 (float32, seed 0): the one gradient above RELATIVE_TOLERANCE; see the parity test.
PX_R_GRADIENT_TOLERANCE = 3e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.detach() - reference.detach()).abs().max() / reference.detach().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------
# Parity with scvi-tools


@pytest.fixture(scope="module")
def pbmc_small(pbmc_multibatch: ad.AnnData) -> ad.AnnData:
    """500 cells x the 200 highest-variance genes of the real multi-batch PBMC file."""
    rng = np.random.default_rng(0)
    adata = pbmc_multibatch[np.sort(rng.choice(pbmc_multibatch.n_obs, 500, replace=False))].copy()
    x = adata.X.astype(np.float64)
    mean_g = np.asarray(x.mean(0)).ravel()
    var_g = np.asarray(x.multiply(x).mean(0)).ravel() - mean_g**2
    adata = adata[:, np.sort(np.argsort(-var_g, kind="stable")[:200])].copy()
    adata.obs["source"] = adata.obs["source"].astype(str).astype("category")
    adata.obs["chemistry"] = adata.obs["chemistry"].astype(str).astype("category")
    adata.obs["noise"] = rng.normal(size=adata.n_obs)
    return adata


PARITY_CASES = {
    # The default scVI the brief names: one hidden layer, NB, per-gene dispersion, one-hot batch.
    "default-eval": dict(n_layers=1, dispersion="gene", covariates=False, train_mode=False),
    # Deeply injected categorical covariate, a continuous covariate, per-batch dispersion, two layers.
    "covariates-gene-batch-eval": dict(n_layers=2, dispersion="gene-batch", covariates=True, train_mode=False),
    # Batch norm on batch statistics (training mode, dropout off) and per-cell dispersion.
    "gene-cell-train-mode": dict(n_layers=1, dispersion="gene-cell", covariates=False, train_mode=True),
    # scArches' reference architecture (train-scvi --encode-covariates --use-layer-norm both --use-batch-norm
    # none): the batch and covariates enter the first hidden layer of encoder and decoder only.
    "scarches-covariates-train-mode": dict(n_layers=2, dispersion="gene", covariates=True, train_mode=True,
                                           encode_covariates=True, layer_norm=True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_scvi_tools(case: str, pbmc_small: ad.AnnData) -> None:
    scvi = pytest.importorskip("scvi", reason="scvi-tools is not installed")
    from scvi import REGISTRY_KEYS

    options = PARITY_CASES[case]
    n_layers, dispersion, covariates = options["n_layers"], options["dispersion"], options["covariates"]
    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(
        adata, batch_key="source",
        categorical_covariate_keys=["chemistry"] if covariates else None,
        continuous_covariate_keys=["noise"] if covariates else None,
    )
    # scvi-tools' own seeding (torch, numpy, random): the briefly trained reference, and so the
    # compared gradients, are the same in every run.
    scvi.settings.seed = 0
    encode_covariates, layer_norm = options.get("encode_covariates", False), options.get("layer_norm", False)
    architecture = dict(use_layer_norm="both", use_batch_norm="none") if layer_norm else {}
    reference = scvi.model.SCVI(adata, n_hidden=128, n_layers=n_layers, n_latent=10, gene_likelihood="nb",
                                dispersion=dispersion, encode_covariates=encode_covariates,
                                deeply_inject_covariates=not encode_covariates, **architecture)
    # Trained briefly, so weights and batch-norm statistics are no longer their initial values.
    reference.train(max_epochs=2, accelerator="cpu", batch_size=128, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False)
    vae = reference.module

    n_cats_per_cov = [adata.obs["chemistry"].cat.categories.size] if covariates else None
    encoder, decoder = scvi_tools_default_architecture(n_hidden=128, n_layers=n_layers,
                                                       encode_covariates=encode_covariates,
                                                       deeply_inject_covariates=not encode_covariates)
    if encode_covariates and covariates:
        encoder["input_continuous_covariates"] = True  # scvi-tools' encoder also reads them with encode_covariates
    model = SingleCellVariationalInference(
        adata.var_names.values, encoder, decoder, n_batch=adata.obs["source"].cat.categories.size, n_latent=10,
        n_continuous_cov=1 if covariates else 0, n_cats_per_cov=n_cats_per_cov, dispersion=dispersion,
        gene_likelihood="nb", kl_warmup_epochs=None, kl_warmup_steps=None, **architecture,
    )
    model.load_state_dict(scvi_tools_state_to_ours(vae, model, n_layers))

    loader = reference._make_data_loader(adata=adata, indices=np.arange(256), batch_size=256, shuffle=False)
    tensors = next(iter(loader))
    x_ng = tensors[REGISTRY_KEYS.X_KEY]
    batch_index_n1 = tensors[REGISTRY_KEYS.BATCH_KEY]
    cont_nc = tensors.get(REGISTRY_KEYS.CONT_COVS_KEY)
    cat_nd = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)

    for module in (vae, model):
        module.train(options["train_mode"])
        for dropout in (m for m in module.modules() if isinstance(m, torch.nn.Dropout)):
            dropout.p = 0.0  # train-mode parity needs no random masks; eval mode has none anyway
        module.zero_grad()

    # The same epsilon for the reparametrised z: each side draws it first from the same seed.
    torch.manual_seed(1)
    inference = vae._regular_inference(x_ng, batch_index_n1, cont_covs=cont_nc, cat_covs=cat_nd)
    generative = vae.generative(inference["z"], inference["library"], batch_index_n1, cont_covs=cont_nc,
                                cat_covs=cat_nd)
    expected = vae.loss(tensors, inference, generative, kl_weight=1.0)
    expected.loss.backward()

    torch.manual_seed(1)
    output = model(x_ng, adata.var_names.values, batch_index_n1[:, 0], continuous_covariates_nc=cont_nc,
                   categorical_covariate_index_nd=cat_nd)
    output["loss"].backward()

    assert relative_error(output["loss"], expected.loss) < RELATIVE_TOLERANCE
    expected_reconstruction_n = expected.reconstruction_loss["reconstruction_loss"]
    assert relative_error(output["reconstruction_loss"], expected_reconstruction_n) < RELATIVE_TOLERANCE
    assert relative_error(output["kl_divergence_z"], expected.kl_local["kl_divergence_z"]) < RELATIVE_TOLERANCE
    assert relative_error(output["z_nk"], inference["z"]) < RELATIVE_TOLERANCE
    n_compared = 0
    for name, ours, theirs in paired_gradients(model, vae, n_layers):
        assert ours is not None and theirs is not None, name
        # px_r's gradient sums a term of every (cell, gene) pair; our NB loss adds the counts' terms
        # over stored entries only, so in float32 its last bits follow another summation order.
        tolerance = PX_R_GRADIENT_TOLERANCE if name == "px_r" else RELATIVE_TOLERANCE
        assert relative_error(ours, theirs) < tolerance, name
        n_compared += 1
    assert n_compared >= 10

    if not options["train_mode"]:
        latent_mean_nk = model.predict(x_ng, adata.var_names.values, batch_index_n1[:, 0], cont_nc, cat_nd)["x_ng"]
        assert relative_error(latent_mean_nk, inference["qz"].loc) < RELATIVE_TOLERANCE


class SeedEachStep(pl.Callback):
    """Seeds torch before every training batch, so both sides draw the same dropout masks and noise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1000 + trainer.global_step)


def test_training_follows_scvi_tools_step_by_step(pbmc_small: ad.AnnData) -> None:
    """Training through our runner with train-scvi's optimizer and a KL warm-up by steps, from scvi-tools'
    weights on the same batches, ends where scvi-tools' own training plan ends: the same Adam (eps, weight
    decay), the same KL weight at every step, and per step the same loss. scArches' reference architecture
    with dropout, as bench_mapping.py trains it; torch is seeded before every step, and both sides draw
    dropout masks and reparametrisation noise in the same order, so they see the same random numbers."""
    scvi = pytest.importorskip("scvi", reason="scvi-tools is not installed")
    from scvi.train import TrainingPlan

    from cellarium_steps.pipelines.scvi import optimizer_kwargs

    n_epochs, n_batches, warmup_steps, n_layers = 6, 5, 20, 2
    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="source")
    scvi.settings.seed = 0
    architecture = {"use_layer_norm": "both", "use_batch_norm": "none"}
    reference = scvi.model.SCVI(adata, n_hidden=128, n_layers=n_layers, n_latent=10, dropout_rate=0.2,
                                gene_likelihood="nb", encode_covariates=True, deeply_inject_covariates=False,
                                **architecture)
    vae = reference.module
    encoder, decoder = scvi_tools_default_architecture(n_hidden=128, n_layers=n_layers, encode_covariates=True,
                                                       deeply_inject_covariates=False)
    model = SingleCellVariationalInference(
        adata.var_names.values, encoder, decoder, n_batch=adata.obs["source"].cat.categories.size, n_latent=10,
        dropout_rate=0.2, kl_warmup_epochs=None, kl_warmup_steps=warmup_steps, **architecture,
    )
    model.load_state_dict(scvi_tools_state_to_ours(vae, model, n_layers))
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    batch_size = adata.n_obs // n_batches
    scvi_batches = list(reference._make_data_loader(adata=adata, indices=np.arange(adata.n_obs),
                                                    batch_size=batch_size, shuffle=False))
    our_batches = [{"x_ng": b["X"].to_sparse_csr(), "var_names_g": adata.var_names.values,
                    "batch_index_n": b["batch"][:, 0].long()} for b in scvi_batches]

    def train_and_record_losses(module: pl.LightningModule, batches: list) -> list[float]:
        losses: list[float] = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                losses.append(float(outputs["loss"]))

        trainer = pl.Trainer(accelerator="cpu", max_epochs=n_epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[SeedEachStep(), Record()])
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=collate_identity))
        return losses

    plan = TrainingPlan(vae, lr=1e-3, n_steps_kl_warmup=warmup_steps, n_epochs_kl_warmup=None)
    theirs = train_and_record_losses(plan, scvi_batches)
    ours = train_and_record_losses(CellariumModule(model, optim_kwargs=optimizer_kwargs(1e-3)), our_batches)

    assert len(ours) == len(theirs) == n_epochs * n_batches
    assert model.z_kl_weight == 1.0
    # Measured: losses within 2e-7 and every parameter within 4e-7 of scvi-tools' (float32, 30 steps).
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    expected = scvi_tools_state_to_ours(vae, model, n_layers)
    for name, value in model.state_dict().items():
        assert relative_error(value, expected[name]) < 1e-5, name
        assert relative_error(value, initial[name]) > 1e-3, f"{name} did not train"


def test_train_scvi_step_trains_as_scvi_tools_on_its_batches(pbmc_small: ad.AnnData, tmp_path: Path) -> None:
    """The whole ``train-scvi`` path (shard reader, shuffled loader, trainer, checkpointing, per-step seeding,
    KL warm-up by steps) is scvi-tools' training plan on the batches that path makes: started from
    scvi-tools' initial weights, train-scvi records every training batch its model sees, and scvi-tools'
    TrainingPlan, replaying them with the same per-step seeds (dropout masks, reparametrisation noise),
    gives the same loss at every step and the same final weights. scArches' reference architecture, as
    bench_mapping.py trains it."""
    scvi = pytest.importorskip("scvi", reason="scvi-tools is not installed")

    n_epochs, batch_size, warmup_steps, n_layers, seed = 4, 64, 20, 2, 3
    path, output = tmp_path / "pbmc.h5ad", tmp_path / "scvi.ckpt"
    pbmc_small.write_h5ad(path)
    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="source")
    scvi.settings.seed = 0
    vae = scvi.model.SCVI(adata, n_hidden=128, n_layers=n_layers, n_latent=10, dropout_rate=0.2, gene_likelihood="nb",
                          encode_covariates=True, deeply_inject_covariates=False, use_layer_norm="both",
                          use_batch_norm="none").module
    initial = {name: value.clone() for name, value in vae.state_dict().items()}

    seen: list[dict] = []
    with train_scvi_from_scvi_tools_weights(vae, n_layers, record=seen):
        code = cli_main(["train-scvi", "--input", str(path), "--batch-key", "source", "--encode-covariates",
                         "--use-layer-norm", "both", "--use-batch-norm", "none", "--n-layers", str(n_layers),
                         "--n-hidden", "128", "--n-latent", "10", "--dropout-rate", "0.2", "--max-epochs",
                         str(n_epochs), "--batch-size", str(batch_size), "--kl-warmup-steps", str(warmup_steps),
                         "--learning-rate", "1e-3", "--seed", str(seed), "--accelerator", "cpu", "--output",
                         str(output), "--quiet"])
    assert code == 0
    steps_per_epoch = -(-adata.n_obs // batch_size)
    assert len(seen) == n_epochs * steps_per_epoch
    assert all(list(step["var_names_g"]) == list(adata.var_names) for step in seen)
    # Every cell once per epoch, in a new order each epoch (rows identified by their counts).
    rows = {tuple(row.tolist()): i for i, row in enumerate(torch.tensor(adata.X.toarray(), dtype=torch.float32))}
    orders = [[rows[tuple(row.tolist())] for step in seen[e * steps_per_epoch:(e + 1) * steps_per_epoch]
               for row in step["X"]] for e in range(n_epochs)]
    assert all(sorted(order) == list(range(adata.n_obs)) for order in orders)
    assert len({tuple(order) for order in orders}) == n_epochs

    vae.load_state_dict(initial)
    losses, kl_weights = replay_in_scvi_tools(vae, seen, seed, warmup_steps, learning_rate=1e-3)

    # Measured: losses within 1e-6 (relative) over 32 steps; on bench_mapping's reference (5,567 cells x
    # 2,000 genes, batch 128) within 1e-6 for the first 440 steps.
    np.testing.assert_allclose([step["loss"] for step in seen], losses, rtol=1e-5)
    np.testing.assert_allclose([step["kl_weight"] for step in seen], kl_weights, atol=1e-7)
    trained = CellariumModule.from_checkpoint(str(output)).model
    expected = scvi_tools_state_to_ours(vae, trained, n_layers)
    for name, value in trained.state_dict().items():
        assert relative_error(value, expected[name]) < 1e-5, name


def test_kl_warmup_schedule_matches_scvi_tools() -> None:
    pytest.importorskip("scvi", reason="scvi-tools is not installed")
    from scvi.train._trainingplans import _compute_kl_weight

    model = make_model(kl_warmup_epochs=None, kl_warmup_steps=7)
    for step in range(10):
        model.on_train_batch_start(types.SimpleNamespace(current_epoch=0, global_step=step))
        assert model.z_kl_weight == pytest.approx(_compute_kl_weight(0, step, None, 7, 1.0, 0.0))
    model = make_model(kl_warmup_epochs=4, z_kl_weight_max=0.5)
    for epoch in range(6):
        model.on_train_epoch_start(types.SimpleNamespace(current_epoch=epoch, global_step=100 * epoch))
        assert model.z_kl_weight == pytest.approx(_compute_kl_weight(epoch, 100 * epoch, 4, None, 0.5, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# The model's options, on small simulated counts

GENES = np.array([f"gene{i}" for i in range(30)])
N_BATCH = 3


def make_model(**kwargs) -> SingleCellVariationalInference:
    torch.manual_seed(0)
    encoder, decoder = scvi_tools_default_architecture(n_hidden=16)
    options = dict(n_batch=N_BATCH, n_latent=4)
    options.update(kwargs)
    encoder, decoder = options.pop("encoder", encoder), options.pop("decoder", decoder)
    return SingleCellVariationalInference(GENES, encoder, decoder, **options)


@pytest.fixture
def counts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rate_ng = torch.rand(64, len(GENES), generator=generator) * 5
    x_ng = torch.poisson(rate_ng, generator=generator)
    x_ng[:, 0] += 1  # no cell without counts
    batch_index_n = torch.arange(64) % N_BATCH
    return x_ng, batch_index_n


def test_predict_and_reconstruct_shapes(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model().eval()
    assert model.predict(x_ng, GENES, batch_index_n)["x_ng"].shape == (64, 4)
    reconstructed = model.reconstruct(x_ng, GENES, [4, 0, 7], batch_index_n, n_latent_samples=5)["x_ng"]
    assert reconstructed.shape == (64, 3)
    assert torch.isfinite(reconstructed).all() and (reconstructed > 0).all()

    on_predict = make_model(reconstruct_counts_on_predict=True, reconstruction_var_names_g=["gene9", "gene2"],
                            reconstruction_n_latent_samples=3).eval()
    assert on_predict.predict(x_ng, GENES, batch_index_n)["x_ng"].shape == (64, 2)


def test_reconstruct_gene_order_library_and_mean_transform(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model().eval()
    full_ng = model.reconstruct(x_ng, GENES, list(range(len(GENES))), batch_index_n, use_latent_mean=True,
                                reconstructed_library_size=1000)["x_ng"]
    torch.testing.assert_close(full_ng.sum(1), torch.full((64,), 1000.0))  # softmax scale x library size
    picked = model.reconstruct(x_ng, GENES, [9, 2, 5], batch_index_n, use_latent_mean=True,
                               reconstructed_library_size=1000)["x_ng"]
    torch.testing.assert_close(picked, full_ng[:, [9, 2, 5]])

    per_batch = [
        model.reconstruct(x_ng, GENES, [9, 2, 5], batch_index_n, transform_batch=b, use_latent_mean=True)["x_ng"]
        for b in range(N_BATCH)
    ]
    mean = model.reconstruct(x_ng, GENES, [9, 2, 5], batch_index_n, transform_batch="mean",
                             use_latent_mean=True)["x_ng"]
    torch.testing.assert_close(mean, torch.stack(per_batch).mean(0))
    assert not torch.allclose(per_batch[0], per_batch[1])


def test_reconstruct_importance_sampling_is_a_weighted_mean(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model().eval()
    torch.manual_seed(3)
    weighted = model.reconstruct(x_ng, GENES, [1, 2], batch_index_n, n_latent_samples=20,
                                 use_importance_sampling=True)["x_ng"]
    lowest = model.reconstruct(x_ng, GENES, [1, 2], batch_index_n, n_latent_samples=1, use_latent_mean=True)["x_ng"]
    assert weighted.shape == (64, 2) and torch.isfinite(weighted).all()
    assert torch.allclose(weighted, lowest, rtol=0.5)  # near the latent mean's decoding, not a different scale


@pytest.mark.parametrize(
    "options",
    [
        dict(gene_likelihood="poisson"),
        dict(dispersion="gene-batch"),
        dict(dispersion="gene-cell"),
        dict(batch_embedded=True, n_latent_batch=2, batch_representation_sampled=True, batch_kl_weight_max=0.5,
             dispersion="gene-batch"),
        dict(use_layer_norm="both", use_batch_norm="none", input_gene_dropout_rate=0.2),
        dict(n_cats_per_cov=[2, 1], n_continuous_cov=1,
             encoder={"hidden_layers": [{"class_path": "LinearWithBatchAndCovariates",
                                         "init_args": {"out_features": 8}}],
                      "final_layer": {"class_path": "cellarium_steps.models.scvi.LinearWithBatch"},
                      "input_continuous_covariates": True},
             decoder={"hidden_layers": [], "final_layer": {"class_path": "LinearWithBatchAndCovariates"},
                      "final_additive_bias": True}),
        dict(use_size_factor_key=True),
    ],
    ids=["poisson", "gene-batch", "gene-cell", "embedded-sampled-batch", "layer-norm-gene-dropout",
         "covariates-additive-bias", "size-factor"],
)
def test_options_train(options: dict, counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model(kl_warmup_epochs=None, **options)
    extra: dict = {}
    if options.get("n_cats_per_cov"):
        codes_n2 = torch.stack([torch.arange(64) % 2, torch.zeros(64, dtype=torch.long)], 1)
        extra["categorical_covariate_index_nd"] = codes_n2
        extra["continuous_covariates_nc"] = torch.randn(64, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        output = model(x_ng, GENES, batch_index_n, total_mrna_umis_n=x_ng.sum(1) * 2, **extra)
        output["loss"].backward()
        optimizer.step()
        losses.append(output["loss"].item())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    model.eval()
    assert model.predict(x_ng, GENES, batch_index_n, extra.get("continuous_covariates_nc"),
                         extra.get("categorical_covariate_index_nd"))["x_ng"].shape == (64, 4)
    if options.get("n_cats_per_cov"):
        with pytest.raises(ValueError, match="transform_categorical_covariates"):
            model.reconstruct(x_ng, GENES, [0], batch_index_n, transform_batch=1, n_latent_samples=2, **extra)
        out = model.reconstruct(x_ng, GENES, [0], batch_index_n, transform_batch=1,
                                transform_categorical_covariates=[1, 0], n_latent_samples=2, **extra)
        assert out["x_ng"].shape == (64, 1)


def test_sparse_csr_input_equals_dense(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model().eval()
    torch.manual_seed(5)
    dense = model(x_ng, GENES, batch_index_n)
    torch.manual_seed(5)
    sparse = model(x_ng.to_sparse_csr(), GENES, batch_index_n)
    for key in ("loss", "reconstruction_loss", "kl_divergence_z", "z_nk"):
        torch.testing.assert_close(sparse[key], dense[key])
    torch.testing.assert_close(model.predict(x_ng.to_sparse_csr(), GENES, batch_index_n)["x_ng"],
                               model.predict(x_ng, GENES, batch_index_n)["x_ng"])


def test_bad_batch_index_is_named(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model()
    bad_n = batch_index_n.clone()
    bad_n[17] = N_BATCH + 4
    with pytest.raises(ValueError, match=rf"batch index {N_BATCH + 4} \(cell 17"):
        model(x_ng, GENES, bad_n)
    with pytest.raises(ValueError, match="var_names_g"):
        model(x_ng[:, :-1], GENES[:-1], batch_index_n)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(gene_likelihood="zinb"), NotImplementedError, "zinb"),
        (dict(latent_distribution="ln"), NotImplementedError, "logistic normal"),
        (dict(dispersion="gene-label"), NotImplementedError, "labels"),
        (dict(val_cell_type_classifier_reservoir_size=0), ValueError, "reservoir_size"),
        (dict(use_batch_norm="sometimes"), ValueError, "use_batch_norm"),
        (dict(decoder={"hidden_layers": [{"class_path": "Conv1d", "init_args": {"out_features": 3}}],
                       "final_layer": {"class_path": "Linear"}}), ValueError, "unknown layer class_path 'Conv1d'"),
        (dict(encoder={"hidden_layers": [{"class_path": "Linear", "init_args": {}}],
                       "final_layer": {"class_path": "Linear"}}), ValueError, "out_features"),
    ],
)
def test_unsupported_options_fail_clearly(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_model(**options)


def test_architecture_dict_is_not_mutated_and_cellarium_ml_paths_read() -> None:
    encoder = {"hidden_layers": [{"class_path": "cellarium.ml.models.scvi.LinearWithBatch",
                                  "init_args": {"out_features": 8, "batch_to_bias_hidden_layers": []},
                                  "dressing_init_args": {"use_batch_norm": True, "dropout_rate": 0.1}}],
               "final_layer": {"class_path": "torch.nn.Linear", "init_args": {}}}
    snapshot = repr(encoder)
    model = make_model(encoder=encoder)
    assert repr(encoder) == snapshot
    assert model.z_encoder.hidden.layers[0].layer.batch_weight.shape == (8, N_BATCH)


def fit(model: SingleCellVariationalInference, x_ng: torch.Tensor, batch_index_n: torch.Tensor, max_epochs: int,
        n_batches: int) -> CellariumModule:
    batches = [
        {"x_ng": x_b.to_sparse_csr(), "var_names_g": GENES, "batch_index_n": b_b}
        for x_b, b_b in zip(x_ng.chunk(n_batches), batch_index_n.chunk(n_batches))
    ]
    module = CellariumModule(model, optim_kwargs={"lr": 1e-2})
    trainer = build_trainer(accelerator="cpu", max_epochs=max_epochs, trainable=True)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=collate_identity))
    assert model.global_step == trainer.global_step == max_epochs * n_batches
    return module


def test_kl_warmup_by_steps_reaches_maximum_in_training(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model(kl_warmup_epochs=None, kl_warmup_steps=6, kl_annealing_start=0.25, z_kl_weight_max=0.8)
    model.on_train_epoch_start(types.SimpleNamespace(current_epoch=0, global_step=0))
    assert model.z_kl_weight == pytest.approx(0.2)
    model.on_train_epoch_start(types.SimpleNamespace(current_epoch=0, global_step=3))
    assert model.z_kl_weight == pytest.approx(0.8 * (0.25 + 0.75 * 3 / 6))
    fit(model, x_ng, batch_index_n, max_epochs=2, n_batches=4)  # 8 steps
    assert model.z_kl_weight == pytest.approx(0.8)


def test_kl_warmup_by_epochs_reaches_maximum_at_the_configured_epoch() -> None:
    model = make_model(kl_warmup_epochs=3, kl_warmup_steps=2)  # epochs win, as in scvi-tools
    weights = []
    for epoch in range(5):
        model.on_train_epoch_start(types.SimpleNamespace(current_epoch=epoch, global_step=10 * epoch))
        weights.append(model.z_kl_weight)
    assert weights == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])


def test_flow_prior_trains(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    model = make_model(use_flow=True, flow_hidden_features=[16, 16], kl_warmup_epochs=None)
    flow_before = [p.detach().clone() for p in model.flow_prior.parameters()]
    fit(model, x_ng, batch_index_n, max_epochs=2, n_batches=2)
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, model.flow_prior.parameters()))
    model.eval()
    output = model(x_ng, GENES, batch_index_n)
    assert torch.isfinite(output["loss"]) and torch.isfinite(output["kl_divergence_z"]).all()
    weighted = model.reconstruct(x_ng, GENES, [0, 1], batch_index_n, n_latent_samples=4, use_importance_sampling=True)
    assert torch.isfinite(weighted["x_ng"]).all()


# ---------------------------------------------------------------------------------------------------------------
# cellarium-steps train-scvi


def test_train_scvi_cli(tmp_path: Path) -> None:
    from cellarium_steps.runner import CellariumModule
    from cellarium_steps.runner.recipe import RECIPE_KEY

    # What `cellarium-steps simulate --output DIR --n-cells 600 --n-genes 100` writes, without a second process.
    simulate_shards(str(tmp_path / "sim"), n_cells=600, n_genes=100)
    shard = ad.read_h5ad(sorted((tmp_path / "sim").glob("*.h5ad"))[0])
    all_genes = shard.var_names.tolist()
    hvg = pd.DataFrame({"gene": all_genes, "highly_variable": [i % 2 == 0 for i in range(len(all_genes))]})
    hvg.to_csv(tmp_path / "hvg.csv", index=False)
    genes = [g for i, g in enumerate(all_genes) if i % 2 == 0]
    output = tmp_path / "out" / "scvi.ckpt"
    run_cli("train-scvi", "--input", str(tmp_path / "sim" / "*.h5ad"), "--batch-key", "batch", "--genes",
            str(tmp_path / "hvg.csv"), "--max-epochs", "2", "--batch-size", "128", "--n-hidden", "32",
            "--accelerator", "cpu", "--output", str(output), "--quiet")
    assert output.exists() and (tmp_path / "out" / "scvi.ckpt.d" / "last.ckpt").exists()
    assert (tmp_path / "out" / "scvi.ckpt.provenance.json").exists()

    module = CellariumModule.from_checkpoint(str(output))
    checkpoint = torch.load(output, weights_only=True)
    recipe = checkpoint[RECIPE_KEY]
    model_args = recipe["model"]["init_args"]
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 10  # 2 epochs of ceil(600 / 128) steps
    assert recipe["transforms"][0]["init_args"]["filter_list"] == genes and model_args["var_names_g"] == genes
    assert recipe["data"]["batch_key"] == "batch" and len(recipe["data"]["batch_categories"]) == 4
    assert model_args["kl_warmup_steps"] == 2  # a quarter of the run's 10 steps
    batch = {
        "x_ng": torch.tensor(shard.X[:50].toarray(), dtype=torch.float32).to_sparse_csr(),
        "var_names_g": shard.var_names.values,
        "batch_index_n": torch.zeros(50, dtype=torch.long),
        "obs_names_n": shard.obs_names.values[:50],
    }
    with torch.no_grad():
        latent = module.predict_step(batch, 0)["x_ng"]
    assert latent.shape == (50, 10) and torch.isfinite(latent).all()


def test_train_scvi_rejects_unknown_genes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=40, n_genes=20, n_shards=1)
    (tmp_path / "genes.txt").write_text("CD3D\nNOT_A_GENE\n")
    code = cli_main(["train-scvi", "--input", str(tmp_path / "sim" / "shard_000.h5ad"), "--genes",
                     str(tmp_path / "genes.txt"), "--output", str(tmp_path / "m.ckpt"), "--accelerator", "cpu"])
    assert code == 2 and "NOT_A_GENE" in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists() and not (tmp_path / "m.ckpt.d").exists()


def test_train_scvi_requires_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import scipy.sparse as sp

    path = tmp_path / "normalized.h5ad"
    ad.AnnData(
        X=sp.csr_matrix(np.full((20, 5), 0.5, dtype=np.float32)),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(5)]),
    ).write_h5ad(path)
    code = cli_main(["train-scvi", "--input", str(path), "--output", str(tmp_path / "m.ckpt"), "--accelerator", "cpu"])
    assert code == 2 and "non-integer" in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()


def test_validation_logs_loss_terms(counts: tuple[torch.Tensor, torch.Tensor]) -> None:
    x_ng, batch_index_n = counts
    batches = [{"x_ng": x_ng.to_sparse_csr(), "var_names_g": GENES, "batch_index_n": batch_index_n,
                "obs_names_n": np.arange(64).astype(str), "total_mrna_umis_n": x_ng.sum(1)}]
    trainer = build_trainer(accelerator="cpu", trainable=True)
    loader = DataLoader(batches, batch_size=None, collate_fn=collate_identity)
    metrics = trainer.validate(CellariumModule(make_model()), loader, verbose=False)[0]
    assert {"val_loss", "val_reconstruction_loss", "val_kl_divergence_z"} <= set(metrics)
    assert np.isfinite(metrics["val_loss"])


# ---------------------------------------------------------------------------------------------------------------
# Validation metrics: the reservoir-sampled cell type classifier and the ontology Spearman

def test_reservoir_keeps_at_most_n_and_is_uniform() -> None:
    n_stream, size, n_trials = 200, 20, 2000
    hits = np.zeros(n_stream)
    generator = torch.Generator().manual_seed(0)
    for _ in range(n_trials):
        reservoir = Reservoir(size, 1, generator)
        for chunk in torch.arange(n_stream).split(37):  # uneven batches, some larger than the reservoir
            reservoir.add(chunk[:, None].float(), chunk)
            assert reservoir.fill == min(reservoir.seen, size) <= size
        z_rk, y_r = reservoir.rows()
        assert z_rk.shape == (size, 1) and len(set(y_r.tolist())) == size  # no row twice
        assert torch.equal(z_rk[:, 0].long(), y_r)  # features and labels stay paired
        hits[y_r.numpy()] += 1
    # Each row is kept with probability size / n_stream = 0.1: 200 expected hits, sd ~13.4.
    expected = n_trials * size / n_stream
    assert np.abs(hits - expected).max() < 5 * np.sqrt(expected * (1 - size / n_stream))
    assert abs(hits[:100].mean() - hits[100:].mean()) < 0.05 * expected  # early and late rows alike

    small = Reservoir(50, 2, generator)
    small.add(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    assert small.fill == 10 and small.rows()[0].shape == (10, 2)


def test_spearman_and_logistic_regression_helpers() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert spearman_correlation(torch.tensor(a), torch.tensor(b)) == pytest.approx(scipy_stats.spearmanr(a, b)[0])
    assert np.isnan(spearman_correlation(torch.ones(5), torch.arange(5.0)))

    centers_ck = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    y_n = torch.arange(300) % 3
    z_nk = centers_ck[y_n] + torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    predict_proba = fit_logistic_regression(z_nk, y_n, n_classes=4)  # class 3 never seen
    probabilities_nc = predict_proba(z_nk)
    assert probabilities_nc.shape == (300, 4) and (probabilities_nc[:, 3] < 1e-6).all()
    assert (probabilities_nc.argmax(-1) == y_n).double().mean() > 0.99


def test_ontology_spearman_is_one_when_the_latent_mirrors_the_ontology() -> None:
    from cellarium_steps.ontology import compute_cl_distance_matrix

    # Types on a line, distances without ties: centroids in the same order give exactly 1.
    position_c = torch.tensor([0.0, 1.0, 3.0, 7.0, 15.0], dtype=torch.float64)
    distance_cc = (position_c[:, None] - position_c[None, :]).abs()
    count_c = torch.tensor([10.0, 20.0, 5.0, 1.0, 3.0], dtype=torch.float64)
    centroid_ck = torch.stack([position_c * 2.5, torch.zeros(5, dtype=torch.float64)], 1)
    assert ontology_spearman(centroid_ck * count_c[:, None], count_c, distance_cc) == pytest.approx(1.0)
    shuffled_ck = centroid_ck[[3, 4, 0, 2, 1]]  # each type at another type's centroid
    assert ontology_spearman(shuffled_ck * count_c[:, None], count_c, distance_cc) < 0.5
    # Absent types are left out; fewer than three present types give NaN.
    count_c[3] = 0
    assert ontology_spearman(centroid_ck * count_c[:, None], count_c, distance_cc) == pytest.approx(1.0)
    assert np.isnan(ontology_spearman(centroid_ck, torch.tensor([1.0, 1, 0, 0, 0]), distance_cc))

    # Real Cell Ontology distances (with ties): centroids placed by classical MDS of D + c (exactly
    # Euclidean for a large c, same order as D) score higher than the same centroids shuffled.
    types = ["CL:0000624", "CL:0000625", "CL:0000236", "CL:0001054", "CL:0000233"]
    cl_distance_cc = torch.tensor(compute_cl_distance_matrix(types).to_numpy())
    shifted_cc = cl_distance_cc + 10 * cl_distance_cc.max() * (1 - torch.eye(5, dtype=torch.float64))
    centering = torch.eye(5, dtype=torch.float64) - 1 / 5
    eigenvalues, eigenvectors = torch.linalg.eigh(-0.5 * centering @ shifted_cc**2 @ centering)
    cl_centroid_ck = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    ones = torch.ones(5, dtype=torch.float64)
    mirrored = ontology_spearman(cl_centroid_ck, ones, cl_distance_cc)
    assert mirrored > 0.7 and mirrored > ontology_spearman(cl_centroid_ck[[3, 4, 0, 2, 1]], ones, cl_distance_cc)


VALIDATION_TYPES = ["CL:0000624", "CL:0000625", "CL:0000236", "CL:0001054"]


def separated_counts(n_cells: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts where each cell type expresses its own block of genes: well-separated clusters."""
    generator = torch.Generator().manual_seed(seed)
    type_n = torch.arange(n_cells) % len(VALIDATION_TYPES)
    rate_ng = torch.full((n_cells, len(GENES)), 0.5)
    block = len(GENES) // len(VALIDATION_TYPES)
    for t in range(len(VALIDATION_TYPES)):
        rate_ng[type_n == t, t * block : (t + 1) * block] = 20.0
    x_ng = torch.poisson(rate_ng, generator=generator)
    return x_ng, torch.arange(n_cells) % N_BATCH, type_n


def test_validation_logs_cell_type_metrics() -> None:
    from cellarium_steps.ontology import compute_cl_distance_matrix

    x_ng, batch_index_n, type_n = separated_counts(800)
    codes_n = type_n.clone()
    codes_n[::10] = -1  # unlabelled cells are left out of both metrics
    batches = [
        {"x_ng": x.to_sparse_csr(), "var_names_g": GENES, "batch_index_n": b, "validation_cell_type_index_n": c}
        for x, b, c in zip(x_ng.split(50), batch_index_n.split(50), codes_n.split(50))
    ]
    model = make_model(cell_type_categories=VALIDATION_TYPES, val_cell_type_classifier_reservoir_size=150,
                       ontology_distance_matrix=compute_cl_distance_matrix(VALIDATION_TYPES[::-1] + ["CL:0000233"]))
    assert model.ontology_distance_cc.shape == (4, 4) and "ontology_distance_cc" not in model.state_dict()
    trainer = build_trainer(accelerator="cpu", trainable=True)
    loader = DataLoader(batches, batch_size=None, collate_fn=collate_identity)
    metrics = trainer.validate(CellariumModule(model), loader, verbose=False)[0]
    assert {"val_loss", "val_cell_type_classifier_accuracy", "val_ontology_spearman"} <= set(metrics)
    assert metrics["val_cell_type_classifier_accuracy"] > 0.95  # separated clusters, even an untrained encoder
    assert -1.0 <= metrics["val_ontology_spearman"] <= 1.0
    assert model._val_state is None  # the epoch's state is dropped once logged


def test_validation_metrics_need_labels_and_consistent_options() -> None:
    # Without labels in the batch, only the loss terms are logged.
    x_ng, batch_index_n, _ = separated_counts(64)
    batches = [{"x_ng": x_ng, "var_names_g": GENES, "batch_index_n": batch_index_n}]
    trainer = build_trainer(accelerator="cpu", trainable=True)
    loader = DataLoader(batches, batch_size=None, collate_fn=collate_identity)
    metrics = trainer.validate(CellariumModule(make_model(cell_type_categories=VALIDATION_TYPES)), loader,
                               verbose=False)[0]
    assert "val_loss" in metrics and "val_cell_type_classifier_accuracy" not in metrics
    with pytest.raises(ValueError, match="needs cell_type_categories"):
        make_model(ontology_distance_matrix=pd.DataFrame([[0.0]], index=["CL:0000236"], columns=["CL:0000236"]))
    with pytest.raises(ValueError, match="no row or column"):
        make_model(cell_type_categories=["CL:0000236", "CL:0000624"],
                   ontology_distance_matrix=pd.DataFrame([[0.0]], index=["CL:0000236"], columns=["CL:0000236"]))
    model = make_model(cell_type_categories=VALIDATION_TYPES)
    with pytest.raises(ValueError, match=r"validation_cell_type_index_n: 7 \(cell 3"):
        model.eval()
        codes_n = torch.zeros(64, dtype=torch.long)
        codes_n[3] = 7
        model.validate(types.SimpleNamespace(current_epoch=0, global_rank=0), types.SimpleNamespace(log=lambda *a, **k: None),
                       0, x_ng, GENES, batch_index_n, validation_cell_type_index_n=codes_n)


def test_train_scvi_validation_split_and_cell_type_metrics(tmp_path: Path) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=1200, n_genes=80, n_shards=2, seed=2)
    output = tmp_path / "out" / "scvi.ckpt"
    run_cli("train-scvi", "--input", str(tmp_path / "sim" / "*.h5ad"), "--batch-key", "batch", "--max-epochs", "2",
            "--batch-size", "128", "--n-hidden", "32", "--accelerator", "cpu", "--val-fraction", "0.25",
            "--cell-type-key", "cell_type_ontology_term_id", "--val-reservoir-size", "100", "--output", str(output),
            "--quiet")
    table = pd.read_csv(str(output) + ".metrics.csv")
    assert list(table["epoch"]) == [0, 1]
    for column in ("val_loss", "val_cell_type_classifier_accuracy", "val_ontology_spearman"):
        assert column in table.columns and np.isfinite(table[column]).all(), column
    assert (table["val_cell_type_classifier_accuracy"] > 0.3).all()  # 6 simulated types; chance is below 0.35
    assert table["val_ontology_spearman"].between(-1, 1).all()
    # The recipe rebuilds a model without the validation settings, and it predicts.
    module = CellariumModule.from_checkpoint(str(output))
    assert module.model.cell_type_categories is None

    from cellarium_steps.pipelines.scvi import HeldOutCells

    names = np.array([f"cell{i}" for i in range(20000)], dtype=object)
    mask = HeldOutCells(0.25, seed=0).mask(names)
    assert abs(mask.mean() - 0.25) < 0.02
    assert np.array_equal(mask, HeldOutCells(0.25, seed=0).mask(names.copy()))
    assert not np.array_equal(mask, HeldOutCells(0.25, seed=1).mask(names))


def test_train_scvi_validation_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=40, n_genes=20, n_shards=1)
    shard = str(tmp_path / "sim" / "shard_000.h5ad")
    code = cli_main(["train-scvi", "--input", shard, "--cell-type-key", "cell_type_ontology_term_id",
                     "--output", str(tmp_path / "m.ckpt"), "--accelerator", "cpu"])
    assert code == 2 and "--val-fraction" in capsys.readouterr().err
    code = cli_main(["train-scvi", "--input", shard, "--val-fraction", "1.5", "--output", str(tmp_path / "m.ckpt"),
                     "--accelerator", "cpu"])
    assert code == 2 and "--val-fraction" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# train-scvi on two DDP processes, and input errors that name the cell and shard


def knn_accuracy(checkpoint: Path, shards: str) -> float:
    """15-NN cell type accuracy (5-fold) of the checkpoint's latent means on the labelled cells of ``shards``."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    module = CellariumModule.from_checkpoint(str(checkpoint))
    categories = list(module.recipe["data"]["batch_categories"])
    latents, labels = [], []
    for path in sorted(Path(shards).parent.glob(Path(shards).name)):
        adata = ad.read_h5ad(path)
        batch = {"x_ng": torch.tensor(adata.X.toarray(), dtype=torch.float32).to_sparse_csr(),
                 "var_names_g": adata.var_names.values,
                 "batch_index_n": torch.tensor([categories.index(b) for b in adata.obs["batch"].astype(str)])}
        with torch.no_grad():
            latents.append(module.predict_step(batch, 0)["x_ng"].numpy())
        labels.append(adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy())
    latent_nk, label_n = np.concatenate(latents), np.concatenate(labels)
    keep = label_n != "unknown"
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=15), latent_nk[keep], label_n[keep], cv=folds).mean())


@pytest.mark.slow
def test_train_scvi_ddp_two_cpu_processes_gives_the_same_quality(tmp_path: Path) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=2400, n_genes=120, n_shards=2, seed=4)
    shards = str(tmp_path / "sim" / "*.h5ad")
    accuracy = {}
    for devices in ("1", "2"):
        output = tmp_path / f"devices{devices}" / "scvi.ckpt"
        run_cli("train-scvi", "--input", shards, "--batch-key", "batch", "--max-epochs", "6", "--batch-size", "64",
                "--n-hidden", "64", "--kl-warmup-steps", "60", "--accelerator", "cpu", "--devices", devices,
                "--seed", "1", "--output", str(output), "--quiet")
        checkpoint = torch.load(output, weights_only=True)
        steps_per_epoch = -(-2400 // (64 * int(devices)))  # each rank takes an equal share of the batches
        assert checkpoint["global_step"] == 6 * steps_per_epoch
        accuracy[devices] = knn_accuracy(output, shards)
    assert accuracy["1"] > 0.6  # 6 simulated types: the latent separates them
    assert abs(accuracy["2"] - accuracy["1"]) < 0.05, accuracy


def test_predict_names_the_cell_and_shard_of_a_batch_outside_the_trained_ones(tmp_path: Path) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=300, n_genes=40, n_shards=1, seed=5)
    shard = tmp_path / "sim" / "shard_000.h5ad"
    checkpoint = tmp_path / "scvi.ckpt"
    run_cli("train-scvi", "--input", str(shard), "--batch-key", "batch", "--max-epochs", "1", "--batch-size", "128",
            "--n-hidden", "16", "--accelerator", "cpu", "--output", str(checkpoint), "--quiet")
    adata = ad.read_h5ad(shard)
    batch = adata.obs["batch"].astype(str).to_numpy()
    batch[123] = "a_new_batch"
    adata.obs["batch"] = pd.Categorical(batch)
    query = tmp_path / "query" / "shard_new.h5ad"
    query.parent.mkdir()
    adata.write_h5ad(query)
    result = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(query), "--output",
                     str(tmp_path / "cells.parquet"), "--accelerator", "cpu", "--quiet", check=False)
    assert result.returncode == 2, result.stderr
    assert str(query) in result.stderr and repr(adata.obs_names[123]) in result.stderr
    assert not (tmp_path / "cells.parquet").exists()


def test_train_scvi_names_the_shard_and_cell_of_non_integer_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import scipy.sparse as sp

    simulate_shards(str(tmp_path / "sim"), n_cells=200, n_genes=30, n_shards=2, seed=6)
    second = tmp_path / "sim" / "shard_001.h5ad"
    adata = ad.read_h5ad(second)
    x = adata.X.astype(np.float32).toarray()
    x[57, 3] = 2.5
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(second)
    code = cli_main(["train-scvi", "--input", str(tmp_path / "sim" / "*.h5ad"), "--max-epochs", "1",
                     "--batch-size", "64", "--n-hidden", "16", "--accelerator", "cpu",
                     "--output", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and "non-integer" in err and str(second) in err and "row 57" in err
    assert not (tmp_path / "m.ckpt").exists()


def test_select_cells_keeps_csr_rows_with_torch_operations() -> None:
    """The held-out split runs on the batch's device: CSR row selection without scipy (CUDA tensors have no numpy)."""
    from cellarium_steps.pipelines.scvi import select_cells

    generator = torch.Generator().manual_seed(0)
    dense_ng = torch.poisson(torch.rand(9, 7, generator=generator)) * (torch.rand(9, 7, generator=generator) < 0.4)
    dense_ng[3] = 0  # an empty row
    batch = {"x_ng": dense_ng.to_sparse_csr(), "batch_index_n": torch.arange(9), "obs_names_n": np.arange(9).astype(str)}
    for keep_n in (np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=bool), np.zeros(9, dtype=bool)):
        selected = select_cells(batch, keep_n)
        assert selected["x_ng"].layout == torch.sparse_csr
        assert torch.equal(selected["x_ng"].to_dense(), dense_ng[torch.from_numpy(keep_n)])
        assert torch.equal(selected["batch_index_n"], torch.arange(9)[torch.from_numpy(keep_n)])
        assert list(selected["obs_names_n"]) == list(np.arange(9).astype(str)[keep_n])
