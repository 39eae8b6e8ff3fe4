"""Inputs of the label-trained steps other than genes: a fitted PCA's components or scVI's latent means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cellarium_steps.data.errors import InputError
from cellarium_steps.models.incremental_pca import component_names
from cellarium_steps.models.scvi import SingleCellVariationalInference
from cellarium_steps.outputs.pca import read_pca_state, state_path
from cellarium_steps.pipelines.pca import pca_specs
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.features import ModelFeatures
from cellarium_steps.runner.recipe import spec, state_fingerprint


@dataclass
class Features:
    """The feature transform's recipe spec, its weights, the feature names and what the data must match."""

    transform_spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    names: list[str]
    genes: list[str]
    batch_key: str | None = None
    batch_categories: list[str] | None = None


def pca_features(path: str) -> Features:
    """The pca step's output (its Parquet, or the ``<stem>.pt`` beside it): cells -> PC1..PCk."""
    model_path = state_path(path)
    if not model_path.is_file():
        raise InputError(f"--pca {path}: no fitted PCA at {model_path} (give the pca step's --output)")
    state = read_pca_state(model_path)
    model_spec, transforms = pca_specs(state)
    transform_spec = spec(ModelFeatures, model=model_spec, transforms=transforms, feature_prefix="PC")
    features = ModelFeatures(**transform_spec["init_args"])
    features.model.load_state_dict(state["state_dict"])
    n_components = model_spec["init_args"]["n_components"]
    return Features(transform_spec, features.state_dict(), component_names(n_components).tolist(),
                    model_spec["init_args"]["var_names_g"])


def load_scvi_checkpoint(path: str, option: str) -> CellariumModule:
    """A train-scvi checkpoint's pipeline, or an ``InputError`` starting with ``option`` (which names the file)."""
    try:
        trained = CellariumModule.from_checkpoint(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{option}: {e}") from None
    if not isinstance(trained.model, SingleCellVariationalInference):
        raise InputError(f"{option}: a {type(trained.model).__name__} checkpoint, not train-scvi's")
    return trained


def scvi_model_features(trained: CellariumModule, feature_prefix: str = "scvi_") -> tuple[dict[str, Any], ModelFeatures]:
    """A trained scVI pipeline as a frozen feature transform: its recipe spec, and the transform with the weights."""
    recipe = trained.recipe or {}
    transform_spec = spec(ModelFeatures, model=recipe["model"], transforms=recipe.get("transforms", []),
                          feature_prefix=feature_prefix)
    features = ModelFeatures(**transform_spec["init_args"])
    features.model.load_state_dict(trained.model.state_dict())
    features.transforms.load_state_dict(trained.transforms.state_dict())
    return transform_spec, features


def scvi_features(path: str) -> Features:
    """A train-scvi checkpoint: cells -> the latent means scvi_0..scvi_{k-1}, batches coded as scVI coded them."""
    trained = load_scvi_checkpoint(path, f"--scvi {path}")
    transform_spec, features = scvi_model_features(trained)
    data = (trained.recipe or {}).get("data", {})
    return Features(transform_spec, features.state_dict(), [f"scvi_{i}" for i in range(trained.model.n_latent)],
                    [str(g) for g in trained.model.var_names_g], batch_key=data.get("batch_key"),
                    batch_categories=data.get("batch_categories"))



def features_from_query(module: CellariumModule, checkpoint: str, path: str) -> dict[str, Any]:
    """``predict --features-from``: a classifier trained on a reference scVI's latent means (train-socam or
    train-logreg ``--scvi``) reads instead the latent of a query checkpoint mapped from that reference
    (``train-scvi --reference``), so cells of the query's new batches are embedded as the mapping learned.

    The query must have been mapped from the very weights the classifier was trained on (or be them):
    their fingerprints are compared. Returns the query's ``batch_key``, ``batch_categories`` and ``covariates``.
    """
    features = module.transforms[0] if len(module.transforms) else None
    if not isinstance(features, ModelFeatures) or not isinstance(features.model, SingleCellVariationalInference):
        raise InputError(f"--features-from {path}: {checkpoint} was not trained on scVI latent means (--scvi)")
    query = load_scvi_checkpoint(path, f"--features-from {path}")
    data = (query.recipe or {}).get("data", {})
    accepted = {(data.get("reference") or {}).get("fingerprint"), state_fingerprint(query.model.state_dict())}
    if state_fingerprint(features.model.state_dict()) not in accepted:
        raise InputError(f"--features-from {path}: not mapped from the scVI model {checkpoint} was trained on "
                         "(train-scvi --reference must be that model)")
    module.transforms[0] = scvi_model_features(query, features.feature_prefix)[1]
    return {"batch_key": data.get("batch_key"), "batch_categories": data.get("batch_categories"),
            "covariates": data.get("covariates")}
