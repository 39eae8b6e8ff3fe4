"""train-scvi's architecture: the options users set, --model-config for the rest, and their conflicts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from cellarium_steps.data.errors import ConfigError
from cellarium_steps.data.simulate import simulate_shards
from cellarium_steps.models._scvi_layers import LinearWithBatch, LinearWithBatchAndCovariates
from cellarium_steps.pipelines.scvi_model import ARCHITECTURE_DEFAULTS, model_arguments, read_model_config
from cellarium_steps.runner import CellariumModule
from cellarium_steps.steps.cli import main as cli_main

NONE_GIVEN = dict.fromkeys(ARCHITECTURE_DEFAULTS)


def test_defaults_are_scvi_tools_and_options_shape_the_layers() -> None:
    arguments = model_arguments(NONE_GIVEN)
    assert {k: arguments[k] for k in ("n_latent", "dispersion", "gene_likelihood", "use_batch_norm",
                                      "use_layer_norm", "dropout_rate")} == {
        "n_latent": 10, "dispersion": "gene", "gene_likelihood": "nb", "use_batch_norm": "both",
        "use_layer_norm": "none", "dropout_rate": 0.1}
    assert [layer["class_path"] for layer in arguments["encoder"]["hidden_layers"]] == ["Linear"]
    assert [layer["class_path"] for layer in arguments["decoder"]["hidden_layers"]] == ["LinearWithBatchAndCovariates"]
    # scArches' reference: the batch enters the first hidden layer of encoder and decoder only
    arguments = model_arguments({**NONE_GIVEN, "encode_covariates": True, "n_layers": 3, "n_hidden": 16})
    for side in ("encoder", "decoder"):
        layers = arguments[side]["hidden_layers"]
        assert [layer["class_path"] for layer in layers] == ["LinearWithBatchAndCovariates", "Linear", "Linear"]
        assert {layer["init_args"]["out_features"] for layer in layers} == {16}


def test_model_config_reads_cellarium_ml_style_and_refuses_what_the_step_sets(tmp_path: Path) -> None:
    config = tmp_path / "scvi.yaml"
    encoder = {"hidden_layers": [{"class_path": "cellarium.ml.models.scvi.LinearWithBatch",
                                  "init_args": {"out_features": 24}}],
               "final_layer": {"class_path": "torch.nn.Linear", "init_args": {}}}
    config.write_text(yaml.safe_dump({"model": {"model": {
        "class_path": "cellarium.ml.models.SingleCellVariationalInference",
        "init_args": {"encoder": encoder, "input_gene_dropout_rate": 0.2, "z_kl_weight_max": 0.5}}}}))
    read = read_model_config(str(config))
    arguments = model_arguments({**NONE_GIVEN, "dispersion": "gene-batch"}, read, str(config))
    assert arguments["encoder"] == encoder and arguments["input_gene_dropout_rate"] == 0.2
    assert arguments["dispersion"] == "gene-batch" and arguments["decoder"]["hidden_layers"]  # default decoder

    for content, message in (
        ({"n_batch": 3}, "'n_batch' is set by the step (--batch-key)"),
        ({"dropout": 0.1}, "'dropout' is not a SingleCellVariationalInference argument"),
        ({"class_path": "x.Other", "init_args": {}}, "is not SingleCellVariationalInference"),
        (["a list"], "expected a mapping"),
    ):
        config.write_text(yaml.safe_dump(content))
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_model_config(str(config))
    with pytest.raises(ConfigError, match=re.escape("--n-latent 8 disagrees with --model-config c.yaml: n_latent: 12")):
        model_arguments({**NONE_GIVEN, "n_latent": 8}, {"n_latent": 12}, "c.yaml")
    with pytest.raises(ConfigError, match="--n-hidden: --model-config c.yaml gives the encoder and decoder dicts"):
        model_arguments({**NONE_GIVEN, "n_hidden": 8}, {"encoder": encoder}, "c.yaml")


def test_train_scvi_builds_the_architecture_it_is_given(tmp_path: Path, capsys) -> None:
    simulate_shards(str(tmp_path / "sim"), n_cells=300, n_genes=40, n_shards=1, seed=7)
    shard = str(tmp_path / "sim" / "shard_000.h5ad")
    base = ["train-scvi", "--input", shard, "--batch-key", "batch", "--max-epochs", "1", "--batch-size", "128",
            "--accelerator", "cpu", "--quiet"]
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"input_gene_dropout_rate": 0.1, "n_latent_batch": 2}))
    output = tmp_path / "scvi.ckpt"
    assert cli_main([*base, "--encode-covariates", "--use-layer-norm", "both", "--use-batch-norm", "none",
                     "--dropout-rate", "0.2", "--dispersion", "gene-batch", "--batch-embedded", "--n-hidden", "16",
                     "--n-latent", "4", "--model-config", str(config), "--output", str(output)]) == 0
    module = CellariumModule.from_checkpoint(str(output))
    model = module.model
    args = module.recipe["model"]["init_args"]
    assert (args["use_layer_norm"], args["use_batch_norm"], args["dropout_rate"], args["dispersion"]) == \
        ("both", "none", 0.2, "gene-batch")
    assert args["batch_embedded"] and args["n_latent_batch"] == 2 and args["input_gene_dropout_rate"] == 0.1
    first = model.z_encoder.hidden.layers[0]
    assert isinstance(first.layer, LinearWithBatchAndCovariates) and first.layer.batch_weight.shape == (16, 2)
    assert first.layer_norm is not None and first.batch_norm is None and first.dropout.p == 0.2
    assert isinstance(model.decoder.hidden.layers[0].layer, LinearWithBatch)
    assert model.px_r.shape == (40, model.n_batch) and model.batch_mean_bd is not None

    for options, message in (
        (["--gene-likelihood", "poisson", "--n-latent", "3"], None),
        (["--model-config", str(config)], "n_latent_batch=2 needs batch_embedded=True"),
        (["--use-flow", "--n-latent", "4", "--model-config", str(tmp_path / "none.yaml")], "no such file"),
        (["--dropout-rate", "1.5"], "--dropout-rate: must be in [0, 1)"),
        (["--kl-warmup-steps", "5", "--model-config", str(tmp_path / "warmup.yaml")], "sets the KL warm-up"),
    ):
        (tmp_path / "warmup.yaml").write_text(yaml.safe_dump({"kl_warmup_epochs": 3}))
        code = cli_main([*base, *options, "--output", str(tmp_path / "other.ckpt")])
        if message is None:
            assert code == 0
            assert CellariumModule.from_checkpoint(str(tmp_path / "other.ckpt")).model.gene_likelihood == "poisson"
            (tmp_path / "other.ckpt").unlink()
        else:
            assert code == 2 and message in capsys.readouterr().err
    assert torch.load(output, weights_only=True)["cellarium_steps_recipe"]["model"]["init_args"]["kl_warmup_steps"] > 0
