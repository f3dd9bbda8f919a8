"""Device names -> ``torch.device``, checked (the base layer: inference and the engine both use it)."""
from __future__ import annotations

import torch

from detr_panoptic.utils.errors import UserInputError


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``/None -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; other names as given."""
    if name is None or str(name) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"unknown device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device
