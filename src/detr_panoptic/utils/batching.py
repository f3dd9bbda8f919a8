"""Batching differently-sized images: zero-pad to the largest size, with a padding mask."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[C, H_i, W_i]`` images into one batch.

    Returns ``(batch [B, C, H, W], mask [B, H, W] bool)`` where ``mask`` is True on padding, as the
    reference DETR expects. Each image sits in the top-left corner; H, W are rounded up to a multiple
    of ``size_divisibility``.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    channels = images[0].shape[0]
    if any(img.dim() != 3 or img.shape[0] != channels for img in images):
        raise ValueError(f"expected [C, H, W] images with the same C, got shapes {[tuple(i.shape) for i in images]}")
    height = max(int(img.shape[1]) for img in images)
    width = max(int(img.shape[2]) for img in images)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return batch, mask
