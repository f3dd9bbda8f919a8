"""Denoising queries (``train.denoising_groups``): DN-DETR's query denoising, training only.

Published basis: DN-DETR (Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising",
CVPR 2022). Bipartite matching is unstable early in training (a query's target changes from step to step),
which slows DETR down; DN-DETR feeds the decoder, beside the matching queries, noised copies of the
ground-truth boxes and labels and trains it to reconstruct the originals -- a task with a fixed answer, no
matching -- and removes those queries at inference. An attention mask keeps the matching queries from
seeing them (they would leak the answer) and the denoising groups from seeing each other; the denoising
queries may see the matching ones.

DN-DETR is built on DAB-DETR, whose queries are anchor boxes. Vanilla DETR's positional queries are
learned vectors instead, so the noised boxes need an embedding: here the sine encoding of (cx, cy, w, h)
(DETR's position encoding, ``hidden_dim / 4`` channels per coordinate) through a 2-layer MLP, as DAB-DETR
turns its anchors into positional queries. The noised label enters as the decoder's content input (DETR's
is zeros) through a label embedding of C + 1 rows (the last one for padding queries). Both are
training-only parameters.

Noise (DN-DETR's defaults): the centre moves by up to ``box_noise`` x half the width / height, the width
and height scale by a factor in [1 - ``box_noise``, 1 + ``box_noise``]; each label is replaced by a random
class with probability ``label_noise``. ``groups`` groups hold one noised copy of every target each;
images with fewer targets than the batch's largest are padded with queries that get no loss (DN-DETR
pads the same way). Losses: cross-entropy of the original label over the real denoising queries, L1 and
GIoU to the original box (the main criterion's, normalised by ``groups`` x ``num_boxes``), every supervised
decoder layer; no mask loss (the official queries train the mask head). The noise is drawn from the
global random stream, whose state ``last.pth`` keeps, so a resumed run draws the same noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detr_panoptic.models.query_branches import (
    BranchOutput,
    BranchQueries,
    QueryBranch,
    Targets,
    named_layer_losses,
    seeded_init_,
)

DENOISING_SEED = 20_220_307  # the label embedding's and box MLP's initialisation


def noised_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """``boxes`` [N, 4] normalised cxcywh with DN-DETR's box noise: centre shifted by up to ``scale`` x half
    the size, width and height scaled by a factor in [1 - scale, 1 + scale]; clamped to [0, 1]."""
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    centre, size = boxes[:, :2], boxes[:, 2:]
    centre = centre + (torch.rand_like(centre) * 2 - 1) * scale * size / 2
    size = size * (1 + (torch.rand_like(size) * 2 - 1) * scale)
    return torch.cat([centre, size], dim=1).clamp(0.0, 1.0)


def noised_labels(labels: torch.Tensor, probability: float, num_classes: int) -> torch.Tensor:
    """``labels`` [N] with each replaced by a uniformly drawn class (of ``num_classes``) with ``probability``."""
    if probability <= 0 or labels.numel() == 0:
        return labels.clone()
    flip = torch.rand(labels.shape, device=labels.device) < probability
    random = torch.randint(0, num_classes, labels.shape, device=labels.device)
    return torch.where(flip, random, labels)


def sine_box_encoding(boxes: torch.Tensor, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """[..., 4] boxes in [0, 1] -> [..., 4 * channels]: each coordinate x 2 pi through ``channels / 2``
    frequencies, sines then cosines (DETR's ``PositionEmbeddingSine`` applied to a number)."""
    if channels % 2:
        raise ValueError(f"channels per coordinate must be even, got {channels}")
    frequencies = temperature ** (2 * torch.arange(channels // 2, dtype=torch.float32, device=boxes.device)
                                  / channels)
    angles = boxes.float()[..., None] * (2 * math.pi) / frequencies  # [..., 4, channels/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


@dataclass
class DenoisingLayout:
    """Which target each denoising query reconstructs: query ``g * per_group + j`` of image b holds target
    j of image b (a padding query when j >= counts[b])."""

    groups: int
    per_group: int
    counts: list[int]

    def indices(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(query indices, target indices) per image, group after group, as the matcher returns them."""
        out = []
        for count in self.counts:
            targets = torch.arange(count, device=device)
            queries = torch.cat([g * self.per_group + targets for g in range(self.groups)])
            out.append((queries, targets.repeat(self.groups)))
        return out


@dataclass
class DenoisingOutput(BranchOutput):
    """Class logits [L, B, n, C+1] and boxes [L, B, n, 4] of the denoising queries (``layout``)."""

    class_logits: torch.Tensor
    boxes: torch.Tensor
    layout: DenoisingLayout
    name: str = "dn"

    def losses(self, criterion, targets: Targets, num_boxes: float) -> dict[str, torch.Tensor]:
        device = self.class_logits.device
        indices = self.layout.indices(device)
        labels = torch.cat([t["labels"].to(device)[tgt] for t, (_, tgt) in zip(targets, indices)])

        def layer_losses(layer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logits = self.class_logits[layer]
            rows = torch.cat([logits[b].index_select(0, q) for b, (q, _) in enumerate(indices)]).float()
            class_loss = F.cross_entropy(rows, labels) if rows.shape[0] else rows.sum()
            return class_loss, criterion.box_losses(self.boxes[layer], targets, indices,
                                                    num_boxes * self.layout.groups)

        return named_layer_losses(self.name, self.class_logits.shape[0], layer_losses)


class DenoisingQueries(QueryBranch):
    """Noised ground truth as decoder queries: positional query MLP(sine(noised box)), content query
    label_embed[noised label]; ``groups`` groups, each attending to itself and to the matching queries."""

    name = "dn"

    def __init__(self, num_classes: int, hidden_dim: int, *, groups: int, box_noise: float = 0.4,
                 label_noise: float = 0.2) -> None:
        super().__init__()
        if groups < 1 or hidden_dim % 8:
            raise ValueError(f"denoising needs groups >= 1 and hidden_dim divisible by 8, got {groups}, {hidden_dim}")
        if not (0 <= box_noise and 0 <= label_noise <= 1):
            raise ValueError(f"denoising noise must be box_noise >= 0 and label_noise in [0, 1], got "
                             f"{box_noise}, {label_noise}")
        self.num_classes = num_classes
        self.groups = groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        with torch.random.fork_rng(devices=[]):  # the layers' own initialisation is replaced below
            self.label_embed = nn.Embedding(num_classes + 1, hidden_dim)  # last row: padding queries
            self.box_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                           nn.Linear(hidden_dim, hidden_dim))
        seeded_init_(self, DENOISING_SEED)

    def queries(self, targets: Targets, batch_size: int, device: torch.device) -> BranchQueries:
        counts = [len(t["labels"]) for t in targets]
        per_group = max(counts, default=0)
        n = self.groups * per_group
        labels = torch.full((batch_size, n), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.full((batch_size, n, 4), 0.5, device=device)
        for b, t in enumerate(targets):
            for g in range(self.groups):
                part = slice(g * per_group, g * per_group + counts[b])
                labels[b, part] = noised_labels(t["labels"].to(device), self.label_noise, self.num_classes)
                boxes[b, part] = noised_boxes(t["boxes"].to(device).float(), self.box_noise)
        hidden = self.label_embed.embedding_dim
        position = self.box_embed(sine_box_encoding(boxes, hidden // 4))
        group = torch.arange(n, device=device) // max(per_group, 1)
        return BranchQueries(position=position, content=self.label_embed(labels),
                             self_mask=group[:, None] == group[None, :], sees_main=True,
                             about=DenoisingLayout(self.groups, per_group, counts))

    def output(self, class_logits: torch.Tensor, boxes: torch.Tensor, queries: BranchQueries) -> DenoisingOutput:
        return DenoisingOutput(class_logits, boxes, queries.about)
