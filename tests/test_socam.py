"""Ontology-aware classification: the Cell Ontology helpers, SOCAM, LogisticRegression (against
scikit-learn on the real PBMC labels), the train-socam / train-logreg steps, and ContrastiveMLP."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch
from conftest import run_cli, split_into_shards

from cellarium_steps.data import ShardDataModule
from cellarium_steps.models import SOCAM, ContrastiveMLP, LogisticRegression
from cellarium_steps.models.contrastive_mlp import nt_xent_loss
from cellarium_steps.ontology import (
    ancestors_within,
    compute_cl_distance_matrix,
    descendant_tensor,
    term_labels,
    validate_cl_names,
)
from cellarium_steps.runner import CellariumModule, apply_transforms, build_trainer
from cellarium_steps.steps.cli import main as cli_main
from cellarium_steps.pipelines.labels import DEFAULT_MAX_EPOCHS_CAP, DEFAULT_TRAINING_STEPS, default_max_epochs
from cellarium_steps.transforms.augment import BinomialResample, DuplicateViews, GeneDropout

CD4_T = "CL:0000624"
NAIVE_CD4_T = "CL:0000895"
MEMORY_CD4_T = "CL:0000897"
TREG = "CL:0000792"
B_CELL = "CL:0000236"
#: the 12 terms of the merged PBMC file, at mixed depth
PBMC_TERMS = sorted([
    "CL:0000113", "CL:0000236", "CL:0000492", "CL:0000623", "CL:0000624", "CL:0000625",
    "CL:0000792", "CL:0000794", "CL:0000895", "CL:0000897", "CL:0000900", "CL:0001054",
])


@pytest.fixture
def one_thread():
    """Small dense problems run fastest on one thread, and do not stall when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Ontology


def test_descendants_of_cd4_t_include_naive_cd4_t() -> None:
    names = [CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, B_CELL]
    d = descendant_tensor(names)
    assert d.shape == (4, 4) and torch.equal(torch.diagonal(d), torch.ones(4))
    assert d[0, 1] == 1 and d[0, 2] == 1  # naive and memory CD4 T are CD4 T cells
    assert d[1, 0] == 0 and d[0, 3] == 0 and d[3, 0] == 0
    assert ancestors_within(NAIVE_CD4_T, names) == [CD4_T]
    assert ancestors_within(B_CELL, names) == []
    assert term_labels([CD4_T, NAIVE_CD4_T]) == [
        "CD4-positive, alpha-beta T cell", "naive thymus-derived CD4-positive, alpha-beta T cell",
    ]


def test_descendant_tensor_of_the_pbmc_terms_is_transitive() -> None:
    d = descendant_tensor(PBMC_TERMS)
    # reachable in two steps implies reachable in one: the relation is closed
    assert torch.all(((d @ d) > 0) <= (d > 0))
    # CD4 T has naive, memory, helper and regulatory CD4 T below it in this set
    row = d[PBMC_TERMS.index(CD4_T)]
    assert {PBMC_TERMS[j] for j in torch.nonzero(row).flatten().tolist()} >= {CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, TREG}


def test_distance_matrix_is_symmetric_shortest_paths() -> None:
    names = [CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, B_CELL, TREG]
    dist = compute_cl_distance_matrix(names)
    assert list(dist.index) == names and list(dist.columns) == names
    values = dist.to_numpy()
    assert np.array_equal(values, values.T)
    assert np.all(np.diag(values) == 0) and np.all(np.isfinite(values))
    assert dist.loc[CD4_T, NAIVE_CD4_T] == 1  # parent and child
    assert dist.loc[NAIVE_CD4_T, MEMORY_CD4_T] == 2  # siblings under CD4 T
    assert dist.loc[NAIVE_CD4_T, B_CELL] > dist.loc[NAIVE_CD4_T, MEMORY_CD4_T]


def test_the_cl_release_is_the_pinned_one() -> None:
    """pyproject pins cellxgene-ontology-guide, which bundles CL: bumping it changes labels and hierarchy on purpose."""
    from importlib.metadata import version

    from cellarium_steps.ontology import ontology_version

    assert version("cellxgene-ontology-guide") == "1.11.1"
    assert ontology_version() == "CL v2026-03-26 (cellxgene schema 7.1.0)"


def test_unknown_id_raises_naming_it_and_the_version() -> None:
    with pytest.raises(ValueError, match="'CL:9999999'") as err:
        validate_cl_names([CD4_T, "CL:9999999", "T cell"])
    assert "'T cell'" in str(err.value) and "CL v" in str(err.value)
    with pytest.raises(ValueError, match="CL:9999999"):
        descendant_tensor([CD4_T, "CL:9999999"])


# ---------------------------------------------------------------------------------------------------------------
# SOCAM


def _socam(names: list[str], n_genes: int = 5, **kwargs) -> SOCAM:
    return SOCAM(
        n_obs=kwargs.pop("n_obs", 100), var_names_g=np.array([f"g{i}" for i in range(n_genes)]),
        descendant_tensor=descendant_tensor(names), cl_names=names, **kwargs,
    )


