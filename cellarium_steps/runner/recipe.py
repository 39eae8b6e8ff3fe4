"""Rebuild a trained pipeline from its checkpoint: which classes, with which arguments.

A recipe is plain data: ``{"model": spec, "transforms": [spec, ...], "data": {...}}`` where a
spec is ``{"class_path": "package.module.Class", "init_args": {...}}``. It is stored in every
Lightning checkpoint the runner writes, so ``predict`` and ``export`` need only the checkpoint.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

RECIPE_KEY = "cellarium_steps_recipe"


def spec(cls: type, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def instantiate(component: dict[str, Any]) -> Any:
    module_name, _, class_name = component["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**component.get("init_args", {}))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Our own checkpoints hold numpy arrays (gene names) next to tensors, hence weights_only=False."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if RECIPE_KEY not in checkpoint:
        raise ValueError(f"{path}: not a cellarium-steps checkpoint (no {RECIPE_KEY!r} entry)")
    return checkpoint
