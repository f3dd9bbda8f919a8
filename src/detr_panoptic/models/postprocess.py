"""Panoptic post-processing: DETR predictions -> per-image segment id maps and segment lists.

Reproduces the reference algorithm (NOTES.md, "Panoptic post-processing"), quirks included, with three
fixes: segment ids start at 1 (0 is void), nothing kept gives no segments and an all-void map, and in a
padded batch each image's masks are cropped to its valid region before resizing. Pure torch, per image,
on whatever device the predictions are on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from detr_panoptic.models.outputs import DETROutput, PanopticResult

MIN_AREA = 4  # segments with area <= MIN_AREA pixels (at the target size) are dropped, as in the reference
MERGE_MODES = ("reference", "merge")


def kept_queries(pred_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [B, Q]: the best class (softmax over C+1) is not "no object" and its probability > threshold."""
    scores, labels = pred_logits.softmax(-1).max(-1)
    return (labels != pred_logits.shape[-1] - 1) & (scores > threshold)


def _as_sizes(sizes: Sequence[Sequence[int]] | torch.Tensor, batch: int, what: str) -> list[tuple[int, int]]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    out = [(int(s[0]), int(s[1])) for s in sizes]
    if len(out) != batch:
        raise ValueError(f"{what}: expected {batch} (h, w) pairs, got {len(out)}")
    return out


def nearest_resize_ids(id_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an integer map [h, w] with PIL's NEAREST rule (sample the source at pixel centres)."""
    h, w = id_map.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return id_map
    rows = ((torch.arange(out_h, device=id_map.device, dtype=torch.float64) + 0.5) * (h / out_h)).floor().long()
    cols = ((torch.arange(out_w, device=id_map.device, dtype=torch.float64) + 0.5) * (w / out_w)).floor().long()
    return id_map[rows.clamp_(max=h - 1)][:, cols.clamp_(max=w - 1)]


def _valid_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int],
                     input_size: tuple[int, int] | None) -> tuple[int, int]:
    """Rows/cols of the mask grid that cover the unpadded image (the whole grid when there is no padding)."""
    if input_size is None:
        return mask_size
    valid = []
    for grid, image, padded in zip(mask_size, image_size, input_size):
        if image >= padded:
            valid.append(grid)
        elif grid == math.ceil(padded / 4):  # the model's stride-4 masks: cells that touch the image
            valid.append(min(grid, math.ceil(image / 4)))
        else:
            valid.append(min(grid, max(1, round(image * grid / padded))))
    return valid[0], valid[1]


def _image_masks(outputs: DETROutput, b: int, queries: torch.Tensor) -> torch.Tensor:
    """Mask logits [K, h4, w4] of image b's ``queries``, from full or packed ``pred_masks``."""
    if outputs.pred_masks is None:
        raise ValueError("the predictions hold no masks (pred_masks is None)")
    if outputs.mask_queries is None:
        return outputs.pred_masks[b, queries]
    start = sum(len(q) for q in outputs.mask_queries[:b])
    available = outputs.mask_queries[b].to(queries.device)
    match = available[None, :] == queries[:, None]  # [K, M]
    if not bool(match.any(1).all()):
        missing = queries[~match.any(1)].tolist()
        raise ValueError(f"image {b}: masks of kept queries {missing} were not computed (mask_queries)")
    return outputs.pred_masks[start + match.float().argmax(1)]


def panoptic_postprocess(outputs: DETROutput, processed_sizes: Sequence[Sequence[int]] | torch.Tensor,
                         target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None, *,
                         is_thing: torch.Tensor, threshold: float = 0.85, merge_stuff: str = "reference",
                         class_to_category: torch.Tensor | None = None) -> list[PanopticResult]:
    """One ``PanopticResult`` per image.

    outputs: ``DETROutput`` with pred_logits [B, Q, C+1] and pred_masks (all queries [B, Q, h4, w4], or
        packed with ``mask_queries`` covering at least the kept queries).
    processed_sizes: (h, w) per image of the unpadded model input; masks are resized to it (bilinear).
    target_sizes: (h, w) per image of the final id map (nearest); default: processed_sizes.
    is_thing: Bool [C] per class index. class_to_category: Long [C], the ``category_id`` reported per
        class index (default: the class index itself).
    merge_stuff: "reference" (several kept queries of one stuff class: only the first survives, its
        pixels re-assigned by argmax among the survivors) or "merge" (their pixels form one segment).
    """
    if merge_stuff not in MERGE_MODES:
        raise ValueError(f"merge_stuff must be one of {MERGE_MODES}, got {merge_stuff!r}")
    logits = outputs.pred_logits
    batch, _, num_classes_plus_one = logits.shape
    if is_thing.numel() != num_classes_plus_one - 1:
        raise ValueError(f"is_thing has {is_thing.numel()} entries for {num_classes_plus_one - 1} classes")
    processed = _as_sizes(processed_sizes, batch, "processed_sizes")
    targets = processed if target_sizes is None else _as_sizes(target_sizes, batch, "target_sizes")
    scores, labels = logits.softmax(-1).max(-1)
    keep = kept_queries(logits, threshold)
    is_thing_list = is_thing.bool().tolist()
    categories = None if class_to_category is None else class_to_category.tolist()
    results = []
    for b in range(batch):
        queries = keep[b].nonzero().squeeze(1)
        results.append(_one_image(outputs, b, queries, scores[b, queries], labels[b, queries], processed[b],
                                  targets[b], is_thing_list, categories, merge_stuff))
    return results


