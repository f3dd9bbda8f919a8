"""Panoptic post-processing: DETR predictions -> per-image segment id maps and segment lists.

Reproduces the reference algorithm (NOTES.md, "Panoptic post-processing"), quirks included, with four
fixes: segment ids start at 1 (0 is void), nothing kept gives no segments and an all-void map, in a
padded batch each image's masks are cropped to its valid region before resizing, and a query whose best
class is an index the category map does not use (117 of the official checkpoint's 250) is "no object".
Pure torch, per image, on whatever device the predictions are on.

``kept_queries`` is the one kept-query rule: post-processing, the predictor (which computes masks only
for kept queries), the attention figures and the mask grid all call it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detr_panoptic.models.outputs import DETROutput, KeptQueries, PanopticResult

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.85  # keep threshold of the reference's panoptic post-processing (and our default)
MIN_AREA = 4  # segments with area <= MIN_AREA pixels (at the target size) are dropped, as in the reference
MERGE_MODES = ("reference", "merge")


def kept_queries(pred_logits: torch.Tensor, threshold: float,
                 class_to_category: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, Q]: the best class (softmax over C+1) is not "no object", its probability > threshold, and
    (with ``class_to_category``, Long [C], -1 for unused class indices) the class has a category.

    A query whose best class is unused (the official checkpoint's 250 indices hold COCO's 133 categories)
    is treated as "no object", as if it had not been kept.
    """
    scores, labels = pred_logits.softmax(-1).max(-1)
    no_object = pred_logits.shape[-1] - 1
    keep = (labels != no_object) & (scores > threshold)
    if class_to_category is not None:
        used = class_to_category.to(labels.device)[labels.clamp(max=no_object - 1)] >= 0
        if log.isEnabledFor(logging.DEBUG) and bool((keep & ~used).any()):
            log.debug("%d quer(ies) above the threshold predict class indices without a category %s: "
                      "treated as no object", int((keep & ~used).sum()), sorted(set(labels[keep & ~used].tolist())))
        keep &= used
    return keep


def _as_sizes(sizes: Sequence[Sequence[int]] | torch.Tensor, batch: int, what: str) -> list[tuple[int, int]]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    out = [(int(s[0]), int(s[1])) for s in sizes]
    if len(out) != batch:
        raise ValueError(f"{what}: expected {batch} (h, w) pairs, got {len(out)}")
    return out