def test_propagated_probabilities_never_increase_from_parent_to_child() -> None:
    model = _socam(PBMC_TERMS, n_genes=30, W_init_scale=1.0, seed=3)
    with torch.no_grad():
        model.b_c.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    x_ng = torch.rand(200, 30, generator=torch.Generator().manual_seed(2)) * 3
    out = model.predict(x_ng, model.var_names_g)
    probs_nc = out["cell_type_probs_nc"]
    assert probs_nc.shape == (200, model.n_active_cats) == (200, 12)
    raw_nc = torch.softmax(out["y_logits_nc"], dim=-1)
    d = model.active_descendant_tensor_cc
    torch.testing.assert_close(probs_nc, raw_nc @ d.T)
    assert torch.all(probs_nc <= 1 + 1e-6) and torch.all(probs_nc >= raw_nc - 1e-7)
    parents, children = torch.nonzero(d - torch.eye(12), as_tuple=True)
    assert len(parents) >= 4  # CD4 T and mononuclear phagocyte have children here
    assert torch.all(probs_nc[:, parents] >= probs_nc[:, children] - 1e-6)


def test_mixed_depth_loss_is_minus_log_of_the_propagated_probability() -> None:
    names = [CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, B_CELL]
    model = _socam(names, n_genes=3, n_obs=2, W_init_scale=0.5, seed=0)
    x_ng = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.5, 0.0]])
    labels = np.array([CD4_T, NAIVE_CD4_T], dtype=object)
    loss = model(x_ng, model.var_names_g, labels)["loss"]
    p_nc = torch.softmax(x_ng @ model.W_gc + model.b_c, dim=-1)  # active order: sorted names
    order = model.active_cl_names
    cd4_family = [order.index(c) for c in (CD4_T, NAIVE_CD4_T, MEMORY_CD4_T)]
    expected = -torch.log(p_nc[0, cd4_family].sum()) - torch.log(p_nc[1, order.index(NAIVE_CD4_T)])
    expected = expected + model.W_gc.abs().sum() / model.W_prior_scale
    torch.testing.assert_close(loss, expected)


def test_parent_label_does_not_push_down_its_children() -> None:
    """A cell labelled CD4 T: with propagation every descendant's logit is pulled up (or left), with a
    flat softmax the children are pushed down as negatives."""
    names = [CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, B_CELL]
    x_ng = torch.tensor([[1.0, 2.0, 0.5]])
    labels = np.array([CD4_T], dtype=object)
    results = {}
    for propagate in (True, False):
        model = _socam(names, n_genes=3, n_obs=1, W_init_scale=0.3, seed=1, probability_propagation_flag=propagate,
                       W_prior_scale=1e6)
        order = model.active_cl_names
        children = [order.index(NAIVE_CD4_T), order.index(MEMORY_CD4_T)]
        p0 = torch.softmax(model.logits(x_ng), -1).detach()
        model(x_ng, model.var_names_g, labels)["loss"].backward()
        grad_c = model.b_c.grad.clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(20):
            optimizer.zero_grad()
            model(x_ng, model.var_names_g, labels)["loss"].backward()
            optimizer.step()
        p1 = torch.softmax(model.logits(x_ng), -1).detach()
        results[propagate] = (grad_c, children, order, p0, p1)
    grad_c, children, order, p0, p1 = results[True]
    assert torch.all(grad_c[children] <= 0) and grad_c[order.index(B_CELL)] > 0
    assert torch.all(p1[0, children] >= p0[0, children])
    flat_grad_c, _, _, _, flat_p1 = results[False]
    assert torch.all(flat_grad_c[children] > 0)
    assert torch.all(p1[0, children] > flat_p1[0, children])


def test_unlabelled_cells_are_masked_and_the_loss_is_scaled_to_n_obs() -> None:
    names = [CD4_T, NAIVE_CD4_T, B_CELL]
    model = _socam(names, n_genes=3, n_obs=1000, W_init_scale=0.5)
    x_ng = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    labels = np.array([CD4_T, "unknown", None, B_CELL], dtype=object)
    loss = model(x_ng.to_sparse_csr(), model.var_names_g, labels)["loss"]
    prior = model.W_gc.abs().sum() / model.W_prior_scale
    keep = [0, 3]
    loss_labelled = model(x_ng[keep], model.var_names_g, labels[keep])["loss"]
    torch.testing.assert_close(loss, loss_labelled)
    # each batch estimates the sum over n_obs labelled cells: two one-cell batches average to the same
    single = [model(x_ng[[k]], model.var_names_g, labels[[k]])["loss"] - prior for k in keep]
    torch.testing.assert_close(loss - prior, (single[0] + single[1]) / 2)
    assert single[0].item() > 0
    # a batch with no labelled cell: the prior alone, and every parameter still gets a gradient (DDP needs it)
    empty = model(x_ng[1:3], model.var_names_g, labels[1:3])["loss"]
    torch.testing.assert_close(empty, prior)
    empty.backward()
    assert model.b_c.grad is not None and torch.all(model.b_c.grad == 0)


def test_socam_subset_sorting_ancestors_and_errors() -> None:
    names = [B_CELL, NAIVE_CD4_T, CD4_T, MEMORY_CD4_T]
    model = _socam(names, cl_name_subset=[NAIVE_CD4_T, B_CELL])
    assert model.active_cl_names == sorted([NAIVE_CD4_T, B_CELL, CD4_T])  # CD4 T added as an ancestor
    without = _socam(names, cl_name_subset=[NAIVE_CD4_T, B_CELL], include_ancestors_of_cl_name_subset=False)
    assert without.active_cl_names == [B_CELL, NAIVE_CD4_T]
    assert without.predict(torch.rand(3, 5), without.var_names_g)["cell_type_probs_nc"].shape == (3, 2)
    with pytest.raises(ValueError, match=MEMORY_CD4_T):
        without(torch.rand(2, 5), without.var_names_g, np.array([B_CELL, MEMORY_CD4_T], dtype=object))
    with pytest.raises(ValueError, match="cl_name_subset is empty"):
        _socam(names, cl_name_subset=[])
    with pytest.raises(ValueError, match="CL:0000625"):
        _socam(names, cl_name_subset=["CL:0000625"])
    with pytest.raises(ValueError, match="var_names_g"):
        model(torch.rand(2, 4), np.array(["g0", "g1", "g2", "g3"]), np.array([B_CELL, B_CELL], dtype=object))


