"""The pca step's files: per-gene loadings (Parquet), explained variance (CSV) and the fitted model.

The fitted model is stored as every trained step stores its model: a recipe checkpoint (the
transforms' and model's classes and arguments plus a ``state_dict``; see ``runner/recipe.py``), so
``CellariumModule.from_checkpoint`` and ``cellarium-steps predict --checkpoint`` take it as they take
a train-scvi checkpoint. Files written before that (a dict with ``format: cellarium_steps.pca/1``)
still load through :func:`read_pca_state`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cellarium_steps.atomic import atomic_path, write_csv_atomically, write_json_atomically
from cellarium_steps.data.errors import InputError
from cellarium_steps.models import ExactPCA, IncrementalPCA
from cellarium_steps.outputs.tables import PROVENANCE_KEY
from cellarium_steps.runner.recipe import RECIPE_KEY, plain

#: the format of pca state files before they became recipe checkpoints
LEGACY_STATE_FORMAT = "cellarium_steps.pca/1"


def output_paths(output: str) -> dict[str, Path]:
    path = Path(output)
    stem = path.with_suffix("") if path.suffix else path
    return {
        "components": path,
        "variance": stem.with_name(stem.name + "_variance.csv"),
        "state": stem.with_name(stem.name + ".pt"),
        "provenance": Path(output + ".provenance.json"),
    }


def state_path(path: str) -> Path:
    """The fitted model's file, given it or the pca step's --output."""
    return Path(path) if str(path).endswith(".pt") else output_paths(str(path))["state"]


def components_table(model: ExactPCA | IncrementalPCA) -> pa.Table:
    """One row per gene: DuckDB and pyarrow read a gene's loadings as one fixed-size list."""
    components_kg = model.components_kg.cpu().numpy()
    k = components_kg.shape[0]
    loadings_gk = np.ascontiguousarray(components_kg.T, dtype=np.float32)
    return pa.table(
        {
            "gene": pa.array(np.asarray(model.var_names_g).astype(str), type=pa.string()),
            "mean": pa.array(model.mean_g.cpu().numpy(), type=pa.float64()),
            "loadings": pa.FixedSizeListArray.from_arrays(pa.array(loadings_gk.reshape(-1)), k),
        }
    )


def variance_table(model: ExactPCA | IncrementalPCA) -> pd.DataFrame:
    variance_k = model.explained_variance_k.cpu().numpy()
    return pd.DataFrame(
        {
            "component": [f"PC{i + 1}" for i in range(len(variance_k))],
            "explained_variance": variance_k,
            "explained_variance_ratio": model.explained_variance_ratio_k.cpu().numpy(),
        }
    )


def write_pca_outputs(model: ExactPCA | IncrementalPCA, recipe: dict[str, Any], output: str, meta: str) -> None:
    """Loadings, variance table, the fitted model as a recipe checkpoint, provenance; each atomically."""
    paths = output_paths(output)
    table = components_table(model)
    table = table.replace_schema_metadata({PROVENANCE_KEY: meta.encode()})
    with atomic_path(paths["components"]) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_csv_atomically(variance_table(model), paths["variance"])
    checkpoint = {
        RECIPE_KEY: plain(recipe),
        # CellariumModule's naming: the model is its "model" submodule
        "state_dict": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(paths["state"]) as tmp:
        torch.save(checkpoint, tmp)
    write_json_atomically(meta, paths["provenance"])


def read_pca_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The fitted PCA in one shape whichever format stored it: ``model`` (class name), ``var_names_g``,
    ``config`` (method, n_components, target_count, log1p, genes_filtered, svd_lowrank_niter),
    ``state_dict`` (the model's own keys), ``provenance``, and ``recipe`` (None for legacy files)."""
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files that are not checkpoints
        raise InputError(f"{path}: not a PCA model written by cellarium-steps pca ({type(e).__name__})") from None
    if isinstance(stored, dict) and stored.get("format") == LEGACY_STATE_FORMAT:
        return {**stored, "recipe": None}
    recipe = stored.get(RECIPE_KEY) if isinstance(stored, dict) else None
    if not recipe or "pca" not in recipe.get("data", {}):
        raise InputError(f"{path}: not a PCA model written by cellarium-steps pca")
    init_args = recipe["model"]["init_args"]
    return {
        "model": recipe["model"]["class_path"].rpartition(".")[2],
        "var_names_g": list(init_args["var_names_g"]),
        "config": recipe["data"]["pca"],
        "state_dict": {k.removeprefix("model."): v for k, v in stored["state_dict"].items()},
        "provenance": recipe.get("provenance"),
        "recipe": recipe,
    }
