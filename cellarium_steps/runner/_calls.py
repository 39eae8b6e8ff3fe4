"""How the runners hand a batch to transforms and models: each callable gets the keys it names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from torch import nn

BatchDict = dict[str, Any]


@cache
def _parameter_names(fn: Callable) -> tuple[tuple[str, ...], bool]:
    params = inspect.signature(fn).parameters.values()
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names, takes_kwargs


def call_with_batch(fn: Callable, batch: BatchDict, **extra: Any) -> Any:
    """Call ``fn`` with the batch keys its signature names (all of them if it takes **kwargs)."""
    names, takes_kwargs = _parameter_names(getattr(fn, "__func__", fn))
    if takes_kwargs:
        return fn(**batch, **extra)
    return fn(**{k: v for k, v in batch.items() if k in names}, **extra)


def apply_transforms(transforms: Sequence[nn.Module], batch: BatchDict) -> BatchDict:
    """Each transform receives the keys it names and returns the keys it overwrites."""
    for transform in transforms:
        batch = {**batch, **call_with_batch(transform.forward, batch)}
    return batch


def reads_batch_key(key: str, modules: Sequence[nn.Module]) -> bool:
    """Whether any module's ``forward`` takes ``key`` (or any key, through ``**kwargs``)."""
    for module in modules:
        names, takes_kwargs = _parameter_names(getattr(module.forward, "__func__", module.forward))
        if takes_kwargs or key in names:
            return True
    return False