# ---------------------------------------------------------------------------------------------------------------
# LogisticRegression


def _normalized_log1p(x: sp.csr_matrix, target: float = 1e4) -> sp.csr_matrix:
    x = x.astype(np.float64)
    total = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(target / np.maximum(total, 1e-12)) @ x)
    x.data = np.log1p(x.data)
    return x


@pytest.fixture(scope="module")
def pbmc_labelled_top_genes(pbmc_multibatch: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All labelled cells of the merged file: log1p(normalised counts) of the 200 highest-variance genes."""
    labels = pbmc_multibatch.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    labelled = labels != "unknown"
    x = _normalized_log1p(sp.csr_matrix(pbmc_multibatch.X[labelled]))
    mean_g = np.asarray(x.mean(axis=0)).ravel()
    var_g = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean_g**2
    top = np.sort(np.argsort(-var_g, kind="stable")[:200])
    categories, y = np.unique(labels[labelled], return_inverse=True)
    return x[:, top].toarray(), y, categories


def test_logistic_regression_loss_is_scaled_likelihood_plus_laplace_prior() -> None:
    genes = np.array(["a", "b", "c"])
    model = LogisticRegression(n_obs=50, var_names_g=genes, y_categories=np.array(["u", "v", "w"]),
                               W_prior_scale=0.5, W_init_scale=0.3)
    x_ng = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    y_n = torch.tensor([0, 2, -1, 1, 1])  # -1: unlabelled
    loss = model(x_ng, genes, y_n, np.array(["u", "v", "w"]))["loss"]
    keep = y_n >= 0
    nll = torch.nn.functional.cross_entropy(x_ng[keep] @ model.W_gc + model.b_c, y_n[keep], reduction="sum")
    log_laplace_norm = model.W_gc.numel() * math.log(2 * 0.5)
    expected = nll * 50 / 4 + model.W_gc.abs().sum() / 0.5 + log_laplace_norm
    torch.testing.assert_close(loss, expected)
    # the same number as Pyro's Trace_ELBO of the model (plate of n_obs, subsampled) and the Delta guide
    x_mg, y_m = x_ng[keep], y_n[keep]
    elbo_loss = pyro.infer.Trace_ELBO().differentiable_loss(model.model, model.guide, x_mg, y_m)
    torch.testing.assert_close(loss, elbo_loss)
    # the batch's categories map to the model's by name; names work as targets too
    reordered = model(x_ng, genes, torch.tensor([2, 0, -1, 1, 1]), np.array(["w", "v", "u"]))["loss"]
    torch.testing.assert_close(reordered, loss)
    by_name = model(x_ng, genes, np.array(["u", "w", "unknown", "v", "v"], dtype=object))["loss"]
    torch.testing.assert_close(by_name, loss)
    with pytest.raises(ValueError, match="'z'"):
        model(x_ng, genes, torch.tensor([0, 1, 0, 0, 0]), np.array(["u", "z"]))
    assert model.predict(x_ng.to_sparse_csr(), genes)["y_logits_nc"].shape == (5, 3)
    unlabelled = model(x_ng[:2], genes, torch.tensor([-1, -1]), np.array(["u", "v", "w"]))["loss"]
    unlabelled.backward()
    assert model.b_c.grad is not None and torch.all(model.b_c.grad == 0)


@pytest.mark.slow
def test_logistic_regression_agrees_with_scikit_learn_l1(pbmc_labelled_top_genes, one_thread) -> None:
    """MAP under Laplace(0, b) with the likelihood summed over n cells minimises
    sum_n loss_n + ||W||_1 / b, i.e. scikit-learn's C * sum_n loss_n + ||W||_1 (divided by C) with C = b."""
    from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

    x_ng, y_n, categories = pbmc_labelled_top_genes
    b = 0.003
    start = time.perf_counter()
    if _sklearn_version() >= (1, 8):  # penalty= is deprecated there; l1_ratio=1 is the lasso
        reference = SklearnLogisticRegression(l1_ratio=1.0, solver="saga", C=b, tol=1e-4, max_iter=1000)
    else:
        reference = SklearnLogisticRegression(penalty="l1", solver="saga", C=b, tol=1e-4, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.fit(x_ng, y_n)
    sklearn_s = time.perf_counter() - start
    sklearn_pred = (x_ng @ reference.coef_.T + reference.intercept_).argmax(1)

    genes = np.array([f"g{i}" for i in range(x_ng.shape[1])])
    model = LogisticRegression(n_obs=len(y_n), var_names_g=genes, y_categories=categories, W_prior_scale=b,
                               W_init_scale=0.0)
    x_t = torch.tensor(x_ng, dtype=torch.float32)
    y_t = torch.tensor(y_n)
    steps = 2000
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / steps))
    start = time.perf_counter()
    for _ in range(steps):  # full batch
        optimizer.zero_grad()
        model(x_t, genes, y_t, categories)["loss"].backward()
        optimizer.step()
        scheduler.step()
    ours_s = time.perf_counter() - start
    ours_pred = model.predict(x_t, genes)["y_logits_nc"].argmax(1).numpy()
    agreement = float((ours_pred == sklearn_pred).mean())
    print(f"\nsklearn L1 saga {sklearn_s:.1f} s, ours {ours_s:.1f} s; agreement {agreement:.4f} on {len(y_n)} cells; "
          f"train accuracy ours {(ours_pred == y_n).mean():.3f}, sklearn {(sklearn_pred == y_n).mean():.3f}")
    assert agreement >= 0.99


