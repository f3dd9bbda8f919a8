"""Per-query attention maps over the encoder memory and the FPN-style mask head.

Both work on a *packed* set of queries: ``image_index[n]`` says which image row n belongs to, so the
same code computes masks for all queries (inference, reference behaviour), for the matched queries
only (training) or for the kept queries only (``PanopticDETR.predict``). Rows are gathered with
``index_select``, not advanced indexing: the same values, and a backward (``index_add_``) that is
deterministic on CPU, where advanced indexing accumulates gradients in a varying order and two runs
of the same training drift apart.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MHAttentionMap(nn.Module):
    """Attention logits of each query over the memory's pixels, softmax over heads and pixels jointly.

    Keys ``q_linear`` / ``k_linear`` as in the reference; the key projection runs as a 1x1 convolution.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5
        for linear in (self.q_linear, self.k_linear):
            nn.init.zeros_(linear.bias)
            nn.init.xavier_uniform_(linear.weight)

    def project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [..., D] -> scaled per-head queries [..., heads, D/heads]."""
        q = self.q_linear(queries) * self.normalize_fact
        return q.view(*queries.shape[:-1], self.num_heads, self.hidden_dim // self.num_heads)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        """memory [B, D, h, w] -> per-head keys [B, heads, D/heads, h*w]."""
        b, _, h, w = memory.shape
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        return k.view(b, self.num_heads, self.hidden_dim // self.num_heads, h * w)

    def attend(self, q: torch.Tensor, k: torch.Tensor, padding_mask: torch.Tensor | None,
               size: tuple[int, int]) -> torch.Tensor:
        """q [N, heads, dh], k [N, heads, dh, hw], padding_mask [N, hw] -> weights [N, heads, h, w]."""
        n, heads = q.shape[:2]
        logits = (q.unsqueeze(2) @ k).view(n, heads, k.shape[-1])
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, :], float("-inf"))
        return self.dropout(logits.flatten(1).softmax(-1).view(n, heads, *size))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor | None,
                image_index: torch.Tensor) -> torch.Tensor:
        """queries [N, D] (packed), memory [B, D, h, w], padding_mask [B, h, w] (True = padding),
        image_index [N] -> attention [N, heads, h, w] (sums to 1 over heads*h*w for each query)."""
        k = self.project_keys(memory).index_select(0, image_index)  # see the module doc
        mask = None if padding_mask is None else padding_mask.flatten(1)[image_index]
        return self.attend(self.project_queries(queries), k, mask, tuple(memory.shape[-2:]))


def _add_per_image(x: torch.Tensor, per_image: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """``x + per_image[image_index]`` without materialising the gathered copy when rows are grouped by image
    (the large 1/4-resolution maps would otherwise be duplicated once per query)."""
    if per_image.shape[0] == 1 and not (x.requires_grad or per_image.requires_grad):
        # one image (as in the ONNX mask graph): a plain broadcast, traceable. Not under autograd: the
        # broadcast's backward sums rows in another order than index_add_, and DDP runs (one image per
        # process) must match a single process to float rounding.
        return x + per_image
    if x.shape[0] == 0:
        return x
    # on an accelerator, the gathered copy (bounded by the callers' chunks) costs less than the host syncs below
    if x.requires_grad or per_image.requires_grad or x.device.type != "cpu" \
            or bool((image_index[1:] < image_index[:-1]).any()):
        return x + per_image.index_select(0, image_index)
    counts = torch.bincount(image_index, minlength=per_image.shape[0]).tolist()
    start = 0
    for b, count in enumerate(counts):
        if count:
            x[start:start + count] += per_image[b]
        start += count
    return x


def group_count(channels: int, preferred: int = 8) -> int:
    """GroupNorm groups: ``preferred`` when it divides ``channels`` (R50: always 8), else the gcd."""
    return math.gcd(preferred, channels)


class MaskHeadSmallConv(nn.Module):
    """FPN mask head. Keys: ``lay1..lay5``, ``gn1..gn5``, ``adapter1..3``, ``out_lay`` (the reference's).

    Input per query: the projected feature map (``context_dim`` channels) concatenated with the query's
    ``num_heads`` attention maps. Widths: ``dim = context_dim + num_heads``, then context_dim/2, /4, /8,
    /16; the adapters bring layer3, layer2, layer1 features (``fpn_dims``) to the widths of lay2..lay4.
    """

    def __init__(self, context_dim: int, num_heads: int, fpn_dims: Sequence[int]) -> None:
        super().__init__()
        if context_dim % 16:
            raise ValueError(f"the mask head needs hidden_dim divisible by 16, got {context_dim}")
        dim = context_dim + num_heads
        self.context_dim = context_dim
        # Memory format of the head's maps: channels-last (default) or NCHW. Either way one format all
        # through (the inputs are converted once per image): channels-last measured fastest on CPU, 1.1-1.5x
        # over NCHW and 1.6-1.8x over the backbone's channels-last features mixed with NCHW attention maps
        # (bench/bench_channels_last.py).
        self.channels_last = True
        widths = [dim, dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        for i in range(1, 6):
            self.add_module(f"lay{i}", nn.Conv2d(widths[i - 1], widths[i], 3, padding=1))
            self.add_module(f"gn{i}", nn.GroupNorm(group_count(widths[i]), widths[i]))
        self.out_lay = nn.Conv2d(widths[5], 1, 3, padding=1)
        for i, fpn_dim in enumerate(fpn_dims, start=1):
            self.add_module(f"adapter{i}", nn.Conv2d(fpn_dim, widths[i + 1], 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, f"gn{i}")(getattr(self, f"lay{i}")(x)))

    def prepare(self, projected: torch.Tensor, fpns: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The per-image parts, shared by all queries of an image: lay1 applied to the projected feature
        map (its context channels only, with the bias) and the adapters applied to layer3, layer2, layer1.

        lay1(concat(projected, attention)) == conv(projected, W_context) + b + conv(attention, W_attention):
        the context part is the same for every query, so it runs once per image.
        """
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        projected = projected.contiguous(memory_format=memory_format)
        fpns = [fpn.contiguous(memory_format=memory_format) for fpn in fpns]
        w_context = self.lay1.weight[:, : self.context_dim]
        context = F.conv2d(projected, w_context, self.lay1.bias, padding=1)
        laterals = [getattr(self, f"adapter{i}")(fpn) for i, fpn in enumerate(fpns, start=1)]
        return context, laterals

    def decode(self, context: torch.Tensor, attention: torch.Tensor, laterals: Sequence[torch.Tensor],
               image_index: torch.Tensor) -> torch.Tensor:
        """context [B, C1, h, w] and laterals from ``prepare``; attention [N, heads, h, w]; image_index [N]
        -> mask logits [N, H/4, W/4]."""
        w_attention = self.lay1.weight[:, self.context_dim:]
        x = context.index_select(0, image_index) + F.conv2d(attention, w_attention, padding=1)
        if self.channels_last:  # index_select returns NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.gn1(x))
        x = self._block(2, x)
        for i, lateral in enumerate(laterals, start=1):
            x = _add_per_image(F.interpolate(x, size=lateral.shape[-2:], mode="nearest"), lateral, image_index)
            x = self._block(i + 2, x)
        return self.out_lay(x).squeeze(1)

    def forward(self, projected: torch.Tensor, attention: torch.Tensor, fpns: Sequence[torch.Tensor],
                image_index: torch.Tensor) -> torch.Tensor:
        """projected [B, context_dim, h, w] (``input_proj`` of layer4), attention [N, heads, h, w],
        fpns: layer3, layer2, layer1 features [B, C, h_l, w_l]; image_index [N].
        Returns mask logits [N, H/4, W/4] (the size of layer1)."""
        context, laterals = self.prepare(projected, fpns)
        return self.decode(context, attention, laterals, image_index)
