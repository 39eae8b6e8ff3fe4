"""A fitted pipeline's embedding as the input of the next model: PCA components or scVI latent means."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cellarium_steps.runner._calls import apply_transforms, call_with_batch
from cellarium_steps.runner.recipe import instantiate


class ModelFeatures(nn.Module):
    """``x_ng`` -> the inner pipeline's ``predict`` output (cells x features), as a transform.

    The inner transforms and model are rebuilt from recipe specs (as a checkpoint stores them); their
    weights are loaded once by the step that builds the outer model, travel in the outer checkpoint's
    state dict, and never train: the parameters are frozen and the inner modules stay in eval mode
    whatever mode the outer module is put in (scVI's batch norm keeps its running statistics).

    Args:
        model: The inner model's spec (``{"class_path": ..., "init_args": ...}``); it must have ``predict``.
        transforms: The specs of the transforms the inner model was fitted after.
        feature_prefix: Names of the features when ``predict`` gives none (``scvi_0``, ``scvi_1``, ...).
    """

    def __init__(self, model: dict[str, Any], transforms: list[dict[str, Any]] = (), feature_prefix: str = "f") -> None:
        super().__init__()
        self.transforms = nn.ModuleList(instantiate(t) for t in transforms)
        self.model = instantiate(model)
        self.feature_prefix = feature_prefix
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self._names: np.ndarray | None = None
        self.train(False)

    def train(self, mode: bool = True) -> ModelFeatures:
        super().train(mode)
        self.transforms.eval()
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, **batch: Any) -> dict[str, Any]:
        inner = apply_transforms(self.transforms, batch)
        out = call_with_batch(self.model.predict, inner)
        x_nf = out["x_ng"]
        if self._names is None or len(self._names) != x_nf.shape[1]:
            names = out.get("var_names_g")
            self._names = (np.asarray(names, dtype=object) if names is not None
                           else np.array([f"{self.feature_prefix}{i}" for i in range(x_nf.shape[1])], dtype=object))
        return {"x_ng": x_nf, "var_names_g": self._names}
