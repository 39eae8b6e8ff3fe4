"""The cellarium ML model API: one model per file, pure torch and pyro, no file or CLI knowledge."""

from cellarium_steps.models.base import CellariumModel, PredictMixin, TestMixin, ValidateMixin
from cellarium_steps.models.contrastive_mlp import ContrastiveMLP
from cellarium_steps.models.exact_pca import ExactPCA
from cellarium_steps.models.hvg_seurat_v3 import HVGSeuratV3
from cellarium_steps.models.incremental_pca import IncrementalPCA
from cellarium_steps.models.logistic_regression import LogisticRegression
from cellarium_steps.models.onepass_mean_var_std import OnePassMeanVarStd
from cellarium_steps.models.probabilistic_pca import ProbabilisticPCA
from cellarium_steps.models.scvi import SingleCellVariationalInference
from cellarium_steps.models.socam import SOCAM
from cellarium_steps.models.tdigest import TDigest

__all__ = [
    "SOCAM",
    "CellariumModel",
    "ContrastiveMLP",
    "ExactPCA",
    "HVGSeuratV3",
    "IncrementalPCA",
    "LogisticRegression",
    "OnePassMeanVarStd",
    "PredictMixin",
    "ProbabilisticPCA",
    "SingleCellVariationalInference",
    "TDigest",
    "TestMixin",
    "ValidateMixin",
]
