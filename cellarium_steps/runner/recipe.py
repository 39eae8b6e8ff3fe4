"""Rebuild a trained pipeline from its checkpoint: which classes, with which arguments.

A recipe is plain data: ``{"model": spec, "transforms": [spec, ...], "data": {...}}`` where a
spec is ``{"class_path": "package.module.Class", "init_args": {...}}`` and "data" says what the
inputs must look like (genes, batch key and categories, label column). It is stored in every
Lightning checkpoint the runner writes, so ``predict`` and ``export`` need only the checkpoint.
Recipes hold only JSON-like values (arrays become lists), so checkpoints load with
``torch.load(weights_only=True)``: loading one never runs code from the file.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

import numpy as np
import torch

RECIPE_KEY = "cellarium_steps_recipe"


def spec(cls: type, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": plain(init_args)}


def plain(value: Any) -> Any:
    """JSON-like values only: dicts, lists, str, int, float, bool, None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return plain(value.tolist())
    return str(value)


def instantiate(component: dict[str, Any]) -> Any:
    module_name, _, class_name = component["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**component.get("init_args", {}))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files that are not checkpoints
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or RECIPE_KEY not in checkpoint:
        raise ValueError(f"{path}: not a cellarium-steps checkpoint (no {RECIPE_KEY!r} entry)")
    return checkpoint


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of a model's weights (names, dtypes, shapes, values): two models with the same fingerprint
    compute the same function. A query mapped from a reference records the reference's."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