def _sklearn_version() -> tuple[int, int]:
    import sklearn

    major, minor = sklearn.__version__.split(".")[:2]
    return int(major), int(minor)


# ---------------------------------------------------------------------------------------------------------------
# The train-socam and train-logreg steps


@pytest.fixture(scope="module")
def small_labelled_shards(pbmc_multibatch: ad.AnnData, tmp_path_factory: pytest.TempPathFactory):
    """2,000 cells of the merged file (1,500 labelled at mixed depth, 500 'unknown') in 2 shards, and 200 genes."""
    rng = np.random.default_rng(0)
    labels = pbmc_multibatch.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    labelled = np.flatnonzero(labels != "unknown")
    unknown = np.flatnonzero(labels == "unknown")
    rows = np.sort(np.concatenate([rng.choice(labelled, 1500, replace=False), rng.choice(unknown, 500, replace=False)]))
    adata = pbmc_multibatch[rows].copy()
    directory = tmp_path_factory.mktemp("socam")
    shards = split_into_shards(adata, directory / "shards", 2)
    x = _normalized_log1p(sp.csr_matrix(adata.X))
    mean_g = np.asarray(x.mean(axis=0)).ravel()
    var_g = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean_g**2
    genes = adata.var_names[np.argsort(-var_g, kind="stable")[:200]].tolist()
    gene_file = directory / "genes.txt"
    gene_file.write_text("\n".join(genes) + "\n")
    return shards, str(gene_file), adata


def _predict(checkpoint: str, shards: list[str]) -> tuple[CellariumModule, list[dict]]:
    module = CellariumModule.from_checkpoint(checkpoint)
    module.eval()
    data = module.recipe["data"]  # as the predict step reads the cells: with the batch coding the recipe names
    datamodule = ShardDataModule(shards, batch_size=512, batch_key=data.get("batch_key"),
                                 batch_categories=data.get("batch_categories"))
    trainer = build_trainer(devices=1, accelerator="cpu")
    return module, trainer.predict(module, datamodule=datamodule)


@pytest.mark.slow
def test_train_socam_cli_checkpoint_rebuilds_and_predicts(small_labelled_shards, tmp_path: Path) -> None:
    shards, gene_file, adata = small_labelled_shards
    output = str(tmp_path / "socam.ckpt")
    run_cli("train-socam", "--input", *shards, "--genes", gene_file, "--output", output,
            "--max-epochs", "8", "--learning-rate", "0.05", "--batch-size", "512", "--quiet")
    classes = pd.read_csv(output + ".classes.csv")
    assert classes["cl_name"].tolist() == PBMC_TERMS
    assert classes.loc[classes.cl_name == CD4_T, "label"].item() == "CD4-positive, alpha-beta T cell"
    module, predictions = _predict(output, shards)
    model = module.model
    assert isinstance(model, SOCAM) and model.n_obs == 1500 and model.active_cl_names == PBMC_TERMS
    assert [type(t).__name__ for t in module.transforms] == ["NormalizeTotal", "Log1p", "Filter"]
    probs_nc = torch.cat([p["cell_type_probs_nc"] for p in predictions])
    assert probs_nc.shape == (2000, model.n_active_cats) == (2000, 12)
    # the model learnt something: the most specific prediction is consistent with the label
    accuracy = _labelled_accuracy(module, predictions, adata)
    print(f"\ntrain-socam on 1,500 labelled cells: {accuracy:.3f} of them predicted as the label "
          "or one of its descendants")
    assert accuracy > 0.5  # chance is well below 0.2
    assert Path(output + ".provenance.json").is_file()


def test_train_logreg_in_process(small_labelled_shards, tmp_path: Path) -> None:
    shards, gene_file, _ = small_labelled_shards
    output = str(tmp_path / "logreg.ckpt")
    # No --max-epochs: the default is worked out from the cell count (2,000 cells, 2 steps an epoch: the cap).
    assert cli_main(["train-logreg", "--input", *shards, "--genes", gene_file, "--output", output,
                     "--batch-size", "1024", "--quiet"]) == 0
    provenance = json.loads(Path(output + ".provenance.json").read_text())
    assert provenance["config"]["max_epochs"] == default_max_epochs(2000, 1024) == DEFAULT_MAX_EPOCHS_CAP
    module, predictions = _predict(output, shards[:1])
    assert isinstance(module.model, LogisticRegression) and module.model.n_obs == 1500
    assert list(module.model.y_categories) == PBMC_TERMS
    assert torch.cat([p["y_logits_nc"] for p in predictions]).shape == (1000, 12)
    assert pd.read_csv(output + ".classes.csv")["cl_name"].tolist() == PBMC_TERMS


