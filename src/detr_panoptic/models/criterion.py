"""The DETR panoptic training losses: (predictions, targets) -> dict of *unweighted* named losses.

Definitions follow the reference training (see NOTES.md):

* ``loss_ce``: cross-entropy over the C+1 classes of every query; unmatched queries target "no object"
  (index C), whose class weight is ``eos_coef``; the mean is the weighted mean over all queries of the batch.
* ``loss_bbox``: L1 between matched normalised cxcywh boxes, summed, divided by ``num_boxes``.
* ``loss_giou``: ``1 - GIoU`` of matched boxes (xyxy), summed, divided by ``num_boxes``.
* ``loss_mask``: sigmoid focal loss (alpha 0.25, gamma 2) of matched masks, mean over pixels, summed over
  masks, divided by ``num_boxes``; predicted masks are upsampled bilinearly (align_corners False) to the
  target masks padded to the largest size in the batch.
* ``loss_dice``: ``1 - (2|P.T| + 1) / (|P| + |T| + 1)`` per matched mask, summed, divided by ``num_boxes``.

``num_boxes`` is the number of target segments in the batch, averaged over processes when
``torch.distributed`` is initialised, and at least 1. With DistributedDataParallel averaging the
gradients, ``sum_r loss_r / world_size`` then equals the single-process loss of the global batch for the
box and mask losses.

Auxiliary decoder outputs get ``loss_ce_i``, ``loss_bbox_i``, ``loss_giou_i`` (i = 0..L-2), with their own
matching; masks are supervised on the last layer only. Loss weights live in ``criterion.weight_dict``
and are applied in one place, ``criterion.weighted_total(losses)``.

Beside the losses, two logged values without weight or gradient, of the last layer's matching as the
reference logs them: ``class_accuracy``, the percentage of matched queries whose top-1 class (of the C+1
logits) is their target's, and ``class_error`` = 100 - ``class_accuracy`` (100 when nothing is matched,
as in the reference).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detr_panoptic.models.matcher import HungarianMatcher, MatchIndices, build_matcher, to_device
from detr_panoptic.models.outputs import DETROutput

Targets = Sequence[Mapping[str, Any]]


def dice_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor, num_boxes: float) -> torch.Tensor:
    """Sum over masks of ``1 - (2 |P.T| + 1) / (|P| + |T| + 1)`` / ``num_boxes``; inputs [N, P] (P pixels)."""
    prob = mask_logits.sigmoid()
    numerator = 2 * (prob * target_masks).sum(-1)
    denominator = prob.sum(-1) + target_masks.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def focal_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor, num_boxes: float,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, mean over pixels, summed over masks / ``num_boxes``; inputs [N, P]."""
    per_pixel = sigmoid_focal_loss(mask_logits, target_masks, alpha=alpha, gamma=gamma, reduction="none")
    return per_pixel.mean(-1).sum() / num_boxes


MASK_LOSS_CHUNK = 2**24  # pixels per chunk of masks in the fused mask losses on an accelerator


