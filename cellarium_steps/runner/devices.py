"""Which accelerator and how many processes a step's ``--accelerator`` / ``--devices`` ask for."""

from __future__ import annotations

import torch


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def device_count(devices: int | str, accelerator: str) -> int:
    """How many processes ``devices`` asks for (Lightning's reading of the value)."""
    accelerator = resolve_accelerator(accelerator)
    if isinstance(devices, int):
        return devices if devices > 0 else (torch.cuda.device_count() if accelerator != "cpu" else 1)
    if str(devices).isdigit():
        return int(devices)
    if accelerator in ("gpu", "cuda"):
        return torch.cuda.device_count()
    return 1