def test_default_epochs_aim_at_a_fixed_number_of_optimizer_steps() -> None:
    assert default_max_epochs(13_000, 1024) == math.ceil(DEFAULT_TRAINING_STEPS / 13)  # the LOSO folds: 39
    assert default_max_epochs(10_000_000, 1024) == 1
    assert default_max_epochs(200_000, 1024) == math.ceil(DEFAULT_TRAINING_STEPS / 196)
    assert default_max_epochs(200_000, 1024, devices=2) == math.ceil(DEFAULT_TRAINING_STEPS / 98)
    assert default_max_epochs(100, 1024) == DEFAULT_MAX_EPOCHS_CAP


def _labelled_accuracy(module: CellariumModule, predictions: list[dict], adata: ad.AnnData) -> float:
    """Share of labelled cells whose highest-logit term is the label or one of its descendants."""
    model = module.model
    obs_names = np.concatenate([p["obs_names_n"] for p in predictions])
    labels = adata.obs["cell_type_ontology_term_id"].astype(str).reindex(obs_names).to_numpy()
    logits_nc = torch.cat([p["y_logits_nc"] for p in predictions])
    labelled = labels != "unknown"
    y = torch.tensor([model.active_cl_names.index(c) for c in labels[labelled]])
    return float((model.active_descendant_tensor_cc[y, logits_nc[labelled].argmax(-1)] > 0).float().mean())


@pytest.mark.slow
def test_train_socam_on_pca_components_and_on_scvi_latents(small_labelled_shards, tmp_path: Path) -> None:
    """The inputs are configurable: a fitted PCA's components or scVI's latent means instead of genes. The
    feature pipeline travels in the checkpoint, stays frozen (batch norm in eval mode) and predict rebuilds it."""
    shards, gene_file, adata = small_labelled_shards
    pca = str(tmp_path / "pca.parquet")
    run_cli("pca", "--input", *shards, "--genes", gene_file, "--n-components", "20", "--output", pca, "--quiet")
    scvi = str(tmp_path / "scvi.ckpt")
    run_cli("train-scvi", "--input", *shards, "--batch-key", "source", "--genes", gene_file, "--max-epochs", "3",
            "--n-hidden", "32", "--n-latent", "8", "--batch-size", "256", "--accelerator", "cpu", "--output", scvi,
            "--quiet")
    scvi_module = CellariumModule.from_checkpoint(scvi)
    for option, path, names in (("--pca", pca, [f"PC{i + 1}" for i in range(20)]),
                                ("--scvi", scvi, [f"scvi_{i}" for i in range(8)])):
        output = str(tmp_path / f"socam{option[2:]}.ckpt")
        run_cli("train-socam", "--input", *shards, option, path, "--max-epochs", "20", "--learning-rate", "0.05",
                "--batch-size", "512", "--output", output, "--quiet")
        module, predictions = _predict(output, shards)
        assert list(module.model.var_names_g) == names
        features = module.transforms[0]
        assert [type(t).__name__ for t in module.transforms] == ["ModelFeatures"]
        assert not any(p.requires_grad for p in features.parameters())
        if option == "--scvi":
            # cells are read with scVI's batch coding, in training and in predict
            assert module.recipe["data"]["batch_key"] == "source"
            assert module.recipe["data"]["batch_categories"] == scvi_module.recipe["data"]["batch_categories"]
            # the scVI weights and batch-norm statistics in the SOCAM checkpoint are the trained scVI's, untouched
            for key, value in scvi_module.model.state_dict().items():
                assert torch.equal(features.model.state_dict()[key], value), key
        accuracy = _labelled_accuracy(module, predictions, adata)
        print(f"\ntrain-socam {option}: {accuracy:.3f} of the labelled cells predicted as the label or a descendant")
        assert accuracy > 0.5  # chance is well below 0.2
        cells = str(tmp_path / f"cells{option[2:]}.parquet")
        assert cli_main(["predict", "--checkpoint", output, "--input", *shards, "--output", cells, "--quiet"]) == 0
        import pyarrow.dataset as ds

        table = ds.dataset(cells).to_table()
        assert table.num_rows == 2000 and "cell_type_ontology_term_id" in table.schema.names
    code = cli_main(["train-socam", "--input", *shards, "--pca", pca, "--genes", gene_file,
                     "--output", str(tmp_path / "x.ckpt")])
    assert code == 2 and not (tmp_path / "x.ckpt").exists()


