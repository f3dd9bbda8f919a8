"""One-to-many matching (``train.one_to_many_repeats``): H-DETR's hybrid matching, training only.

Published basis: H-DETR (Jia et al., "DETRs with Hybrid Matching", CVPR 2023). DETR's one-to-one matching
gives each ground-truth object a single positive query, so few queries learn from each image; H-DETR adds a
separate group of queries trained with one-to-many matching -- the ground truth repeated K times and
matched to them one-to-one (Hungarian), so K queries become positives for every object -- and drops the
group at inference. Its decoder self-attention is masked from the one-to-one queries (and they from it),
and all weights (decoder, class and box heads) are shared, which is where the faster convergence comes
from: denser supervision of the shared decoder and heads.

Here: ``queries`` extra learned positional queries (H-DETR: 1,500 beside 300, K = 6; the default here is
K x ``num_queries``), matched per decoder layer against the targets repeated ``repeats`` times with the
model's own Hungarian matcher and costs, with the class (cross-entropy, "no object" weighted by
``eos_coef`` for unmatched queries), L1 and GIoU losses of the main criterion, normalised by K x
``num_boxes``. Masks are not supervised in this branch (the mask head's cost grows with every supervised
query; the official queries train it). The one-to-one queries (official and Group-DETR groups) never see
these queries, so the model at inference is the one the one-to-one losses describe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.models.query_branches import (
    BranchOutput,
    BranchQueries,
    QueryBranch,
    Targets,
    named_layer_losses,
    seeded_init_,
)

ONE_TO_MANY_SEED = 20_230_618  # the extra queries' initialisation


def repeated_targets(targets: Targets, repeats: int) -> list[dict[str, torch.Tensor]]:
    """Each image's labels [N] and boxes [N, 4] repeated ``repeats`` times ([K N], target j at j, N + j, ...)."""
    return [{"labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)} for t in targets]


@dataclass
class OneToManyOutput(BranchOutput):
    """Class logits [L, B, M, C+1] and boxes [L, B, M, 4] of the one-to-many queries."""

    class_logits: torch.Tensor
    boxes: torch.Tensor
    repeats: int
    name: str = "o2m"

    def losses(self, criterion, targets: Targets, num_boxes: float) -> dict[str, torch.Tensor]:
        repeated = repeated_targets(targets, self.repeats)
        layers = self.class_logits.shape[0]
        # every layer's matching costs reach the host in one copy (one sync per step, as the main queries)
        matches = criterion.matcher.match_layers(
            [DETROutput(pred_logits=self.class_logits[layer], pred_boxes=self.boxes[layer]) for layer in range(layers)],
            repeated)

        def layer_losses(layer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            indices = matches[layer]
            return (criterion.class_loss(self.class_logits[layer], repeated, indices),
                    criterion.box_losses(self.boxes[layer], repeated, indices, num_boxes * self.repeats))

        return named_layer_losses(self.name, layers, layer_losses)


class OneToManyQueries(QueryBranch):
    """``num_queries`` learned positional queries [M, D] matched one-to-many (``repeats`` K >= 1)."""

    name = "o2m"

    def __init__(self, num_queries: int, hidden_dim: int, repeats: int) -> None:
        super().__init__()
        if num_queries < 1 or repeats < 1:
            raise ValueError(f"one-to-many needs queries >= 1 and repeats >= 1, got {num_queries}, {repeats}")
        self.repeats = repeats
        with torch.random.fork_rng(devices=[]):  # nn.Embedding's own initialisation is replaced
            self.query_embed = seeded_init_(nn.Embedding(num_queries, hidden_dim), ONE_TO_MANY_SEED)

    def queries(self, targets: Targets, batch_size: int, device: torch.device) -> BranchQueries:
        return BranchQueries(position=self.query_embed.weight.unsqueeze(0).expand(batch_size, -1, -1))

    def output(self, class_logits: torch.Tensor, boxes: torch.Tensor, queries: BranchQueries) -> OneToManyOutput:
        return OneToManyOutput(class_logits, boxes, self.repeats)
