"""Distributed training helpers: ``torchrun`` initialisation, deterministic sharding, reductions.

A run launched with ``torchrun --nproc_per_node N detr-panoptic train ...`` (or multi-node, with
``--nnodes``/``--rdzv-*``) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and joins
the process group with ``env://`` (NCCL on CUDA, gloo on CPU). Without those variables everything
here degrades to a single process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from detr_panoptic.utils.devices import resolve_device

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
    resolved = resolve_device(device, local_rank)
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