def masks_per_chunk(device: torch.device, num_pixels: int) -> int:
    """Masks per pass of the fused mask losses: 1 on the CPU, ~``MASK_LOSS_CHUNK`` pixels' worth elsewhere."""
    return 1 if device.type == "cpu" else max(1, MASK_LOSS_CHUNK // max(num_pixels, 1))


class _SigmoidMaskLosses(torch.autograd.Function):
    """Per-mask focal (gamma 2) and dice losses of ``logits`` [N, P] against Bool ``targets`` [N, P] in one
    pass per mask, with the gradient formed in the forward pass: the same values as ``focal_loss`` and
    ``dice_loss`` (per mask, before ``/ num_boxes``) for about half the time and memory at 800x1600.

    With z = -x on target pixels and x elsewhere, 1 - p_t = sigmoid(z) = q and the cross-entropy is
    softplus(z), so focal = a q^2 softplus(z) and d focal / dz = a q^2 (q + 2 softplus(z) (1 - q)).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        num_masks, num_pixels = logits.shape
        focal = logits.new_empty(num_masks)
        inter = logits.new_empty(num_masks)
        prob_sum = logits.new_empty(num_masks)
        focal_grad = torch.empty_like(logits)  # d focal_pixel / d logit
        prob_grad = torch.empty_like(logits)   # d sigmoid(logit) / d logit
        # One mask at a time on the CPU keeps the temporaries small; on an accelerator, where a loop over
        # masks is launch-bound, chunks of about MASK_LOSS_CHUNK pixels.
        step = masks_per_chunk(logits.device, num_pixels)
        for start in range(0, num_masks, step):
            i = start if step == 1 else slice(start, start + step)
            x, t = logits[i], targets[i]
            z = torch.where(t, -x, x)
            q = torch.sigmoid(z)
            ce = F.softplus(z)
            weight = torch.where(t, alpha, 1 - alpha)
            one_minus_q = 1 - q
            focal[i] = (q * q * ce * weight).sum(-1) / num_pixels
            prob = torch.where(t, one_minus_q, q)
            prob_sum[i] = prob.sum(-1)
            inter[i] = (prob * t).sum(-1)
            grad_z = (one_minus_q * ce * 2 + q) * q * q * weight
            torch.where(t, -grad_z, grad_z, out=focal_grad[i])
            torch.mul(q, one_minus_q, out=prob_grad[i])
        denominator = prob_sum + targets.sum(1).to(logits.dtype) + 1
        dice = 1 - (2 * inter + 1) / denominator
        ctx.save_for_backward(targets, focal_grad, prob_grad, inter, denominator)
        return focal, dice

    @staticmethod
    def backward(ctx: Any, grad_focal: torch.Tensor, grad_dice: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        targets, focal_grad, prob_grad, inter, denominator = ctx.saved_tensors
        num_pixels = targets.shape[1]
        # d dice / d prob_j = -(2 t_j (S + T + 1) - (2 I + 1)) / (S + T + 1)^2
        off_target = (grad_dice * (2 * inter + 1) / denominator.square())[:, None]
        on_target = (-2 * grad_dice / denominator)[:, None]
        grad = focal_grad * (grad_focal / num_pixels)[:, None]
        grad += prob_grad * (off_target + on_target * targets)
        return grad, None, None


def sigmoid_mask_losses(mask_logits: torch.Tensor, target_masks: torch.Tensor, *, alpha: float = 0.25
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask (focal mean over pixels with gamma 2, dice) for ``mask_logits`` [N, P] and Bool
    ``target_masks`` [N, P]; equal to ``focal_loss``/``dice_loss`` before their ``sum() / num_boxes``."""
    return _SigmoidMaskLosses.apply(mask_logits.float(), target_masks.to(torch.bool), alpha)


@dataclass(frozen=True)
class DeviceMatch:
    """One layer's matching as flat index tensors on the predictions' device, image by image (the order of
    ``MatchIndices``): ``image``, ``query`` and ``target`` (the target's row in the batch's concatenated
    targets) per matched pair; ``local_target`` is the row within its image; ``counts`` pairs per image (host)."""

    image: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    local_target: torch.Tensor
    counts: tuple[int, ...]

    def flat_query(self, num_queries: int) -> torch.Tensor:
        """Rows of a ``[B * Q, ...]`` flattening of per-query predictions."""
        return self.image * num_queries + self.query

    def per_image(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(values, list(self.counts)))


def device_matches(layers: Sequence[MatchIndices], targets: Targets, device: torch.device) -> list[DeviceMatch]:
    """Every layer's ``MatchIndices`` as ``DeviceMatch`` on ``device``, in one (asynchronous) copy."""
    offsets = list(itertools.accumulate((int(t["labels"].shape[0]) for t in targets), initial=0))
    rows = []
    for indices in layers:
        for b, (query_idx, target_idx) in enumerate(indices):
            offset = offsets[b] if b < len(targets) else 0  # no targets given: only queries are needed
            rows.append(torch.stack([torch.full_like(query_idx, b), query_idx, target_idx + offset, target_idx]))
    host = torch.cat(rows, 1) if rows else torch.empty(4, 0, dtype=torch.int64)
    flat = to_device(host, device)
    matches, start = [], 0
    for indices in layers:
        counts = tuple(len(q) for q, _ in indices)
        part = flat[:, start:start + sum(counts)]
        start += sum(counts)
        matches.append(DeviceMatch(part[0], part[1], part[2], part[3], counts))
    return matches


@torch.no_grad()
def matched_class_accuracy(class_logits: torch.Tensor, targets: Targets, indices: MatchIndices | DeviceMatch,
                           target_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Percentage (0-d float tensor, on the logits' device) of matched queries whose arg-max class over the
    C+1 logits ``class_logits`` [B, Q, C+1] is their target's label; 0 when nothing is matched."""
    match, labels = _on_device(indices, targets, class_logits.device, target_labels)
    predicted = class_logits.flatten(0, 1).index_select(0, match.flat_query(class_logits.shape[1])).argmax(-1)
    if predicted.numel() == 0:
        return class_logits.new_zeros((), dtype=torch.float32)
    return (predicted == labels.index_select(0, match.target)).float().mean() * 100


def _on_device(indices: MatchIndices | DeviceMatch, targets: Targets, device: torch.device,
               target_labels: torch.Tensor | None = None) -> tuple[DeviceMatch, torch.Tensor]:
    match = indices if isinstance(indices, DeviceMatch) else device_matches([indices], targets, device)[0]
    if target_labels is None:
        target_labels = torch.cat([t["labels"] for t in targets]).to(device, non_blocking=True)
    return match, target_labels


def average_num_boxes(targets: Targets, device: torch.device) -> float | torch.Tensor:
    """Number of target segments in the batch, averaged over processes when distributed, at least 1: a
    float, or a 0-d tensor on ``device`` when distributed (reading it back would cost a host sync)."""
    count = float(sum(len(t["labels"]) for t in targets))
    if not (dist.is_available() and dist.is_initialized()):
        return max(count, 1.0)
    num_boxes = torch.full((), count, device=device)  # filled on the device: no blocking host copy
    dist.all_reduce(num_boxes)
    return (num_boxes / dist.get_world_size()).clamp(min=1.0)


class SetCriterion(nn.Module):
    """Callable ``criterion(outputs, targets, indices=None) -> {name: unweighted loss}`` (plus the logged
    ``class_accuracy`` and ``class_error``, which have no weight).

    ``outputs`` is a ``DETROutput``; ``pred_masks`` may hold every query ([B, Q, h, w]) or only the
    queries listed in ``outputs.mask_queries`` (packed [N, h, w]). ``indices`` is the final layer's
    matching (e.g. from ``QuerySelector.indices``); when None the matcher runs here. ``targets`` follow
    the dataset contract (``labels``, ``boxes`` normalised cxcywh, ``masks`` Bool [N, H, W]).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float], *,
                 eos_coef: float = 0.1, masks: bool = True, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.masks = masks
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    # -- the individual losses --------------------------------------------------------------------
    def class_loss(self, class_logits: torch.Tensor, targets: Targets, indices: MatchIndices | DeviceMatch,
                   query_groups: int = 1, target_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted cross-entropy over all queries; ``class_logits`` [B, Q, C+1]. With ``query_groups`` K
        > 1: the mean over the K groups (consecutive Q / K queries) of each group's weighted mean."""
        if class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"criterion built for {self.num_classes} classes (+1 no-object) but the model "
                             f"predicts {class_logits.shape[-1]} logits per query")
        match, labels = _on_device(indices, targets, class_logits.device, target_labels)
        target_classes = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=class_logits.device)
        target_classes[match.image, match.query] = labels.index_select(0, match.target)
        weight = self.class_weight.to(class_logits.device)
        if query_groups > 1:
            logits = class_logits.float().transpose(1, 2)
            return torch.stack([F.cross_entropy(lg, tc, weight=weight) for lg, tc in
                                zip(logits.chunk(query_groups, dim=2), target_classes.chunk(query_groups, dim=1))]
                               ).mean()
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=weight)

    def box_losses(self, boxes: torch.Tensor, targets: Targets, indices: MatchIndices | DeviceMatch,
                   num_boxes: float | torch.Tensor, target_boxes: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """L1 and 1-GIoU over matched pairs; ``boxes`` [B, Q, 4] normalised cxcywh."""
        match, _ = _on_device(indices, targets, boxes.device, target_boxes)
        if target_boxes is None:
            target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device, non_blocking=True)
        # index_select: a backward that is deterministic on CPU, unlike advanced indexing's
        matched = boxes.flatten(0, 1).index_select(0, match.flat_query(boxes.shape[1])).float()
        target = target_boxes.index_select(0, match.target).to(matched)
        loss_bbox = F.l1_loss(matched, target, reduction="none").sum() / num_boxes
        if matched.shape[0] == 0:
            loss_giou = matched.sum() * 0  # keeps the graph (and DDP) happy with zero matches
        else:
            giou = torch.diag(generalized_box_iou(box_convert(matched, "cxcywh", "xyxy"),
                                                  box_convert(target, "cxcywh", "xyxy")))
            loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def mask_losses(self, outputs: DETROutput, targets: Targets, indices: MatchIndices | DeviceMatch,
                    num_boxes: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Focal and dice losses of matched masks upsampled to the padded target size."""
        pred_masks = outputs.pred_masks
        if pred_masks is None:
            raise ValueError("criterion: outputs.pred_masks is None but mask losses were requested")
        match, _ = _on_device(indices, targets, pred_masks.device, pred_masks.new_empty(0))
        matched = select_matched_masks(pred_masks, outputs.mask_queries, match)
        if matched.shape[0] == 0:
            zero = pred_masks.sum() * 0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        height = max(int(t["masks"].shape[-2]) for t in targets)
        width = max(int(t["masks"].shape[-1]) for t in targets)
        target_masks = torch.cat([
            _pad_to(t["masks"].index_select(0, rows.to(t["masks"].device)), height, width)
            for t, rows in zip(targets, match.per_image(match.local_target))
        ]).to(device=matched.device, dtype=torch.bool)
        upsampled = F.interpolate(matched[:, None].float(), size=(height, width), mode="bilinear",
                                  align_corners=False)[:, 0]
        logits = upsampled.flatten(1)
        target_flat = target_masks.flatten(1)
        if self.focal_gamma == 2.0:
            focal, dice = sigmoid_mask_losses(logits, target_flat, alpha=self.focal_alpha)
            return {"loss_mask": focal.sum() / num_boxes, "loss_dice": dice.sum() / num_boxes}
        target_float = target_flat.float()
        return {
            "loss_mask": focal_loss(logits, target_float, num_boxes, self.focal_alpha, self.focal_gamma),
            "loss_dice": dice_loss(logits, target_float, num_boxes),
        }

    # -- the whole set ----------------------------------------------------------------------------
    def forward(self, outputs: DETROutput, targets: Targets, indices: MatchIndices | None = None,
                aux_indices: Sequence[MatchIndices] | None = None) -> dict[str, torch.Tensor]:
        """``indices``/``aux_indices``: the final and auxiliary layers' matchings (``QuerySelector`` has
        both); the matcher runs here for those not given. All layers' indices reach the device in one copy."""
        aux_outputs = list(outputs.aux_outputs)
        if indices is None:
            indices, *aux_indices = self.matcher.match_layers([outputs, *aux_outputs], targets)
        elif aux_indices is None:
            aux_indices = self.matcher.match_layers(aux_outputs, targets) if aux_outputs else []
        if len(aux_indices) != len(aux_outputs):
            raise ValueError(f"{len(aux_indices)} auxiliary matchings for {len(aux_outputs)} auxiliary outputs")
        device = outputs.pred_logits.device
        match, *aux_matches = device_matches([indices, *aux_indices], targets, device)
        labels = torch.cat([t["labels"] for t in targets]).to(device, non_blocking=True)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device, non_blocking=True)
        num_boxes = average_num_boxes(targets, device)
        # Query groups (Group-DETR training): every target is matched once per group, so the matched
        # sums are divided by groups x num_boxes -- the mean over groups of each group's loss.
        groups = outputs.query_groups
        per_group = num_boxes * groups
        losses: dict[str, torch.Tensor] = {"loss_ce": self.class_loss(outputs.pred_logits, targets, match, groups, labels)}
        losses.update(self.box_losses(outputs.pred_boxes, targets, match, per_group, boxes))
        if self.masks:
            losses.update(self.mask_losses(outputs, targets, match, per_group))
        accuracy = matched_class_accuracy(outputs.pred_logits, targets, match, labels)
        losses.update({"class_accuracy": accuracy, "class_error": 100 - accuracy})
        for i, (aux, aux_match) in enumerate(zip(aux_outputs, aux_matches)):
            aux_losses = {"loss_ce": self.class_loss(aux.pred_logits, targets, aux_match, aux.query_groups, labels)}
            aux_losses.update(self.box_losses(aux.pred_boxes, targets, aux_match, num_boxes * aux.query_groups,
                                              boxes))
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        for branch in outputs.branches.values():  # training-only query branches (models/query_branches.py)
            losses.update(branch.losses(self, targets, num_boxes))
        return losses

    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: sum of ``weight_dict[name] * loss`` over the losses that have a weight."""
        terms = [losses[name] * weight for name, weight in self.weight_dict.items() if name in losses]
        if not terms:
            raise ValueError(f"none of the losses {sorted(losses)} has a weight in {sorted(self.weight_dict)}")
        return torch.stack([t.float() for t in terms]).sum()


def select_matched_masks(pred_masks: torch.Tensor, mask_queries: Sequence[torch.Tensor] | None,
                         indices: MatchIndices | DeviceMatch) -> torch.Tensor:
    """The matched queries' mask logits [K, h, w], ordered like ``indices`` (image by image).

    ``pred_masks`` is either [B, Q, h, w] (``mask_queries`` None) or packed [N, h, w] holding, image by
    image, the queries listed in ``mask_queries``; every matched query must be among them (checked on the
    CPU; on an accelerator an asynchronous device assertion, so that the check costs no host sync).
    """
    match = indices if isinstance(indices, DeviceMatch) else device_matches([indices], [], pred_masks.device)[0]
    if mask_queries is None:
        if pred_masks.dim() != 4:
            raise ValueError(f"pred_masks must be [B, Q, h, w] when mask_queries is None, got {tuple(pred_masks.shape)}")
        return pred_masks.flatten(0, 1).index_select(0, match.flat_query(pred_masks.shape[1]))
    if pred_masks.dim() != 3:
        raise ValueError(f"packed pred_masks must be [N, h, w], got {tuple(pred_masks.shape)}")
    rows = []
    offset = 0
    for b, wanted in enumerate(match.per_image(match.query)):
        available = mask_queries[b].to(pred_masks.device)
        if wanted.numel():
            hits = wanted[:, None] == available[None, :]
            found = hits.any(1)
            if pred_masks.device.type == "cpu":
                if not bool(found.all()):
                    raise ValueError(f"image {b}: matched queries {wanted[~found].tolist()} have no mask in "
                                     f"pred_masks (mask_queries {available.tolist()})")
            else:
                torch._assert_async(found.all(), f"image {b}: a matched query has no mask in pred_masks")
            rows.append(offset + hits.int().argmax(1))
        offset += available.numel()
    if offset != pred_masks.shape[0]:
        raise ValueError(f"mask_queries list {offset} masks but pred_masks holds {pred_masks.shape[0]}")
    if not rows:
        return pred_masks[:0]
    return pred_masks.index_select(0, torch.cat(rows))


def _pad_to(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad [N, h, w] masks at the bottom/right to [N, height, width]."""
    return F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))


