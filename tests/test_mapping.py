"""Reference mapping and new data: scArches' surgery (against scvi-tools' load_query_data), train-scvi
--reference, predict --unseen-batch / --missing-genes / --features-from, and label transfer."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import scipy.sparse as sp
import torch
from scvi_tools_parity import paired_gradients, scvi_tools_state_to_ours

from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.models import SingleCellVariationalInference
from cellarium_steps.models._latent_metrics import mapping_metrics
from cellarium_steps.models._scvi_mapping import (
    freeze_reference,
    query_model_arguments,
    trainable_slices,
    transfer_reference_weights,
)
from cellarium_steps.models.scvi import scvi_tools_default_architecture
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import RECIPE_KEY
from cellarium_steps.steps.cli import main as cli_main
from cellarium_steps.transforms import BatchIndexMap, Filter

GENES = np.array([f"g{i}" for i in range(30)], dtype=object)
CPU = ("--accelerator", "cpu")


def small_model(n_batch: int, **options) -> SingleCellVariationalInference:
    torch.manual_seed(0)
    encoder, decoder = scvi_tools_default_architecture(16, 2, encode_covariates=True, deeply_inject_covariates=False)
    decoder["final_additive_bias"] = True
    return SingleCellVariationalInference(GENES, encoder, decoder, n_batch=n_batch, n_latent=4, **options)


# ---------------------------------------------------------------------------------------------------------------
# The surgery, on the model


def new_entries(change: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Which entries of a parameter lie in its new batches' and categories' ``ranges`` along ``dim``."""
    mask = torch.zeros(change.shape[dim], dtype=torch.bool)
    for start, stop in ranges:
        mask[start:stop] = True
    shape = [1] * change.dim()
    shape[dim] = -1
    return mask.reshape(shape).expand_as(change)


@pytest.mark.parametrize("options", [{}, {"batch_embedded": True}, {"dispersion": "gene-batch"},
                                     {"use_batch_norm": "none", "use_layer_norm": "both"},
                                     {"batch_embedded": True, "batch_representation_sampled": True}],
                         ids=["one-hot", "embedded", "gene-batch", "layer-norm", "embedded-sampled"])
@pytest.mark.parametrize("n_reference_batch", [1, 3])
@pytest.mark.parametrize("categories", [None, ([2, 1], [3, 2])], ids=["no-covariates", "new-categories"])
def test_surgery_keeps_the_reference_and_trains_only_the_new_batches(options: dict, n_reference_batch: int,
                                                                     categories) -> None:
    """``categories``: the reference's and the query's categories of two categorical covariates; the second
    has one category in the reference (no column, as in scvi-tools) and gains one in the query."""
    generator = torch.Generator().manual_seed(1)
    x_ng = torch.poisson(torch.rand(64, len(GENES), generator=generator) * 5)
    reference_batch_n = torch.randint(0, n_reference_batch, (64,), generator=generator)
    reference_cats, query_cats = categories or ([], [])
    covariates = {"n_cats_per_cov": reference_cats} if categories else {}
    reference_cat_nd = torch.stack([torch.randint(0, n, (64,), generator=generator) for n in reference_cats], 1) \
        if categories else None
    reference = small_model(n_reference_batch, **covariates, **options)
    reference.train()  # move the batch norm statistics away from their initial values
    reference(x_ng, GENES, reference_batch_n, categorical_covariate_index_nd=reference_cat_nd)

    def latent_of(model, batch_n, cat_nd) -> torch.Tensor:
        model.eval()
        return model.predict(x_ng, GENES, batch_n, categorical_covariate_index_nd=cat_nd)["x_ng"]

    before = latent_of(reference, reference_batch_n, reference_cat_nd)
    n_new = 2
    query = SingleCellVariationalInference(**query_model_arguments(
        reference.hyper_parameters, n_reference_batch + n_new, query_cats if categories else None))
    transfer_reference_weights(reference, query)
    assert torch.equal(latent_of(query, reference_batch_n, reference_cat_nd), before)
    initial = {name: p.detach().clone() for name, p in query.named_parameters()}
    freeze_reference(query, n_reference_batch, reference_cats if categories else None)
    query.train()
    optimizer = torch.optim.Adam([p for p in query.parameters() if p.requires_grad], lr=0.05)
    query_batch_n = torch.randint(n_reference_batch, n_reference_batch + n_new, (64,), generator=generator)
    query_cat_nd = torch.stack([torch.randint(0, n, (64,), generator=generator) for n in query_cats], 1) \
        if categories else None
    for _ in range(4):
        optimizer.zero_grad()
        query(x_ng, GENES, query_batch_n, categorical_covariate_index_nd=query_cat_nd)["loss"].backward()
        optimizer.step()

    # The reference's cells: the same latent to the last bit (the same arithmetic on the same weights).
    assert torch.equal(latent_of(query, reference_batch_n, reference_cat_nd), before)
    slices = trainable_slices(query, n_reference_batch, reference_cats if categories else None)
    moved = set()
    for name, parameter in query.named_parameters():
        change = (parameter.detach() - initial[name]).abs()
        if name in slices:
            new = new_entries(change, *slices[name])
            assert change[~new].max() == 0, name  # the reference's part stayed
            assert change[new].max() > 0, name  # the new batches' and categories' part trained
            moved.add(name)
        elif change.max() > 0:
            moved.add(name)
            assert "decoder" in name and "batch_norm" in name, name  # as scvi-tools: the decoder's batch norm trains
    assert moved >= set(slices) and slices
    if options.get("batch_embedded"):
        assert "batch_mean_bd" in slices and not any("batch_weight" in s for s in slices)
    else:
        assert {"z_encoder.hidden.layers.0.layer.batch_weight", "decoder.hidden.layers.0.layer.batch_weight"} <= set(slices)
    if categories:  # [batch | 3 + 2 category columns]: the first covariate's third, the second's both (the
        # reference's one category had no column, so its column stays zero, frozen)
        assert slices["decoder.hidden.layers.0.layer.categorical_weight"] == (1, [(2, 3), (4, 5)])
        assert (query.decoder.hidden.layers[0].layer.categorical_weight[:, 3] == 0).all()