def pillow_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel under Pillow's NEAREST resize, bit-exact.

    Pillow starts at half a step (``step = size_in / size_out`` in double precision) and adds the step
    once per output pixel, truncating each sum. The accumulated rounding differs from the closed form
    ``floor((i + 0.5) * step)`` where a sample lands on a pixel border (128 -> 250 rows: 1,250 pixels of a
    128x192 -> 250x390 map). ``np.cumsum`` adds sequentially in float64, as Pillow's loop does.
    """
    step = size_in / size_out
    steps = np.full(size_out, step, dtype=np.float64)
    steps[0] = step * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), size_in - 1)


def nearest_resize_ids(id_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an integer map [h, w] exactly as Pillow's ``Image.resize(..., NEAREST)`` would."""
    h, w = id_map.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return id_map
    rows = torch.from_numpy(pillow_nearest_indices(h, out_h)).to(id_map.device)
    cols = torch.from_numpy(pillow_nearest_indices(w, out_w)).to(id_map.device)
    return id_map.index_select(0, rows).index_select(1, cols)


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
                         is_thing: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, merge_stuff: str = "reference",
                         class_to_category: torch.Tensor | None = None, min_area: int = MIN_AREA
                         ) -> list[PanopticResult]:
    """One ``PanopticResult`` per image.

    outputs: ``DETROutput`` with pred_logits [B, Q, C+1] and pred_masks (all queries [B, Q, h4, w4], or
        packed with ``mask_queries`` covering at least the kept queries).
    processed_sizes: (h, w) per image of the unpadded model input; masks are resized to it (bilinear).
    target_sizes: (h, w) per image of the final id map (nearest); default: processed_sizes.
    is_thing: Bool [C] per class index. class_to_category: Long [C], the ``category_id`` reported per
        class index (default: the class index itself).
    merge_stuff: "reference" (several kept queries of one stuff class: only the first survives, its
        pixels re-assigned by argmax among the survivors) or "merge" (their pixels form one segment).
    min_area: segments of at most this many pixels (at the target size) are dropped (reference: 4).
    Each result's ``kept`` lists the kept queries with their boxes in target-size pixels.
    """
    if merge_stuff not in MERGE_MODES:
        raise ValueError(f"merge_stuff must be one of {MERGE_MODES}, got {merge_stuff!r}")
    logits = outputs.pred_logits
    batch, _, num_classes_plus_one = logits.shape
    if is_thing.numel() != num_classes_plus_one - 1:
        raise ValueError(f"is_thing has {is_thing.numel()} entries for {num_classes_plus_one - 1} classes")
    processed = _as_sizes(processed_sizes, batch, "processed_sizes")
    targets = processed if target_sizes is None else _as_sizes(target_sizes, batch, "target_sizes")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    scores, labels = logits.softmax(-1).max(-1)
    keep = kept_queries(logits, threshold, class_to_category)
    is_thing_list = is_thing.bool().tolist()
    categories = None if class_to_category is None else class_to_category.tolist()
    results = []
    for b in range(batch):
        queries = keep[b].nonzero().squeeze(1)
        result = _one_image(outputs, b, queries, scores[b, queries], labels[b, queries], processed[b],
                            targets[b], is_thing_list, categories, merge_stuff, min_area)
        result.kept = _kept(outputs.pred_boxes[b, queries], queries, labels[b, queries], scores[b, queries],
                            class_to_category, targets[b])
        results.append(result)
    return results


def _kept(boxes: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
          class_to_category: torch.Tensor | None, target_size: tuple[int, int]) -> KeptQueries:
    height, width = target_size
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    category_ids = labels if class_to_category is None else class_to_category.to(labels.device)[labels]
    return KeptQueries(indices=queries, labels=labels, category_ids=category_ids, scores=scores.float(),
                       boxes=xyxy)


def _one_image(outputs: DETROutput, b: int, queries: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               processed_size: tuple[int, int], target_size: tuple[int, int], is_thing: list[bool],
               categories: list[int] | None, merge_stuff: str, min_area: int) -> PanopticResult:
    device = outputs.pred_logits.device
    if queries.numel() == 0:
        return PanopticResult(id_map=torch.zeros(target_size, dtype=torch.long, device=device), segments_info=[])
    winner = PixelWinner(upsampled_masks(outputs, b, queries, processed_size))
    return assign_segments(winner, torch.arange(queries.numel(), device=device), queries, scores, labels,
                           target_size, is_thing, categories, merge_stuff, min_area)


def upsampled_masks(outputs: DETROutput, b: int, queries: torch.Tensor,
                    processed_size: tuple[int, int]) -> torch.Tensor:
    """Float [K, h, w]: image b's mask logits of ``queries``, cropped to the unpadded image and resized
    (bilinear) to ``processed_size``. Each query's map depends on its own logits only, so the maps of a
    subset of queries are exactly the rows of this tensor."""
    masks = _image_masks(outputs, b, queries)
    valid_h, valid_w = _valid_mask_size(tuple(masks.shape[-2:]), processed_size, outputs.input_size)
    return F.interpolate(masks[None, :, :valid_h, :valid_w].float(), size=processed_size, mode="bilinear",
                         align_corners=False)[0]


