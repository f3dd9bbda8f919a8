"""Device names -> ``torch.device``, checked (the base layer: inference and the engine both use it)."""
from __future__ import annotations

import torch

from detr_panoptic.utils.errors import UserInputError


def local_cuda_index(local_rank: int = 0) -> int:
    """The visible GPU of the process with ``local_rank``: ``local_rank % torch.cuda.device_count()``.

    The modulo lets a launcher that shows each process only its own GPU (SLURM's per-task GPU binding,
    ``CUDA_VISIBLE_DEVICES`` per process: one visible device, index 0) work like ``torchrun`` on a machine
    whose processes all see every GPU (index ``LOCAL_RANK``)."""
    count = torch.cuda.device_count()
    if count < 1:
        raise UserInputError("CUDA is available but no device is visible (check CUDA_VISIBLE_DEVICES)")
    return local_rank % count


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``/None -> ``cuda:<local_cuda_index(local_rank)>`` when CUDA is available, else ``cpu``;
    ``cuda`` without an index the same; other names as given (a CUDA index must be a visible device)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda", local_cuda_index(local_rank)) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"unknown device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        if device.index is None:
            return torch.device("cuda", local_cuda_index(local_rank))
        if device.index >= torch.cuda.device_count():
            raise UserInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device