def test_query_training_runs_dropout_and_batch_norm_as_at_prediction_time() -> None:
    """Through the runner (which calls the model's forward directly) and in training mode, as the trainer sets
    it: a frozen query's loss equals its loss in evaluation mode, so no dropout mask and no batch statistics
    entered it, and batch norm's running statistics stay the reference's."""
    reference = small_model(2, dropout_rate=0.5, use_batch_norm="both")
    query = SingleCellVariationalInference(**query_model_arguments(reference.hyper_parameters, 3))
    transfer_reference_weights(reference, query)
    freeze_reference(query, 2)
    generator = torch.Generator().manual_seed(2)
    batch = {"x_ng": torch.poisson(torch.rand(32, len(GENES), generator=generator) * 5), "var_names_g": GENES,
             "batch_index_n": torch.full((32,), 2)}
    module = CellariumModule(query)
    running = [b.clone() for b in query.buffers()]

    def loss(training: bool) -> torch.Tensor:
        module.train(training)
        torch.manual_seed(3)  # the same reparametrisation noise
        return module(batch)["loss"]

    evaluation_mode_loss = loss(False)
    assert torch.equal(loss(True), evaluation_mode_loss)
    assert all(torch.equal(before, after) for before, after in zip(running, query.buffers(), strict=True))
    assert query.training  # the model's own mode is the trainer's; only those layers ignore it


def test_query_arguments_keep_the_embedding_width_and_refuse_what_adds_nothing() -> None:
    reference = small_model(3, batch_embedded=True, n_cats_per_cov=[2])
    assert query_model_arguments(reference.hyper_parameters, 5)["n_latent_batch"] == 3
    assert query_model_arguments(reference.hyper_parameters, 3, [4])["n_cats_per_cov"] == [4]
    with pytest.raises(ValueError, match="adds no batch and no category"):
        query_model_arguments(reference.hyper_parameters, 3)
    with pytest.raises(ValueError, match="at least the reference's 3 batches"):
        query_model_arguments(reference.hyper_parameters, 2, [3])
    with pytest.raises(ValueError, match="at least the reference's categories"):
        query_model_arguments(reference.hyper_parameters, 4, [1])
    with pytest.raises(ValueError, match="no batches"):
        query_model_arguments({**reference.hyper_parameters, "n_batch": 0}, 2)


