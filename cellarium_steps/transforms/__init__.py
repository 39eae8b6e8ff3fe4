"""Batch-to-batch transforms the runner chains before a model; each returns the keys it overwrites."""

from cellarium_steps.transforms.batch_map import BatchIndexMap
from cellarium_steps.transforms.filter import Filter
from cellarium_steps.transforms.log1p import Log1p
from cellarium_steps.transforms.normalize_total import NormalizeTotal
from cellarium_steps.transforms.zscore import ZScore

__all__ = ["BatchIndexMap", "Filter", "Log1p", "NormalizeTotal", "ZScore"]
