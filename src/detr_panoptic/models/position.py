"""Sine position embedding over the valid (unpadded) part of a feature map."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine embedding, normalised by the extent of each image's valid region.

    ``num_pos_features`` features per axis (y first, then x), temperature 10000, coordinates scaled to
    [0, 2*pi] by the cumulative count of valid pixels, so padding does not shift the embedding.
    """

    def __init__(self, num_pos_features: int = 128, temperature: float = 10000.0,
                 scale: float = 2 * math.pi, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_pos_features = num_pos_features
        self.temperature = temperature
        self.scale = scale
        self.eps = eps

    def forward(self, padding_mask: torch.Tensor) -> torch.Tensor:
        """padding_mask: [B, h, w] bool, True on padding. Returns [B, 2*num_pos_features, h, w] float32."""
        valid = (~padding_mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        y = y / (y[:, -1:, :] + self.eps) * self.scale
        x = x / (x[:, :, -1:] + self.eps) * self.scale
        n = self.num_pos_features
        index = torch.arange(n, dtype=torch.float32, device=padding_mask.device)
        inv_freq = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / n)

        def embed(coord: torch.Tensor) -> torch.Tensor:
            angles = coord[..., None] / inv_freq  # [B, h, w, n]
            # even features: sin, odd features: cos, interleaved
            return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

        return torch.cat((embed(y), embed(x)), dim=3).permute(0, 3, 1, 2)
