"""The cellarium ML model API: one model per file, pure torch and pyro, no file or CLI knowledge.

Models are imported on first use: the transformer models pull in Hugging Face ``transformers`` and
the trained ones pyro, seconds of start-up that a statistics step should not pay.
"""

import importlib

from cellarium_steps.models.base import CellariumModel, PredictMixin, TestMixin, ValidateMixin

_MODEL_MODULES = {
    "CellariumGPT": "cellarium_gpt",
    "ContrastiveMLP": "contrastive_mlp",
    "ExactPCA": "exact_pca",
    "Geneformer": "geneformer",
    "HVGSeuratV3": "hvg_seurat_v3",
    "IncrementalPCA": "incremental_pca",
    "LogisticRegression": "logistic_regression",
    "OnePassMeanVarStd": "onepass_mean_var_std",
    "ProbabilisticPCA": "probabilistic_pca",
    "SOCAM": "socam",
    "SingleCellVariationalInference": "scvi",
    "TDigest": "tdigest",
}

__all__ = ["CellariumModel", "PredictMixin", "TestMixin", "ValidateMixin", *sorted(_MODEL_MODULES)]


def __getattr__(name: str):  # noqa: ANN202
    if name in _MODEL_MODULES:
        return getattr(importlib.import_module(f"cellarium_steps.models.{_MODEL_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