def _one_image(outputs: DETROutput, b: int, queries: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               processed_size: tuple[int, int], target_size: tuple[int, int], is_thing: list[bool],
               categories: list[int] | None, merge_stuff: str) -> PanopticResult:
    device = outputs.pred_logits.device
    if queries.numel() == 0:
        return PanopticResult(id_map=torch.zeros(target_size, dtype=torch.long, device=device), segments_info=[])
    masks = _image_masks(outputs, b, queries)
    valid_h, valid_w = _valid_mask_size(tuple(masks.shape[-2:]), processed_size, outputs.input_size)
    masks = F.interpolate(masks[None, :, :valid_h, :valid_w].float(), size=processed_size, mode="bilinear",
                          align_corners=False)[0]
    label_list = labels.tolist()
    # group[k]: the segment that query k's pixels belong to -- itself, or the first kept query of its
    # stuff class (the reference relabels stuff duplicates in the first pass only; "merge" always does)
    first_of_class: dict[int, int] = {}
    group = []
    for k, label in enumerate(label_list):
        if not is_thing[label]:
            group.append(first_of_class.setdefault(label, k))
        else:
            group.append(k)
    group_tensor = torch.tensor(group, device=device)
    alive = torch.ones(len(label_list), dtype=torch.bool, device=device)
    first_pass = True
    while True:
        alive_index = alive.nonzero().squeeze(1)
        if alive_index.numel() == 0:
            id_map = torch.full(target_size, -1, dtype=torch.long, device=device)
            break
        winner = alive_index[masks[alive_index].argmax(0)]  # [h, w] query position (among kept)
        if first_pass or merge_stuff == "merge":
            winner = group_tensor[winner]
        id_map = nearest_resize_ids(winner, target_size)
        area = torch.bincount(id_map.flatten(), minlength=len(label_list))
        if merge_stuff == "merge":
            small = alive & (area[group_tensor] <= MIN_AREA)
        else:
            small = alive & (area <= MIN_AREA)
        first_pass = False
        if not bool(small.any()):
            break
        alive &= ~small
    return _segments(id_map, alive, group_tensor if merge_stuff == "merge" else None, queries, scores,
                     label_list, is_thing, categories)


def _segments(id_map: torch.Tensor, alive: torch.Tensor, group: torch.Tensor | None, queries: torch.Tensor,
              scores: torch.Tensor, labels: list[int], is_thing: list[bool], categories: list[int] | None
              ) -> PanopticResult:
    """Renumber surviving segments 1..n in query order and describe them."""
    survivors = alive.nonzero().squeeze(1)
    if group is not None:  # merged stuff: one segment per group, represented by its first query
        survivors = survivors[group[survivors] == survivors]
    lookup = torch.zeros(len(labels) + 1, dtype=torch.long, device=id_map.device)
    lookup[survivors] = torch.arange(1, survivors.numel() + 1, device=id_map.device)
    new_map = lookup[id_map]  # -1 (nothing alive) indexes the last entry: 0, void
    areas = torch.bincount(new_map.flatten(), minlength=survivors.numel() + 1).tolist()
    query_list, score_list = queries.tolist(), scores.tolist()
    segments: list[dict[str, Any]] = []
    for segment_id, k in enumerate(survivors.tolist(), start=1):
        label = labels[k]
        segments.append({"id": segment_id, "category_id": categories[label] if categories is not None else label,
                         "isthing": bool(is_thing[label]), "area": int(areas[segment_id]),
                         "score": float(score_list[k]), "query": int(query_list[k])})
    return PanopticResult(id_map=new_map, segments_info=segments)