def test_label_that_is_not_a_cl_id_fails_with_one_line(small_labelled_shards, tmp_path: Path, capsys) -> None:
    _, gene_file, adata = small_labelled_shards
    bad = adata[:50].copy()
    column = bad.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    column[7] = "T cell"
    bad.obs["cell_type_ontology_term_id"] = pd.Categorical(column)
    path = tmp_path / "bad_labels.h5ad"
    bad.write_h5ad(path)
    output = tmp_path / "never.ckpt"
    assert cli_main(["train-socam", "--input", str(path), "--genes", gene_file, "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'T cell'" in err and str(path) in err and "Cell Ontology" in err
    assert not output.exists()
    # a column that does not exist is named too
    assert cli_main(["train-socam", "--input", str(path), "--output", str(output), "--cell-type-key", "no_such"]) == 2
    assert "no_such" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# ContrastiveMLP and augmentations


def test_nt_xent_matches_a_hand_computed_value_for_two_pairs() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    angle = 0.3
    z2 = torch.tensor([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    t = 0.5
    views = [z1[0], z1[1], z2[0], z2[1]]  # anchors 0, 1 pair with 2, 3
    expected = 0.0
    for a in range(4):
        positive = (a + 2) % 4
        sims = {k: float(views[a] @ views[k]) / t for k in range(4) if k != a}
        expected += -(sims[positive] - math.log(sum(math.exp(s) for s in sims.values())))
    expected /= 4
    loss = nt_xent_loss(z1, z2, temperature=t)
    assert abs(float(loss) - expected) < 1e-6
    # ContrastiveMLP's forward splits the batch into the two halves
    model = ContrastiveMLP(n_obs=2, hidden_size=[4], embed_dim=2, temperature=t)
    model.layers = torch.nn.Identity()
    assert abs(float(model(torch.cat([z1, z2]))["loss"]) - expected) < 1e-6


def test_contrastive_mlp_loss_decreases_on_a_tiny_problem(one_thread) -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, 20) * 3
    x_ng = (centers.repeat_interleave(8, 0) + torch.randn(32, 20)).clamp(min=0).round()
    augment = [DuplicateViews(), BinomialResample(0.5, 1.0, seed=1), GeneDropout(0.2, seed=2)]
    model = ContrastiveMLP(n_obs=20, hidden_size=[32, 16], embed_dim=8, temperature=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        batch = apply_transforms(augment, {"x_ng": x_ng})
        loss = model(torch.log1p(batch["x_ng"]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    model.eval()
    embedding = model.predict(torch.log1p(x_ng))["x_ng"]
    assert embedding.shape == (32, 8)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(32))


def test_augmentations_are_seeded_sparse_and_keep_the_views_paired() -> None:
    x = sp.random(6, 10, density=0.5, random_state=0, format="csr") * 20
    x.data = np.round(x.data) + 1
    x_ng = torch.sparse_csr_tensor(torch.from_numpy(x.indptr), torch.from_numpy(x.indices),
                                   torch.from_numpy(x.data).float(), size=x.shape,
                                   check_invariants=True)
    total_n = torch.from_numpy(np.asarray(x.sum(1)).ravel()).float()
    batch = DuplicateViews()(x_ng=x_ng, total_mrna_umis_n=total_n, obs_names_n=np.arange(6).astype(str).astype(object),
                             var_names_g=np.arange(10))
    assert batch["x_ng"].layout == torch.sparse_csr and batch["x_ng"].shape == (12, 10)
    dense = batch["x_ng"].to_dense()
    torch.testing.assert_close(dense[:6], x_ng.to_dense())
    torch.testing.assert_close(dense[6:], x_ng.to_dense())
    assert list(batch["obs_names_n"][6:]) == list(batch["obs_names_n"][:6]) and "var_names_g" not in batch

    def run(seed: int) -> dict:
        out = BinomialResample(0.3, 0.7, seed=seed)(batch["x_ng"], batch["total_mrna_umis_n"])
        return GeneDropout(0.3, seed=seed)(out["x_ng"], out["total_mrna_umis_n"])

    first, again, other = run(0), run(0), run(1)
    torch.testing.assert_close(first["x_ng"].to_dense(), again["x_ng"].to_dense())
    assert not torch.equal(first["x_ng"].to_dense(), other["x_ng"].to_dense())
    augmented = first["x_ng"].to_dense()
    assert augmented.layout == torch.strided and first["x_ng"].layout == torch.sparse_csr
    assert torch.all(augmented <= dense) and torch.all(augmented == augmented.round())
    assert not torch.equal(augmented[:6], augmented[6:])  # the two views differ
    torch.testing.assert_close(first["total_mrna_umis_n"], augmented.sum(1))  # totals follow the kept counts


def _nt_xent_on_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: its share of a global batch of embeddings, NT-Xent with gathered negatives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        z1_all, z2_all = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
        results = {}
        for name, sizes in (("equal", [3, 3]), ("unequal", [2, 4])):
            lo = sum(sizes[:rank])
            z1 = z1_all[lo : lo + sizes[rank]].clone().requires_grad_()
            z2 = z2_all[lo : lo + sizes[rank]].clone().requires_grad_()
            loss = nt_xent_loss(z1, z2, temperature=0.7)
            loss.backward()
            results[name] = {"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_nt_xent_gathers_negatives_across_ranks_with_gradients(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_nt_xent_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    z1_all, z2_all = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    z1_all.requires_grad_()
    z2_all.requires_grad_()
    full = nt_xent_loss(z1_all, z2_all, temperature=0.7)  # one process, the whole batch
    full.backward()
    # equal shares: the ranks' mean loss is the global loss, and each rank's gradient (summed over the
    # ranks' losses by the gather's backward) divided by the world size, as DDP averages, is the global one
    torch.testing.assert_close((ranks[0]["equal"]["loss"] + ranks[1]["equal"]["loss"]) / 2, full.detach())
    torch.testing.assert_close(torch.cat([r["equal"]["g1"] for r in ranks]) / 2, z1_all.grad)
    torch.testing.assert_close(torch.cat([r["equal"]["g2"] for r in ranks]) / 2, z2_all.grad)
    # unequal shares: each rank's loss covers its own anchors against all 2 x 6 candidates
    weighted = (2 * ranks[0]["unequal"]["loss"] + 4 * ranks[1]["unequal"]["loss"]) / 6
    torch.testing.assert_close(weighted, full.detach())


class _RecordingModule:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: torch.Tensor, **kwargs) -> None:
        self.logged[name] = float(value.detach())


def test_validate_logs_loss_and_accuracy_and_histograms_need_no_logger() -> None:
    names = [CD4_T, NAIVE_CD4_T, B_CELL]
    model = _socam(names, n_genes=3, n_obs=3, W_init_scale=0.0)
    with torch.no_grad():
        model.W_gc.copy_(torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))  # columns: CD4 T, naive, B
    x_ng = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # cell 0: B predicted B; cell 1: naive CD4 T predicted; cell 2: labelled CD4 T, predicted naive CD4 T
    # (a descendant: right); cell 3: labelled naive CD4 T, predicted B (wrong)
    labels = np.array([B_CELL, NAIVE_CD4_T, CD4_T, NAIVE_CD4_T], dtype=object)
    recorder = _RecordingModule()
    model.validate(None, recorder, 0, x_ng, model.var_names_g, labels)
    assert recorder.logged["val_accuracy"] == pytest.approx(0.75)
    assert recorder.logged["val_loss"] == pytest.approx(model(x_ng, model.var_names_g, labels)["loss"].item())

    histograms = []

    class Experiment:
        def add_histogram(self, name, values, global_step):
            histograms.append((name, tuple(values.shape), global_step))

    trainer = type("T", (), {"global_rank": 0, "global_step": 7, "loggers": [type("L", (), {"experiment": Experiment()})()]})()
    model.on_train_epoch_end(trainer)
    assert histograms == [("W_gc", (3, 3), 7)]
    model.on_train_epoch_end(type("T", (), {"global_rank": 0, "global_step": 7, "loggers": []})())  # silent
    logreg = LogisticRegression(3, model.var_names_g, np.array(["a", "b"]))
    logreg.on_train_epoch_end(trainer)
    assert histograms[-1] == ("W_gc", (3, 2), 7)


# ---------------------------------------------------------------------------------------------------------------
# Predict export: the call and the top-k terms


def test_ontology_call_is_the_most_specific_term_at_or_above_one_half() -> None:
    from cellarium_steps.outputs.prediction_columns import descendant_lists, ontology_call, top_k

    names = [CD4_T, NAIVE_CD4_T, MEMORY_CD4_T, B_CELL]  # CD4 T is the parent of naive and memory
    descendants = descendant_lists(descendant_tensor(names))
    assert descendants == [[1, 2], [], [], []]
    probs = np.array([
        [0.9, 0.7, 0.2, 0.1],   # naive CD4 T reaches 0.5: the deepest such term
        [0.9, 0.45, 0.45, 0.1],  # no child reaches 0.5: stop at CD4 T
        [0.3, 0.2, 0.1, 0.4],   # nothing reaches 0.5 (no common root): the most probable term
        [0.5, 0.5, 0.0, 0.5],   # ties at the threshold: the more specific of the candidates
    ])
    assert ontology_call(probs, descendants).tolist() == [1, 0, 3, 1]
    assert top_k(probs, 3, descendants).tolist() == [[0, 1, 2], [0, 1, 2], [3, 0, 1], [1, 3, 0]]


def test_predict_writes_the_call_and_top_k_of_a_socam_checkpoint(small_labelled_shards, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds

    from cellarium_steps.outputs.prediction_columns import descendant_lists, ontology_call

    shards, gene_file, adata = small_labelled_shards
    output = str(tmp_path / "socam.ckpt")
    assert cli_main(["train-socam", "--input", *shards, "--genes", gene_file, "--output", output, "--max-epochs", "2",
                     "--batch-size", "1024", "--top-k", "4", "--quiet"]) == 0
    cells = str(tmp_path / "cells.parquet")
    assert cli_main(["predict", "--checkpoint", output, "--input", *shards, "--output", cells, "--quiet"]) == 0
    table = ds.dataset(cells).to_table()
    schema = table.schema
    assert schema.names == ["cell_id", "cell_type_probs", "cell_type_ontology_term_id", "cell_type",
                            "cell_type_probability", "cell_type_top_k_ontology_term_id", "cell_type_top_k_probability"]
    assert schema.field("cell_type_ontology_term_id").type == pa.string()
    assert schema.field("cell_type").type == pa.string()
    assert schema.field("cell_type_probability").type == pa.float32()
    assert schema.field("cell_type_top_k_ontology_term_id").type == pa.list_(pa.string())
    assert schema.field("cell_type_top_k_probability").type == pa.list_(pa.float32(), 4)
    df = table.to_pandas()
    # every cell, the 'unknown' ones included
    assert len(df) == 2000 and set(df["cell_id"]) == set(adata.obs_names)
    probs = np.stack(df["cell_type_probs"].to_numpy()).astype(np.float32)
    descendants = descendant_lists(descendant_tensor(PBMC_TERMS))
    call = ontology_call(probs, descendants)
    assert df["cell_type_ontology_term_id"].tolist() == [PBMC_TERMS[i] for i in call]
    assert df["cell_type"].tolist() == term_labels(df["cell_type_ontology_term_id"].tolist())
    np.testing.assert_array_equal(df["cell_type_probability"].to_numpy(), probs[np.arange(len(df)), call])
    top_terms = np.stack(df["cell_type_top_k_ontology_term_id"].to_numpy())
    top_probs = np.stack(df["cell_type_top_k_probability"].to_numpy())
    assert top_terms.shape == top_probs.shape == (2000, 4)
    assert np.all(np.diff(top_probs, axis=1) <= 0)
    np.testing.assert_array_equal(top_probs[:, 0], probs.max(1))
    # hierarchically consistent in every prediction of a trained model: never more likely than the parent
    d = descendant_tensor(PBMC_TERMS).numpy()
    parents, children = np.nonzero(d - np.eye(len(PBMC_TERMS)))
    assert np.all(probs[:, parents] >= probs[:, children] - 1e-6)
    # the call reaches 0.5 whenever any term does, and then no descendant of it does
    reaches = probs.max(1) >= 0.5
    assert np.all(df["cell_type_probability"].to_numpy()[reaches] >= 0.5)
    recipe = CellariumModule.from_checkpoint(output).recipe
    assert recipe["data"]["prediction"]["columns"][1]["k"] == 4
    # old-style predictions (a single vector column) still work: a LogisticRegression checkpoint
    logreg = str(tmp_path / "logreg.ckpt")
    assert cli_main(["train-logreg", "--input", shards[0], "--genes", gene_file, "--output", logreg,
                     "--max-epochs", "1", "--quiet"]) == 0
    assert cli_main(["predict", "--checkpoint", logreg, "--input", shards[0], "--output", str(tmp_path / "lr.parquet"),
                     "--quiet"]) == 0
    assert ds.dataset(str(tmp_path / "lr.parquet")).schema.names == ["cell_id", "y_logits"]


@pytest.mark.ddp
@pytest.mark.slow
def test_train_and_predict_on_2_processes_match_1(small_labelled_shards, tmp_path: Path) -> None:
    """Full-batch steps (the batch holds every cell, so the 2 ranks' batches together are the 1-process
    batch): the global labelled count scales each rank's loss, so the DDP step is the 1-process step and the
    predictions agree to float32 summation order."""
    shards, gene_file, _ = small_labelled_shards
    tables = {}
    for devices in (1, 2):
        output = str(tmp_path / f"d{devices}" / "socam.ckpt")
        run_cli("train-socam", "--input", *shards, "--genes", gene_file, "--output", output, "--max-epochs", "3",
                "--learning-rate", "0.05", "--batch-size", "2048", "--devices", str(devices), "--accelerator", "cpu",
                "--quiet")
        cells = str(tmp_path / f"d{devices}" / "cells.parquet")
        run_cli("predict", "--checkpoint", output, "--input", *shards, "--output", cells, "--devices", str(devices),
                "--accelerator", "cpu", "--quiet")
        tables[devices] = pd.read_parquet(cells).set_index("cell_id").sort_index()
    one, two = tables[1], tables[2]
    assert len(one) == len(two) == 2000 and list(one.index) == list(two.index)
    probs_1, probs_2 = (np.stack(t["cell_type_probs"].to_numpy()) for t in (one, two))
    difference = float(np.abs(probs_1 - probs_2).max())
    print(f"\nDDP 2 vs 1 process: largest |probability difference| {difference:.2e}; calls equal on "
          f"{(one['cell_type_ontology_term_id'] == two['cell_type_ontology_term_id']).mean():.4f} of cells")
    assert difference < 1e-4
    assert (one["cell_type_ontology_term_id"] == two["cell_type_ontology_term_id"]).all()


@pytest.mark.ddp
@pytest.mark.slow
def test_logreg_on_2_processes_matches_1(small_labelled_shards, tmp_path: Path) -> None:
    """LogisticRegression scales its likelihood by the global labelled count as SOCAM does: full-batch
    steps on 2 ranks equal the 1-process steps."""
    shards, gene_file, _ = small_labelled_shards
    logits = {}
    for devices in (1, 2):
        output = str(tmp_path / f"lr{devices}" / "logreg.ckpt")
        run_cli("train-logreg", "--input", *shards, "--genes", gene_file, "--output", output, "--max-epochs", "3",
                "--learning-rate", "0.05", "--batch-size", "2048", "--devices", str(devices), "--accelerator", "cpu",
                "--quiet")
        cells = str(tmp_path / f"lr{devices}" / "cells.parquet")
        run_cli("predict", "--checkpoint", output, "--input", *shards, "--output", cells, "--devices", str(devices),
                "--accelerator", "cpu", "--quiet")
        table = pd.read_parquet(cells).set_index("cell_id").sort_index()
        logits[devices] = np.stack(table["y_logits"].to_numpy())
    assert logits[1].shape == logits[2].shape and logits[1].shape[0] == 2000
    np.testing.assert_allclose(logits[2], logits[1], rtol=1e-4, atol=1e-4)
    assert (logits[1].argmax(1) == logits[2].argmax(1)).all()


def test_bad_labels_and_subsets_are_named(small_labelled_shards, tmp_path: Path, capsys) -> None:
    """A well-formed id the ontology does not know, a label outside cl_name_subset, an empty subset."""
    _, gene_file, adata = small_labelled_shards
    bad = adata[:40].copy()
    column = bad.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    column[3] = "CL:9999999"
    bad.obs["cell_type_ontology_term_id"] = pd.Categorical(column)
    path = tmp_path / "unknown_id.h5ad"
    bad.write_h5ad(path)
    assert cli_main(["train-socam", "--input", str(path), "--genes", gene_file, "--output", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "'CL:9999999'" in err and "CL v" in err and str(path) in err
    names = [CD4_T, NAIVE_CD4_T, B_CELL]
    model = _socam(names, cl_name_subset=[B_CELL], include_ancestors_of_cl_name_subset=False)
    with pytest.raises(ValueError, match=f"'{CD4_T}'"):
        model(torch.rand(2, 5), model.var_names_g, np.array([B_CELL, CD4_T], dtype=object))
    with pytest.raises(ValueError, match="cl_name_subset is empty"):
        _socam(names, cl_name_subset=[])
    with pytest.raises(ValueError, match="CL:9999999"):
        _socam(names, cl_name_subset=["CL:9999999"])
    assert cli_main(["train-socam", "--input", str(path), "--output", str(tmp_path / "x.ckpt"), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