@pytest.fixture(scope="module")
def pbmc_split(pbmc_multibatch: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Two labelled sources as the reference, the held-out SoupX_pbmc4k as the query; 200 high-variance genes."""
    rng = np.random.default_rng(0)
    source = pbmc_multibatch.obs["source"].astype(str).to_numpy()
    reference_rows = np.flatnonzero(np.isin(source, ["MUDAN_reference", "scMINER_pbmc14k"]))
    query_rows = np.flatnonzero(source == "SoupX_pbmc4k")
    rows = np.sort(np.concatenate([rng.choice(reference_rows, 400, replace=False),
                                   rng.choice(query_rows, 200, replace=False)]))
    adata = pbmc_multibatch[rows].copy()
    x = adata.X.astype(np.float64)
    var_g = np.asarray(x.multiply(x).mean(0)).ravel() - np.asarray(x.mean(0)).ravel() ** 2
    adata = adata[:, np.sort(np.argsort(-var_g, kind="stable")[:200])].copy()
    is_query = adata.obs["source"].astype(str).to_numpy() == "SoupX_pbmc4k"
    parts = []
    for keep in (~is_query, is_query):
        part = adata[keep].copy()
        part.obs["source"] = part.obs["source"].astype(str).astype("category")
        parts.append(part)
    return parts[0], parts[1]


SURGERY_CASES = {
    "default": {},
    "scarches": {"encode_covariates": True, "deeply_inject_covariates": False, "use_layer_norm": "both",
                 "use_batch_norm": "none"},
}


@pytest.mark.parametrize("case", list(SURGERY_CASES))
def test_surgery_trains_what_scvi_tools_load_query_data_trains(case: str, pbmc_split) -> None:
    """The same reference weights and new columns on both sides: every parameter's gradient on a query batch
    (after scvi-tools' freezing hooks and ours) agrees, so the same entries train, by the same amounts."""
    scvi = pytest.importorskip("scvi", reason="scvi-tools is not installed")
    from scvi import REGISTRY_KEYS

    options = SURGERY_CASES[case]
    adata_ref, adata_query = pbmc_split[0].copy(), pbmc_split[1].copy()
    scvi.model.SCVI.setup_anndata(adata_ref, batch_key="source")
    scvi.settings.seed = 0
    reference = scvi.model.SCVI(adata_ref, n_hidden=32, n_layers=2, n_latent=6, gene_likelihood="nb", **options)
    reference.train(max_epochs=2, accelerator="cpu", batch_size=128, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False)
    mapped = scvi.model.SCVI.load_query_data(adata_query, reference)

    arguments = {k: v for k, v in options.items() if k in ("use_layer_norm", "use_batch_norm")}
    encoder, decoder = scvi_tools_default_architecture(
        32, 2, encode_covariates=options.get("encode_covariates", False),
        deeply_inject_covariates=options.get("deeply_inject_covariates", True))
    ours_reference = SingleCellVariationalInference(adata_ref.var_names.values, encoder, decoder, n_batch=2,
                                                    n_latent=6, kl_warmup_epochs=None, **arguments)
    ours_reference.load_state_dict(scvi_tools_state_to_ours(reference.module, ours_reference, 2))
    ours = SingleCellVariationalInference(**query_model_arguments(ours_reference.hyper_parameters, 3))
    transfer_reference_weights(ours_reference, ours)
    theirs_state = scvi_tools_state_to_ours(mapped.module, ours, 2)
    slices = trainable_slices(ours, 2)
    for name, value in ours.state_dict().items():  # the transferred weights are scvi-tools' but for the new batch
        expected = theirs_state[name]
        if name in slices:
            old = ~new_entries(value, *slices[name])
            value, expected = value[old], expected[old]
        assert torch.equal(value, expected), name
    ours.load_state_dict(theirs_state)  # the new batch's initial columns too
    freeze_reference(ours, 2)

    tensors = next(iter(mapped._make_data_loader(adata=adata_query, indices=np.arange(128), batch_size=128)))
    x_ng, batch_n1 = tensors[REGISTRY_KEYS.X_KEY], tensors[REGISTRY_KEYS.BATCH_KEY]
    assert (batch_n1 == 2).all()
    # scvi-tools' load_query_data leaves its module in evaluation mode, and its training keeps it there (no
    # dropout, batch norm on the reference's statistics); ours is switched to training mode as a trainer
    # does, and freeze_reference keeps its dropout and batch norm layers as scvi-tools' are.
    assert not mapped.module.training
    ours.train()
    for module in (mapped.module, ours):
        module.zero_grad()
    torch.manual_seed(1)
    inference = mapped.module._regular_inference(x_ng, batch_n1)
    generative = mapped.module.generative(inference["z"], inference["library"], batch_n1)
    mapped.module.loss(tensors, inference, generative, kl_weight=1.0).loss.backward()
    torch.manual_seed(1)
    ours(x_ng, adata_query.var_names.values, batch_n1[:, 0])["loss"].backward()
    trained = set()
    for name, grad, theirs in paired_gradients(ours, mapped.module, 2):
        if grad is None and theirs is None:  # frozen on both sides
            continue
        grad = torch.zeros_like(theirs) if grad is None else grad
        theirs = torch.zeros_like(grad) if theirs is None else theirs
        assert torch.allclose(grad, theirs, rtol=1e-4, atol=1e-6), name
        if theirs.abs().max() > 1e-4:
            trained.add(name)
    # The new batch's columns learn on both architectures (with batch norm too: on the reference's statistics
    # it does not remove the query's constant one-hot column); the default's decoder batch norm trains too.
    # (The default's encoder reads no batch; scArches' reads it in its first layer.)
    assert "decoder.hidden.layers.0.layer.batch_weight" in trained
    if case == "scarches":
        assert "z_encoder.hidden.layers.0.layer.batch_weight" in trained
    else:
        assert {"decoder.hidden.layers.0.batch_norm.weight", "decoder.hidden.layers.1.layer.batch_weight"} <= trained


# ---------------------------------------------------------------------------------------------------------------
# Transforms that new data needs


def test_filter_reads_missing_genes_as_zero_columns_and_keeps_a_batch_sparse() -> None:
    generator = torch.Generator().manual_seed(0)
    x_ng = torch.poisson(torch.rand(6, 5, generator=generator) * 3)
    names = np.array(["a", "b", "c", "d", "e"], dtype=object)
    wanted = ["e", "x", "a", "y", "c"]
    expected = torch.zeros(6, 5)
    expected[:, 0], expected[:, 2], expected[:, 4] = x_ng[:, 4], x_ng[:, 0], x_ng[:, 2]
    gene_filter = Filter(wanted, missing_genes="zero")
    for batch in (x_ng, x_ng.to_sparse_csr()):
        out = gene_filter(batch, names)
        assert out["x_ng"].layout == batch.layout and list(out["var_names_g"]) == wanted
        assert torch.equal(out["x_ng"].to_dense(), expected)
    with pytest.raises(ValueError, match="2 genes of the list are not in the data"):
        Filter(wanted)(x_ng, names)


def test_batch_index_map() -> None:
    out = BatchIndexMap([0, 1, 2, 1, 1])(torch.tensor([4, 0, 3, 2]))
    assert out["batch_index_n"].tolist() == [1, 0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# The steps, on simulated shards: reference batches batch1, batch2; the query is batch3 without 3 of 60 genes


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    root = tmp_path_factory.mktemp("mapping")
    simulate_shards(str(root / "sim"), n_cells=900, n_genes=60, n_shards=1, n_batches=3, seed=3)
    adata = ad.read_h5ad(root / "sim" / "shard_000.h5ad")
    batch = adata.obs["batch"].astype(str).to_numpy()
    paths = types.SimpleNamespace(root=root)
    for name, keep, genes in (("reference", batch != "batch3", slice(None)), ("query", batch == "batch3", slice(3, None)),
                              ("query_all_genes", batch == "batch3", slice(None)),
                              ("query_few_genes", batch == "batch3", slice(12, None))):
        part = adata[keep, genes].copy()
        part.obs["batch"] = part.obs["batch"].astype(str).astype("category")
        (root / name).mkdir()
        part.write_h5ad(root / name / "shard_000.h5ad")
        setattr(paths, name, str(root / name / "shard_000.h5ad"))
    paths.missing = [str(g) for g in adata.var_names[:3]]
    paths.n_query = int((batch == "batch3").sum())
    paths.reference_ckpt = str(root / "reference.ckpt")
    train = ["--batch-size", "128", "--n-hidden", "32", "--n-latent", "6", *CPU, "--quiet"]
    assert cli_main(["train-scvi", "--input", paths.reference, "--batch-key", "batch", "--max-epochs", "3",
                     "--encode-covariates", "--use-layer-norm", "both", "--use-batch-norm", "none", "--output",
                     paths.reference_ckpt, *train]) == 0
    paths.query_ckpt = str(root / "query.ckpt")
    assert cli_main(["train-scvi", "--reference", paths.reference_ckpt, "--input", paths.query, "--max-epochs", "3",
                     "--batch-size", "128", "--missing-genes", "zero", *CPU, "--output", paths.query_ckpt,
                     "--quiet"]) == 0
    return paths


def predicted(path: Path | str, column: str = "scvi_latent") -> tuple[list[str], np.ndarray]:
    table = ds.dataset(str(path)).to_table()
    return table["cell_id"].to_pylist(), np.stack(table[column].to_numpy(zero_copy_only=False))


def predict(tmp_path: Path, name: str, checkpoint: str, shard: str, *options: str) -> int:
    return cli_main(["predict", "--checkpoint", checkpoint, "--input", shard, "--output", str(tmp_path / name),
                     *CPU, "--quiet", *options])


def test_train_scvi_reference_maps_the_query_and_keeps_the_reference(shards, tmp_path: Path) -> None:
    checkpoint = torch.load(shards.query_ckpt, weights_only=True)
    recipe = checkpoint[RECIPE_KEY]
    reference_recipe = torch.load(shards.reference_ckpt, weights_only=True)[RECIPE_KEY]
    # the reference's batches keep their codes; the new batch follows; the architecture is the reference's
    assert recipe["data"]["batch_categories"] == ["batch1", "batch2", "batch3"]
    args, reference_args = recipe["model"]["init_args"], reference_recipe["model"]["init_args"]
    assert args["n_batch"] == 3 and reference_args["n_batch"] == 2
    assert {k: v for k, v in args.items() if not k.startswith(("n_batch", "kl_"))} == \
        {k: v for k, v in reference_args.items() if not k.startswith(("n_batch", "kl_"))}
    entry = recipe["data"]["reference"]
    assert entry["missing_genes"] == shards.missing and entry["new_batch_cells"] == {"batch3": shards.n_query}
    assert entry["checkpoint"] == shards.reference_ckpt and len(entry["fingerprint"]) == 64
    # reference cells: the same latent from the reference and from the query checkpoint
    assert predict(tmp_path, "before", shards.reference_ckpt, shards.reference) == 0
    assert predict(tmp_path, "after", shards.query_ckpt, shards.reference) == 0
    (names_before, before), (names_after, after) = predicted(tmp_path / "before"), predicted(tmp_path / "after")
    assert names_before == names_after and np.abs(before - after).max() < 1e-6
    # query cells, genes missing read as zeros: the same as the query with those genes present and zero
    adata = ad.read_h5ad(shards.query_all_genes)
    x = adata.X.toarray()
    x[:, :3] = 0
    adata.X = sp.csr_matrix(x)
    zeroed = str(tmp_path / "zeroed.h5ad")
    adata.write_h5ad(zeroed)
    assert predict(tmp_path, "query", shards.query_ckpt, shards.query, "--missing-genes", "zero") == 0
    assert predict(tmp_path, "zeroed", shards.query_ckpt, zeroed) == 0
    (names, query), (names_zeroed, query_zeroed) = predicted(tmp_path / "query"), predicted(tmp_path / "zeroed")
    assert names == names_zeroed and np.array_equal(query, query_zeroed)


def test_a_resumed_query_training_keeps_the_reference_frozen(shards, tmp_path: Path, caplog) -> None:
    output = tmp_path / "query.ckpt"
    train = ["train-scvi", "--reference", shards.reference_ckpt, "--input", shards.query, "--missing-genes", "zero",
             "--batch-size", "128", *CPU, "--output", str(output)]
    assert cli_main([*train, "--max-epochs", "1", "--quiet"]) == 0
    output.unlink()  # as if the run had been killed after its first epoch's checkpoint
    caplog.set_level(logging.INFO, logger="cellarium_steps")
    assert cli_main([*train, "--max-epochs", "3"]) == 0
    assert "resuming from" in caplog.text
    assert torch.load(output, weights_only=True)["global_step"] == 3 * len(range(0, shards.n_query, 128))
    assert predict(tmp_path, "before", shards.reference_ckpt, shards.reference) == 0
    assert predict(tmp_path, "after", str(output), shards.reference) == 0
    assert np.abs(predicted(tmp_path / "before")[1] - predicted(tmp_path / "after")[1]).max() < 1e-6


def test_train_scvi_reference_adds_covariate_categories_to_an_embedded_reference(shards, tmp_path: Path) -> None:
    paths = {}
    for name, values in (("reference", ["v2", "v3"]), ("query", ["v3", "v4"])):
        adata = ad.read_h5ad(getattr(shards, name))
        adata.obs["chemistry"] = pd.Categorical(np.resize(values, adata.n_obs))
        paths[name] = str(tmp_path / f"{name}.h5ad")
        adata.write_h5ad(paths[name])
    reference, query = str(tmp_path / "reference.ckpt"), str(tmp_path / "query.ckpt")
    train = ["--max-epochs", "2", "--batch-size", "128", *CPU, "--quiet"]
    assert cli_main(["train-scvi", "--input", paths["reference"], "--batch-key", "batch", "--categorical-covariate-keys",
                     "chemistry", "--batch-embedded", "--encode-covariates", "--n-hidden", "16", "--n-latent", "4",
                     "--output", reference, *train]) == 0
    assert cli_main(["train-scvi", "--reference", reference, "--input", paths["query"], "--missing-genes", "zero",
                     "--output", query, *train]) == 0
    recipe = torch.load(query, weights_only=True)[RECIPE_KEY]
    assert recipe["data"]["covariates"]["categorical"] == {"chemistry": ["v2", "v3", "v4"]}
    assert recipe["model"]["init_args"]["n_cats_per_cov"] == [3] and recipe["model"]["init_args"]["n_latent_batch"] == 2
    assert recipe["data"]["reference"]["new_categories"] == {"chemistry": ["v4"]}
    assert predict(tmp_path, "before", reference, paths["reference"]) == 0
    assert predict(tmp_path, "after", query, paths["reference"]) == 0
    assert np.abs(predicted(tmp_path / "before")[1] - predicted(tmp_path / "after")[1]).max() < 1e-6
    assert predict(tmp_path, "query", query, paths["query"], "--missing-genes", "zero") == 0
    assert len(predicted(tmp_path / "query")[0]) == shards.n_query


def test_train_scvi_reference_refuses_what_it_cannot_map(shards, tmp_path: Path, capsys) -> None:
    base = ["train-scvi", "--reference", shards.reference_ckpt, "--max-epochs", "1", *CPU, "--quiet"]
    cases = [
        (["--input", shards.query, "--n-hidden", "8", "--encode-covariates"], "remove --n-hidden, --encode-covariates"),
        (["--input", shards.query], f"{shards.query}: var_names lacks 3 of the model's 60 genes"),
        (["--input", shards.query_few_genes, "--missing-genes", "zero"], "more than --max-missing-genes-fraction 0.1"),
        (["--input", shards.reference], "nothing to map"),
    ]
    for options, message in cases:
        output = tmp_path / "q.ckpt"
        assert cli_main([*base, *options, "--output", str(output)]) == 2, options
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not output.exists() and not Path(str(output) + ".d").exists()


def test_predict_unseen_batch_as_a_named_batch(shards, tmp_path: Path, capsys, caplog) -> None:
    options = ("--missing-genes", "zero")
    assert predict(tmp_path, "refused", shards.reference_ckpt, shards.query, *options) == 2
    err = capsys.readouterr().err
    assert f"{shards.query}: cell " in err and "obs['batch'] 'batch3', a batch the model did not see" in err
    assert "--unseen-batch as:NAME" in err and not (tmp_path / "refused").exists()
    assert predict(tmp_path, "bad", shards.reference_ckpt, shards.query, *options, "--unseen-batch", "as:nope") == 2
    assert "'nope' is not one of the model's batches" in capsys.readouterr().err

    assert cli_main(["predict", "--checkpoint", shards.reference_ckpt, "--input", shards.query, "--output",
                     str(tmp_path / "as_batch2"), *CPU, *options, "--unseen-batch", "as:batch2"]) == 0
    n = shards.n_query
    assert f"{n} cells of batches the model did not see (batch3: {n}) are encoded as its batch 'batch2'" in caplog.text
    names, latent_nk = predicted(tmp_path / "as_batch2")
    # the same as the cells relabelled batch2 by hand, their missing genes zero
    module = CellariumModule.from_checkpoint(shards.reference_ckpt)
    adata = ad.read_h5ad(shards.query_all_genes)
    x = adata.X.toarray().astype(np.float32)
    x[:, :3] = 0
    expected = module.model.predict(torch.from_numpy(x), adata.var_names.values, torch.full((adata.n_obs,), 1))["x_ng"]
    assert names == list(adata.obs_names)
    np.testing.assert_allclose(latent_nk, expected.numpy(), rtol=0, atol=1e-5)


def test_label_transfer_socam_on_genes_and_on_the_mapped_scvi_latent(shards, tmp_path: Path, capsys) -> None:
    socam = str(tmp_path / "socam.ckpt")
    assert cli_main(["train-socam", "--input", shards.reference, "--scvi", shards.reference_ckpt, "--max-epochs", "3",
                     *CPU, "--output", socam, "--quiet"]) == 0
    logreg = str(tmp_path / "logreg.ckpt")
    assert cli_main(["train-logreg", "--input", shards.reference, "--max-epochs", "3", *CPU, "--output", logreg,
                     "--quiet"]) == 0
    # on genes: the query's missing genes read as zeros; the batch plays no part
    assert predict(tmp_path, "logreg_query", logreg, shards.query) == 2
    assert "var_names lacks 3 of the model's 60 genes" in capsys.readouterr().err
    assert predict(tmp_path, "logreg_query", logreg, shards.query, "--missing-genes", "zero") == 0
    assert len(predicted(tmp_path / "logreg_query", "y_logits")[0]) == shards.n_query

    # on the scVI latent: the reference checkpoint never saw batch3; the mapped query's latent reads it
    assert predict(tmp_path, "socam_query", socam, shards.query, "--missing-genes", "zero") == 2
    assert "a batch the model did not see" in capsys.readouterr().err
    via_query = ("--features-from", shards.query_ckpt, "--missing-genes", "zero")
    assert predict(tmp_path, "socam_query", socam, shards.query, *via_query) == 0
    assert predict(tmp_path, "socam_ref_before", socam, shards.reference) == 0
    assert predict(tmp_path, "socam_ref_after", socam, shards.reference, *via_query) == 0
    _, before = predicted(tmp_path / "socam_ref_before", "cell_type_probs")
    _, after = predicted(tmp_path / "socam_ref_after", "cell_type_probs")
    np.testing.assert_allclose(after, before, atol=1e-5)  # the reference's cells keep their latent, so their calls
    table = ds.dataset(str(tmp_path / "socam_query")).to_table()
    assert table.num_rows == shards.n_query and table["cell_type_ontology_term_id"].null_count == 0
    query_module = CellariumModule.from_checkpoint(shards.query_ckpt)
    adata = ad.read_h5ad(shards.query)
    x = torch.from_numpy(adata.X.toarray().astype(np.float32))
    query_module.transforms[0].missing_genes = "zero"
    z_nk = query_module.predict_step({"x_ng": x, "var_names_g": adata.var_names.values,
                                      "batch_index_n": torch.full((adata.n_obs,), 2)}, 0)["x_ng"]
    socam_module = CellariumModule.from_checkpoint(socam)
    probs = socam_module.model.predict(z_nk, np.array([f"scvi_{i}" for i in range(6)], dtype=object))
    np.testing.assert_allclose(predicted(tmp_path / "socam_query", "cell_type_probs")[1],
                               probs["cell_type_probs_nc"].numpy(), atol=1e-5)

    # a query mapped from other weights than the classifier's features is refused, before the pass
    other = str(tmp_path / "other.ckpt")
    assert cli_main(["train-scvi", "--input", shards.reference, "--batch-key", "batch", "--max-epochs", "1",
                     "--n-hidden", "8", "--n-latent", "6", *CPU, "--output", other, "--quiet"]) == 0
    assert predict(tmp_path, "mismatch", socam, shards.query, "--features-from", other) == 2
    assert "not mapped from the scVI model" in capsys.readouterr().err and not (tmp_path / "mismatch").exists()
    assert predict(tmp_path, "not_scvi", logreg, shards.query, "--features-from", shards.query_ckpt) == 2
    assert "was not trained on scVI latent means" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Against scvi-tools on real data: two PBMC sources as the reference, a held-out source as the query


def test_mapping_against_scvi_tools_on_a_held_out_source(pbmc_multibatch: ad.AnnData, tmp_path: Path) -> None:
    """Affordable on 2 cores: 1,500 reference and 700 query cells, 500 genes, 15 + 15 epochs, one seed; the
    3-seed comparison on every cell is benchmarks/bench_mapping.py."""
    scvi = pytest.importorskip("scvi", reason="scvi-tools is not installed")
    rng = np.random.default_rng(0)
    source = pbmc_multibatch.obs["source"].astype(str).to_numpy()
    parts = {}
    for name, keep, n in (("reference", np.isin(source, ["MUDAN_reference", "scMINER_pbmc14k"]), 1500),
                          ("query", source == "SoupX_pbmc4k", 700)):
        part = pbmc_multibatch[np.sort(rng.choice(np.flatnonzero(keep), n, replace=False))].copy()
        part.obs["source"] = part.obs["source"].astype(str).astype("category")
        parts[name] = part
    x = parts["reference"].X.astype(np.float64)
    var_g = np.asarray(x.multiply(x).mean(0)).ravel() - np.asarray(x.mean(0)).ravel() ** 2
    genes = parts["reference"].var_names[np.sort(np.argsort(-var_g, kind="stable")[:500])]
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    for name, part in parts.items():
        part.write_h5ad(tmp_path / f"{name}.h5ad")
    epochs, warmup = 15, {"reference": 15 * 12 // 4, "query": 15 * 6 // 4}
    labels = {name: part.obs["cell_type_ontology_term_id"].astype(str).to_numpy() for name, part in parts.items()}

    common = ["--batch-size", "128", "--max-epochs", str(epochs), "--learning-rate", "1e-3", *CPU, "--quiet"]
    assert cli_main(["train-scvi", "--input", str(tmp_path / "reference.h5ad"), "--batch-key", "source", "--genes",
                     str(tmp_path / "genes.txt"), "--encode-covariates", "--use-layer-norm", "both",
                     "--use-batch-norm", "none", "--n-hidden", "64", "--kl-warmup-steps", str(warmup["reference"]),
                     "--output", str(tmp_path / "ref.ckpt"), *common]) == 0
    assert cli_main(["train-scvi", "--reference", str(tmp_path / "ref.ckpt"), "--input", str(tmp_path / "query.h5ad"),
                     "--kl-warmup-steps", str(warmup["query"]), "--output", str(tmp_path / "query.ckpt"), *common]) == 0
    ours = {}
    for name in ("reference", "query"):
        assert predict(tmp_path, f"{name}_cells", str(tmp_path / "query.ckpt"), str(tmp_path / f"{name}.h5ad")) == 0
        ours[name] = predicted(tmp_path / f"{name}_cells")[1]
    assert predict(tmp_path, "reference_before", str(tmp_path / "ref.ckpt"), str(tmp_path / "reference.h5ad")) == 0
    assert np.abs(predicted(tmp_path / "reference_before")[1] - ours["reference"]).max() < 1e-6

    adata_ref, adata_query = (parts[name][:, genes].copy() for name in ("reference", "query"))
    scvi.model.SCVI.setup_anndata(adata_ref, batch_key="source")
    scvi.settings.seed = 0
    train = {"batch_size": 128, "train_size": 1.0, "accelerator": "cpu", "enable_progress_bar": False,
             "logger": False, "enable_checkpointing": False, "max_epochs": epochs}
    reference = scvi.model.SCVI(adata_ref, n_hidden=64, n_latent=10, gene_likelihood="nb", encode_covariates=True,
                                deeply_inject_covariates=False, use_layer_norm="both", use_batch_norm="none")
    reference.train(plan_kwargs={"n_epochs_kl_warmup": None, "n_steps_kl_warmup": warmup["reference"]}, **train)
    mapped = scvi.model.SCVI.load_query_data(adata_query, reference)
    mapped.train(plan_kwargs={"weight_decay": 0.0, "n_epochs_kl_warmup": None, "n_steps_kl_warmup": warmup["query"]},
                 **train)
    theirs = {name: mapped.get_latent_representation(a) for name, a in (("reference", adata_ref), ("query", adata_query))}

    ours_metrics = mapping_metrics(ours["reference"], labels["reference"], ours["query"], labels["query"])
    theirs_metrics = mapping_metrics(theirs["reference"], labels["reference"], theirs["query"], labels["query"])
    print("ours", ours_metrics, "scvi-tools", theirs_metrics)
    # 5 coarse types in the query: chance is far below; one seed of a short run varies by a few points
    assert ours_metrics["accuracy"] > 0.6
    assert ours_metrics["accuracy"] >= theirs_metrics["accuracy"] - 0.05
    assert abs(ours_metrics["mixing"] - theirs_metrics["mixing"]) <= 0.1
