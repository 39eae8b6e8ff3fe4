"""The scVI model train-scvi builds: scvi-tools' defaults, the options users set, a ``--model-config`` for
the rest, and the query model of a reference mapping (the reference's architecture with more batches)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from cellarium_steps.data.errors import ConfigError
from cellarium_steps.data.yaml_config import read_yaml_config
from cellarium_steps.models._scvi_mapping import query_model_arguments
from cellarium_steps.models.scvi import SingleCellVariationalInference, scvi_tools_default_architecture
from cellarium_steps.runner.recipe import plain, spec

#: the options train-scvi exposes, with scvi-tools' defaults (None on the command line: not given)
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "n_latent": 10, "n_hidden": 128, "n_layers": 1, "encode_covariates": False, "use_layer_norm": "none",
    "use_batch_norm": "both", "dropout_rate": 0.1, "dispersion": "gene", "gene_likelihood": "nb",
    "use_flow": False, "batch_embedded": False,
}
#: options that shape the encoder and decoder dicts rather than naming a constructor argument
LAYER_OPTIONS = ("n_hidden", "n_layers", "encode_covariates")
#: constructor arguments the step sets from the data or from its own options, never from --model-config
STEP_ARGUMENTS = {
    "var_names_g": "--genes", "n_batch": "--batch-key", "n_continuous_cov": "--continuous-covariate-keys",
    "n_cats_per_cov": "--categorical-covariate-keys", "cell_type_categories": "--cell-type-key",
    "ontology_distance_matrix": "--cell-type-key", "val_cell_type_classifier_reservoir_size": "--val-reservoir-size",
    "reconstruct_counts_on_predict": "predict writes the latent means",
}


def read_model_config(path: str) -> dict[str, Any]:
    """Constructor arguments from a YAML file: a plain mapping, or cellarium-ml's ``{class_path, init_args}``
    (also nested under ``model:`` keys, as in a cellarium-ml CLI config)."""
    config = read_yaml_config(path, "--model-config")
    while isinstance(config, Mapping) and set(config) == {"model"}:
        config = config["model"]
    if isinstance(config, Mapping) and "init_args" in config:
        class_path = str(config.get("class_path", "SingleCellVariationalInference"))
        if not class_path.endswith("SingleCellVariationalInference"):
            raise ConfigError(f"--model-config: {path}: class_path {class_path!r} is not SingleCellVariationalInference")
        config = config["init_args"] or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"--model-config: {path}: expected a mapping of SingleCellVariationalInference arguments")
    known = set(inspect.signature(SingleCellVariationalInference).parameters)
    for key in config:
        if key in STEP_ARGUMENTS:
            raise ConfigError(f"--model-config: {path}: {key!r} is set by the step ({STEP_ARGUMENTS[key]})")
        if key not in known:
            raise ConfigError(f"--model-config: {path}: {key!r} is not a SingleCellVariationalInference argument "
                              f"(known: {', '.join(sorted(known - set(STEP_ARGUMENTS)))})")
    return dict(config)


def model_arguments(options: Mapping[str, Any], model_config: Mapping[str, Any] | None = None,
                    config_path: str = "") -> dict[str, Any]:
    """scvi-tools' defaults, then ``--model-config``'s arguments, then the options given (None: not given).

    An option given that disagrees with the same argument of ``--model-config`` is an error, as is a
    layer option (``n_hidden``, ``n_layers``, ``encode_covariates``) given beside its encoder/decoder dicts.
    """
    config = dict(model_config or {})
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(ARCHITECTURE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown architecture options {sorted(unknown)}")
    for key, value in given.items():
        if key in config and config[key] != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} disagrees with --model-config {config_path}: "
                              f"{key}: {config[key]!r}")
        if key in LAYER_OPTIONS and ("encoder" in config or "decoder" in config):
            raise ConfigError(f"--{key.replace('_', '-')}: --model-config {config_path} gives the encoder and "
                              "decoder dicts; set the layers there")
    resolved = {**ARCHITECTURE_DEFAULTS, **{k: v for k, v in config.items() if k in ARCHITECTURE_DEFAULTS}, **given}
    layers = {key: resolved.pop(key) for key in LAYER_OPTIONS}
    # scvi-tools' encode_covariates=True, deeply_inject_covariates=False: the batch enters the first hidden layer.
    encoder, decoder = scvi_tools_default_architecture(
        int(layers["n_hidden"]), int(layers["n_layers"]), encode_covariates=bool(layers["encode_covariates"]),
        deeply_inject_covariates=not layers["encode_covariates"],
    )
    arguments = {"encoder": encoder, "decoder": decoder, **resolved}
    arguments.update({k: v for k, v in config.items() if k not in LAYER_OPTIONS})
    return arguments


def scvi_model_spec(var_names_g: Sequence[str], *, n_batch: int, kl_warmup_steps: int | None,
                    arguments: Mapping[str, Any], n_cats_per_cov: Sequence[int] = (), n_continuous_cov: int = 0,
                    where: str = "train-scvi") -> dict[str, Any]:
    """The model's recipe spec; the arguments are checked by building the model once, before any pass.
    The KL weight warms up over ``kl_warmup_steps`` unless the arguments set the warm-up themselves.
    Covariates (each one's category count, the continuous ones' number) enter only when there are any."""
    init_args = {"kl_warmup_epochs": None, "kl_warmup_steps": kl_warmup_steps, **arguments}
    if n_cats_per_cov:
        init_args["n_cats_per_cov"] = list(n_cats_per_cov)
    if n_continuous_cov:
        init_args["n_continuous_cov"] = int(n_continuous_cov)
    model_spec = spec(SingleCellVariationalInference, var_names_g=var_names_g, n_batch=n_batch, **init_args)
    check_model_spec(model_spec, where)
    return model_spec


def check_model_spec(model_spec: dict[str, Any], where: str) -> None:
    try:
        SingleCellVariationalInference(**model_spec["init_args"])
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"{where}: {e}") from None


def warmup_is_set(arguments: Mapping[str, Any]) -> bool:
    """Whether --model-config chose the KL warm-up (by epochs or steps) itself."""
    return arguments.get("kl_warmup_epochs") is not None or arguments.get("kl_warmup_steps") is not None


def query_model_spec(reference_spec: Mapping[str, Any], *, n_batch: int, kl_warmup_steps: int,
                     n_cats_per_cov: Sequence[int] = ()) -> dict[str, Any]:
    """The reference's model spec with ``n_batch`` batches and ``n_cats_per_cov`` categories (its own first)
    and the query run's KL warm-up."""
    try:
        init_args = query_model_arguments(plain(dict(reference_spec["init_args"])), n_batch,
                                          list(n_cats_per_cov) if n_cats_per_cov else None)
    except ValueError as e:
        raise ConfigError(f"--reference: {e}") from None
    init_args.update(kl_warmup_epochs=None, kl_warmup_steps=kl_warmup_steps)
    return {"class_path": reference_spec["class_path"], "init_args": init_args}