class PixelWinner:
    """Per pixel, the first channel with the highest value (``torch.argmax(0)``, bit for bit) among a
    subset of the channels of ``masks`` [K, h, w].

    Post-processing asks for shrinking subsets (small segments dropped and argmax run again; and, in a
    calibration sweep, the queries kept at ever higher thresholds): when the subset is inside one asked
    for before, only the pixels whose winner left are recomputed. (The first highest channel of a set
    that is still in a subset is the first highest of the subset.) A full pass is a running maximum over
    the channels, several times faster on the CPU than ``argmax`` over the leading dimension.
    """

    CACHED = 4  # answers kept for reuse

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # (subset Bool [K], winner Long [h, w])

    def __call__(self, subset: torch.Tensor) -> torch.Tensor:
        """Long [h, w]: the winning channel (index into the K channels) among ``subset`` (Bool [K], not empty)."""
        subset = subset.to(torch.bool)
        count = int(subset.sum())
        if count == 0:
            raise ValueError("PixelWinner needs at least one channel")
        base = None
        for entry in self._cache:  # the smallest cached superset
            if bool((entry[0] | subset).eq(entry[0]).all()) and (base is None or entry[0].sum() < base[0].sum()):
                base = entry
        if base is not None and bool(base[0].eq(subset).all()):
            return base[1]
        if base is not None:
            winner = base[1].clone()
            flat = winner.view(-1)
            lost = (~subset[flat]).nonzero().squeeze(1)
            if lost.numel():
                channels = subset.nonzero().squeeze(1)
                # the lost pixels' columns first, then the subset's rows: never a copy of whole maps
                values = self.masks.reshape(self.masks.shape[0], -1).index_select(1, lost).index_select(0, channels)
                flat[lost] = channels[_first_max(values)]
        else:
            winner = _running_argmax(self.masks, subset.nonzero().squeeze(1))
        self._cache.append((subset.clone(), winner))
        del self._cache[:-self.CACHED]
        return winner


def _first_max(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` for [k, n]."""
    return _running_argmax(values, torch.arange(values.shape[0], device=values.device))


def _running_argmax(masks: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``masks[channels].argmax(0)`` mapped back to channel indices, by a running maximum (strictly greater
    replaces, so the first of equal maxima wins, as argmax). NaN (never produced by a finite model) falls
    back to ``argmax``, which treats it as the maximum."""
    order = channels.tolist()
    best = masks[order[0]].clone()
    winner = torch.full(best.shape, order[0], dtype=torch.long, device=masks.device)
    better = torch.empty(best.shape, dtype=torch.bool, device=masks.device)
    for channel in order[1:]:
        torch.gt(masks[channel], best, out=better)
        torch.maximum(best, masks[channel], out=best)
        winner.masked_fill_(better, channel)
    if bool(best.isnan().any()):
        return channels[masks[channels].argmax(0)]
    return winner


def assign_segments(winner: PixelWinner, positions: torch.Tensor, queries: torch.Tensor, scores: torch.Tensor,
                    labels: torch.Tensor, target_size: tuple[int, int], is_thing: list[bool],
                    categories: list[int] | None, merge_stuff: str, min_area: int) -> PanopticResult:
    """The reference's pixel assignment for the kept ``queries`` (with ``scores``, ``labels``), whose
    upsampled masks are the channels ``positions`` (Long [K]) of ``winner``'s masks: argmax, stuff
    duplicates grouped, segments of at most ``min_area`` pixels at ``target_size`` dropped and argmax run
    again among the rest, until none is small."""
    device = positions.device
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
    # kept query k <- channel positions[k]; channel -> k (channels outside ``positions`` are never chosen)
    to_kept = torch.full((int(positions.max()) + 1,), -1, dtype=torch.long, device=device)
    to_kept[positions] = torch.arange(positions.numel(), device=device)
    channels = torch.zeros(winner.masks.shape[0], dtype=torch.bool, device=device)
    alive = torch.ones(len(label_list), dtype=torch.bool, device=device)
    first_pass = True
    while True:
        if not bool(alive.any()):
            id_map = torch.full(target_size, -1, dtype=torch.long, device=device)
            break
        channels.zero_()
        channels[positions[alive]] = True
        chosen = to_kept[winner(channels)]  # [h, w] position among the kept queries
        if first_pass or merge_stuff == "merge":
            chosen = group_tensor[chosen]
        id_map = nearest_resize_ids(chosen, target_size)
        area = torch.bincount(id_map.flatten(), minlength=len(label_list))
        if merge_stuff == "merge":
            small = alive & (area[group_tensor] <= min_area)
        else:
            small = alive & (area <= min_area)
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
