"""Distributed training helpers: ``torchrun`` initialisation, deterministic sharding, reductions.

A run launched with ``torchrun --nproc_per_node N detr-panoptic train ...`` (or multi-node, with
``--nnodes``/``--rdzv-*``) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and joins
the process group with ``env://`` (NCCL on CUDA, gloo on CPU). Without those variables everything
here degrades to a single process.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from detr_panoptic.utils.devices import local_cuda_index, resolve_device
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = process_device(device, local_rank=local_rank, world_size=world_size)
    if world_size <= 1:
        return DistributedContext(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        log.info("joined process group: rank %d/%d, backend %s, device %s", rank, world_size, backend, resolved)
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              device=resolved)


def process_device(name: str, *, local_rank: int, world_size: int) -> torch.device:
    """This process's device. Under ``torchrun`` (``world_size`` > 1) a CUDA device is always the process's
    own, ``cuda:<LOCAL_RANK % device_count>`` (``utils.devices.local_cuda_index``): an explicit ``cuda:N``
    would put every process on one GPU, so its index is overridden, with a warning; choose the GPUs with
    ``CUDA_VISIBLE_DEVICES`` instead."""
    resolved = resolve_device(name, local_rank)
    if world_size <= 1 or resolved.type != "cuda":
        return resolved
    own = torch.device("cuda", local_cuda_index(local_rank))
    if torch.device(name).index is not None and local_rank == 0:
        log.warning("device %s under torchrun: each process uses its own GPU (cuda:LOCAL_RANK modulo the visible "
                    "devices); choose the GPUs with CUDA_VISIBLE_DEVICES", name)
    return own


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy); the input itself when not distributed."""
    if not is_initialized():
        return values
    reduced = values.clone()
    dist.all_reduce(reduced)
    return reduced / dist.get_world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any(problem: str | None, error: type[Exception]) -> None:
    """Every process raises ``error`` when any process reports a problem (then none waits in a later
    collective for one that stopped); a no-op when none does. Collective."""
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise error("; ".join(dict.fromkeys(problems)))


def check_shared_folder(folder: Path) -> None:
    """Multi-process runs need the run folder on a filesystem every process sees: rank 0 writes a marker
    file there and each process must read it back. Collective; nothing when not distributed."""
    if not is_initialized():
        return
    rank = dist.get_rank()
    name = broadcast_object(f".shared-check-{socket.gethostname()}-{os.getpid()}")
    marker = folder / name  # each process looks in the folder as its own config names it
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    barrier()
    problem = None
    if not marker.is_file():
        problem = (f"rank {rank} ({socket.gethostname()}) cannot see {folder} as rank 0 wrote it: multi-node "
                   f"training needs train.output_dir (and model.init) on a filesystem shared by all nodes")
    try:
        raise_if_any(problem, UserInputError)
    finally:
        barrier()
        if rank == 0:
            marker.unlink(missing_ok=True)


def epoch_permutation(num_items: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's global data order: a permutation drawn from its own generator (seed, epoch)."""
    if not shuffle:
        return list(range(num_items))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def shard_indices(num_items: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> list[int]:
    """This rank's items for the epoch, like ``DistributedSampler``: the permutation padded (by
    repeating its start) to a multiple of ``world_size``, then every ``world_size``-th item from ``rank``.

    Rank r's k-th item is global position ``k * world_size + r``, so with per-process batch size b the
    processes' k-th batches together are exactly the single-process k-th batch of size ``b * world_size``.
    """
    if num_items == 0:
        return []
    order = epoch_permutation(num_items, seed=seed, epoch=epoch, shuffle=shuffle)
    padded_len = -(-num_items // world_size) * world_size
    order = (order * (padded_len // num_items + 1))[:padded_len]
    return order[rank::world_size]