def default_weight_dict(*, ce: float = 1.0, bbox: float = 5.0, giou: float = 2.0, mask: float = 1.0,
                        dice: float = 1.0, aux_layers: int = 0) -> dict[str, float]:
    weights = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou, "loss_mask": mask, "loss_dice": dice}
    for i in range(aux_layers):
        weights.update({f"loss_ce_{i}": ce, f"loss_bbox_{i}": bbox, f"loss_giou_{i}": giou})
    return weights


def build_criterion(num_classes: int, *, aux_loss: bool = False, num_decoder_layers: int = 6,
                    eos_coef: float = 0.1, ce_loss_coef: float = 1.0, bbox_loss_coef: float = 5.0,
                    giou_loss_coef: float = 2.0, mask_loss_coef: float = 1.0, dice_loss_coef: float = 1.0,
                    set_cost_class: float = 1.0, set_cost_bbox: float = 5.0, set_cost_giou: float = 2.0,
                    masks: bool = True, raise_on_nonfinite: bool = True) -> SetCriterion:
    """The reference panoptic criterion (NOTES.md defaults) with its own Hungarian matcher.

    ``num_classes`` excludes "no object". With ``aux_loss`` the weight dict also covers the
    ``num_decoder_layers - 1`` auxiliary outputs (``loss_ce_0`` ...). ``raise_on_nonfinite=False``: a
    NaN prediction gives a non-finite loss (which every DDP process sees) instead of an error in matching.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    matcher = build_matcher(cost_class=set_cost_class, cost_bbox=set_cost_bbox, cost_giou=set_cost_giou,
                            raise_on_nonfinite=raise_on_nonfinite)
    weights = default_weight_dict(ce=ce_loss_coef, bbox=bbox_loss_coef, giou=giou_loss_coef,
                                  mask=mask_loss_coef, dice=dice_loss_coef,
                                  aux_layers=num_decoder_layers - 1 if aux_loss else 0)
    if not masks:
        weights.pop("loss_mask")
        weights.pop("loss_dice")
    return SetCriterion(num_classes, matcher, weights, eos_coef=eos_coef, masks=masks)
