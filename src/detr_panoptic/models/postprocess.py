"""Panoptic post-processing: DETR predictions -> per-image segment id maps and segment lists.

Reproduces the reference algorithm (NOTES.md, "Panoptic post-processing"), quirks included, with four
fixes: segment ids start at 1 (0 is void), nothing kept gives no segments and an all-void map, in a
padded batch each image's masks are cropped to its valid region before resizing, and a query whose best
class is an index the category map does not use (117 of the official checkpoint's 250) is "no object".
Pure torch, per image, on whatever device the predictions are on.

``PanopticPostProcessor`` is the one object that turns a model's raw outputs into ``PanopticResult``s:
its settings (``PostprocessSettings``: keep threshold, stuff merge mode, minimum area) plus the
categories. ``kept_queries`` is the one kept-query rule; the processor's ``kept_queries(output)`` is
what a forward pass takes as ``mask_queries`` (masks only for the kept queries), and the same outputs
can be post-processed again with other settings (``processor.replace(threshold=...)(output)``) as long
as the new settings keep a subset of the queries whose masks were computed.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detr_panoptic.models.outputs import DETROutput, KeptQueries, PanopticResult
from detr_panoptic.models.pixel_winner import PixelWinner
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.85  # keep threshold of the reference's panoptic post-processing (and our default)
MIN_AREA = 4  # segments with area <= MIN_AREA pixels (at the target size) are dropped, as in the reference
MERGE_MODES = ("reference", "merge")
SizesLike = Sequence[Sequence[int]] | torch.Tensor


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


def valid_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int],
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


def image_masks(outputs: DETROutput, b: int, queries: torch.Tensor) -> torch.Tensor:
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


@dataclass(frozen=True, order=True)
class PostprocessSettings:
    """How kept queries become segments (the keys of a checkpoint's ``detr_panoptic.postprocess`` record).

    threshold: a query is kept when its best class is not "no object", has a category, and its
        probability is above this (reference: 0.85).
    merge_stuff: "reference" (several kept queries of one stuff class: only the first survives, its pixels
        re-assigned by argmax among the survivors) or "merge" (their pixels form one segment).
    min_area: segments of at most this many pixels (at the target size) are dropped (reference: 4).
    min_visible: a thing query that wins less than this fraction of its own mask (mask probability > 0.5)
        is dropped, like a small segment, and its pixels go to the others (0: the reference, which has no
        such rule). Duplicates of one object split its pixels, and each then wins only part of its mask.
    """

    threshold: float = DEFAULT_THRESHOLD
    merge_stuff: str = "reference"
    min_area: int = MIN_AREA
    min_visible: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise UserInputError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.merge_stuff not in MERGE_MODES:
            raise UserInputError(f"merge_stuff must be one of {', '.join(MERGE_MODES)}, got {self.merge_stuff!r}")
        if int(self.min_area) != self.min_area or int(self.min_area) < 0:
            raise UserInputError(f"min_area must be an integer >= 0, got {self.min_area}")
        if not 0.0 <= float(self.min_visible) <= 1.0:
            raise UserInputError(f"min_visible must be in [0, 1], got {self.min_visible}")

    def replace(self, **changes: Any) -> PostprocessSettings:
        """A copy with ``changes`` (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "merge_stuff": self.merge_stuff, "min_area": int(self.min_area),
                "min_visible": float(self.min_visible)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PostprocessSettings:
        """From ``as_dict``'s keys (missing keys: defaults); bad values raise ``UserInputError``."""
        try:
            return cls(**{k: t(record[k]) for k, t in (("threshold", float), ("merge_stuff", str),
                                                        ("min_area", int), ("min_visible", float))
                           if k in record})
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"malformed post-processing settings {dict(record)!r}: {exc}") from None

    def __str__(self) -> str:
        return (f"threshold {self.threshold:.2f}, merge_stuff {self.merge_stuff}, min_area {self.min_area}"
                + (f", min_visible {self.min_visible:.2f}" if self.min_visible else ""))


class PanopticPostProcessor:
    """Raw ``DETROutput`` -> one ``PanopticResult`` per image: the settings plus the categories.

    is_thing: Bool [C] per class index. class_to_category: Long [C], the ``category_id`` reported per class
    index, -1 for an unused index (default: the class index itself, every index used).
    ``for_categories(category_map, settings)`` builds one from a ``data.categories.CategoryMap``.

    Use: ``output = model(images, mask_queries=processor.kept_queries)`` (masks of the kept queries only),
    then ``processor(output, target_sizes)``. The same output can be processed again with settings that
    keep a subset of those queries (a higher threshold, any merge mode or minimum area) without a new
    forward: ``processor.replace(threshold=0.9)(output, target_sizes)``; ``sweep`` runs many settings at
    once, sharing the per-pixel work.
    """

    def __init__(self, is_thing: torch.Tensor, class_to_category: torch.Tensor | None = None,
                 settings: PostprocessSettings | None = None) -> None:
        self.settings = settings if settings is not None else PostprocessSettings()
        self.is_thing = is_thing.bool().cpu()
        self.class_to_category = None if class_to_category is None else class_to_category.long().cpu()
        if self.class_to_category is not None and self.class_to_category.numel() != self.is_thing.numel():
            raise ValueError(f"class_to_category has {self.class_to_category.numel()} entries, is_thing "
                             f"{self.is_thing.numel()}")
        self._is_thing_list = self.is_thing.tolist()
        self._categories = None if self.class_to_category is None else self.class_to_category.tolist()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_categories(cls, category_map: Any, settings: PostprocessSettings | None = None) -> PanopticPostProcessor:
        """From a ``CategoryMap`` (anything with ``is_thing()`` and ``class_to_category_tensor()``)."""
        return cls(category_map.is_thing(), category_map.class_to_category_tensor(), settings)

    def replace(self, **changes: Any) -> PanopticPostProcessor:
        """The same categories with some settings changed (``threshold=0.5`` ...; None values ignored)."""
        processor = copy.copy(self)
        processor.settings = self.settings.replace(**changes)
        return processor

    @property
    def num_classes(self) -> int:
        return int(self.is_thing.numel())

    # -- the kept-query rule ----------------------------------------------------------------------------
    def _class_to_category_on(self, device: torch.device) -> torch.Tensor | None:
        if self.class_to_category is None:
            return None
        if device not in self._on_device:
            self._on_device[device] = self.class_to_category.to(device)
        return self._on_device[device]

    def keep(self, pred_logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Bool [B, Q]: ``kept_queries`` at the settings' threshold (or ``threshold``), in float32."""
        logits = pred_logits.float()
        limit = self.settings.threshold if threshold is None else threshold
        return kept_queries(logits, limit, self._class_to_category_on(logits.device))

    def kept_queries(self, output: DETROutput) -> list[torch.Tensor]:
        """Per image, the kept query indices (Long [K]): what ``PanopticDETR.forward`` takes as ``mask_queries``."""
        return [k.nonzero().squeeze(1) for k in self.keep(output.pred_logits)]

    # -- post-processing --------------------------------------------------------------------------------
    def _sizes(self, output: DETROutput, target_sizes: SizesLike | None, processed_sizes: SizesLike | None
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        batch, _, num_classes_plus_one = output.pred_logits.shape
        if self.num_classes != num_classes_plus_one - 1:
            raise ValueError(f"is_thing has {self.num_classes} entries for {num_classes_plus_one - 1} classes")
        if processed_sizes is None:
            processed_sizes = output.image_sizes
        if processed_sizes is None:
            raise ValueError("the output carries no image_sizes: pass processed_sizes (unpadded (h, w) per image)")
        processed = _as_sizes(processed_sizes, batch, "processed_sizes")
        return processed, processed if target_sizes is None else _as_sizes(target_sizes, batch, "target_sizes")

    def __call__(self, output: DETROutput, target_sizes: SizesLike | None = None, *,
                 processed_sizes: SizesLike | None = None, winners: list[PixelWinner | None] | None = None
                 ) -> list[PanopticResult]:
        """One ``PanopticResult`` per image.

        output: pred_logits [B, Q, C+1] and pred_masks (all queries [B, Q, h4, w4], or packed with
            ``mask_queries`` covering at least the kept queries).
        target_sizes: (h, w) per image of the final id map (nearest, Pillow-exact); default: processed sizes.
        processed_sizes: (h, w) per image of the unpadded model input, to which masks are resized
            (bilinear); default: ``output.image_sizes`` (set by ``PanopticDETR.forward``).
        winners: a list the caller keeps (one entry per image, None at first) to call again on the same
            packed ``output`` with other settings: each image's masks are upsampled once, over all its
            ``mask_queries``, and the ``PixelWinner`` is reused (the results are the same bit for bit).
        Each result's ``kept`` lists the kept queries with their boxes in target-size pixels.
        """
        processed, targets = self._sizes(output, target_sizes, processed_sizes)
        logits = output.pred_logits.float()
        scores, labels = logits.softmax(-1).max(-1)
        keep = self.keep(logits)
        class_to_category = self._class_to_category_on(logits.device)
        results = []
        for b in range(logits.shape[0]):
            queries = keep[b].nonzero().squeeze(1)
            if queries.numel() == 0:
                result = PanopticResult(id_map=torch.zeros(targets[b], dtype=torch.long, device=logits.device),
                                        segments_info=[])
            else:
                winner, positions = self._winner(output, b, queries, processed[b], winners)
                result = self._assign(winner, positions, queries, scores[b], labels[b], targets[b], self.settings)
            result.kept = kept_with_boxes(output.pred_boxes[b, queries], queries, labels[b, queries],
                                          scores[b, queries], class_to_category, targets[b])
            results.append(result)
        return results

    @staticmethod
    def _winner(output: DETROutput, b: int, queries: torch.Tensor, processed: tuple[int, int],
                winners: list[PixelWinner | None] | None) -> tuple[PixelWinner, torch.Tensor]:
        """Image b's ``PixelWinner`` and the channels of ``queries`` in it: over the kept queries alone, or
        (``winners`` given, packed masks) over every query with a mask, cached in ``winners[b]``."""
        if winners is None or output.mask_queries is None:
            return PixelWinner(upsampled_masks(output, b, queries, processed)), torch.arange(queries.numel(),
                                                                                           device=queries.device)
        if len(winners) != len(output.mask_queries):
            raise ValueError(f"winners has {len(winners)} entries for {len(output.mask_queries)} images")
        channels = output.mask_queries[b].to(queries.device)
        match = channels[None, :] == queries[:, None]  # [K, M]
        if not bool(match.any(1).all()):
            raise ValueError(f"image {b}: masks of kept queries {queries[~match.any(1)].tolist()} were not computed "
                             f"(mask_queries)")
        if winners[b] is None:
            winners[b] = PixelWinner(upsampled_masks(output, b, channels, processed))
        return winners[b], match.float().argmax(1)  # type: ignore[return-value]

    def _assign(self, winner: PixelWinner, positions: torch.Tensor, queries: torch.Tensor, scores: torch.Tensor,
                labels: torch.Tensor, target_size: tuple[int, int], settings: PostprocessSettings) -> PanopticResult:
        return assign_segments(winner, positions, queries, scores[queries], labels[queries], target_size,
                               self._is_thing_list, self._categories, settings.merge_stuff, settings.min_area,
                               float(settings.min_visible))

    def sweep(self, output: DETROutput, grid: Sequence[PostprocessSettings], target_sizes: SizesLike | None = None,
              *, processed_sizes: SizesLike | None = None) -> Iterator[list[tuple[list[PostprocessSettings],
                                                                                     PanopticResult]]]:
        """Per image, every setting of ``grid`` at once: ``[(settings that give this result, result), ...]``.

        Each result equals ``self.replace(**setting.as_dict())(output)``'s (without ``kept``). The masks are
        upsampled once per image and one ``PixelWinner`` answers every setting; settings that give the same
        input (thresholds keeping the same queries; both merge modes when no stuff class is kept twice) share
        one run. ``output``'s masks must cover the queries kept at the grid's lowest threshold.
        """
        processed, targets = self._sizes(output, target_sizes, processed_sizes)
        logits = output.pred_logits.float()
        scores, labels = logits.softmax(-1).max(-1)
        keeps = {t: self.keep(logits, t) for t in sorted({s.threshold for s in grid})}
        lowest = next(iter(keeps.values()))
        for b in range(logits.shape[0]):
            selected = lowest[b].nonzero().squeeze(1)
            groups: dict[tuple, list[PostprocessSettings]] = {}
            for setting in grid:
                kept = keeps[setting.threshold][b].nonzero().squeeze(1)
                mode = setting.merge_stuff
                if mode == "merge" and not self._repeats_stuff(labels[b, kept]):
                    mode = "reference"  # without a stuff class kept twice the two modes give the same result
                groups.setdefault((tuple(kept.tolist()), mode, setting.min_area, setting.min_visible), []).append(setting)
            winner = PixelWinner(upsampled_masks(output, b, selected, processed[b])) if len(selected) else None
            results = []
            for (kept_tuple, mode, min_area, min_visible), group in groups.items():
                kept = torch.tensor(kept_tuple, dtype=torch.long, device=selected.device)
                if winner is None or not kept.numel():
                    result = PanopticResult(id_map=torch.zeros(targets[b], dtype=torch.long), segments_info=[])
                else:
                    result = self._assign(winner, torch.searchsorted(selected, kept), kept, scores[b], labels[b],
                                          targets[b], PostprocessSettings(group[0].threshold, mode, min_area,
                                                                          min_visible))
                results.append((group, result))
            yield results

    def _repeats_stuff(self, labels: torch.Tensor) -> bool:
        stuff = [label for label in labels.tolist() if not self._is_thing_list[label]]
        return len(stuff) != len(set(stuff))


def panoptic_postprocess(outputs: DETROutput, processed_sizes: SizesLike, target_sizes: SizesLike | None = None, *,
                         is_thing: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, merge_stuff: str = "reference",
                         class_to_category: torch.Tensor | None = None, min_area: int = MIN_AREA
                         ) -> list[PanopticResult]:
    """``PanopticPostProcessor`` as one function call (the reference's ``PostProcessPanoptic`` signature):
    ``PanopticPostProcessor(is_thing, class_to_category, PostprocessSettings(threshold, merge_stuff,
    min_area))(outputs, target_sizes, processed_sizes=processed_sizes)``."""
    processor = PanopticPostProcessor(is_thing, class_to_category, PostprocessSettings(threshold, merge_stuff, min_area))
    return processor(outputs, target_sizes, processed_sizes=processed_sizes)


def kept_with_boxes(boxes: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    class_to_category: torch.Tensor | None, target_size: tuple[int, int]) -> KeptQueries:
    """``KeptQueries`` of one image: ``boxes`` [K, 4] normalised cxcywh -> xyxy pixels of ``target_size``."""
    height, width = target_size
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    category_ids = labels if class_to_category is None else class_to_category.to(labels.device)[labels]
    return KeptQueries(indices=queries, labels=labels, category_ids=category_ids, scores=scores.float(),
                       boxes=xyxy)


def upsampled_masks(outputs: DETROutput, b: int, queries: torch.Tensor,
                    processed_size: tuple[int, int]) -> torch.Tensor:
    """Float [K, h, w]: image b's mask logits of ``queries``, cropped to the unpadded image and resized
    (bilinear) to ``processed_size``. Each query's map depends on its own logits only, so the maps of a
    subset of queries are exactly the rows of this tensor."""
    masks = image_masks(outputs, b, queries)
    valid_h, valid_w = valid_mask_size(tuple(masks.shape[-2:]), processed_size, outputs.input_size)
    return F.interpolate(masks[None, :, :valid_h, :valid_w].float(), size=processed_size, mode="bilinear",
                         align_corners=False)[0]


def assign_segments(winner: PixelWinner, positions: torch.Tensor, queries: torch.Tensor, scores: torch.Tensor,
                    labels: torch.Tensor, target_size: tuple[int, int], is_thing: list[bool],
                    categories: list[int] | None, merge_stuff: str, min_area: int,
                    min_visible: float = 0.0) -> PanopticResult:
    """The reference's pixel assignment for the kept ``queries`` (with ``scores``, ``labels``), whose
    upsampled masks are the channels ``positions`` (Long [K]) of ``winner``'s masks: argmax, stuff
    duplicates grouped, segments of at most ``min_area`` pixels at ``target_size`` dropped and argmax run
    again among the rest, until none is small. ``min_visible`` > 0 (not the reference) also drops, in the
    same loop, a thing query that wins less than this fraction of its own mask's pixels (mask probability
    > 0.5, at the processed size): a duplicate or a mostly hidden detection."""
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
    if min_visible > 0:
        things = torch.tensor([is_thing[label] for label in label_list], dtype=torch.bool, device=device)
        own_area = winner.positive_areas().index_select(0, positions)
    first_pass = True
    while True:
        if not bool(alive.any()):
            id_map = torch.full(target_size, -1, dtype=torch.long, device=device)
            break
        channels.zero_()
        channels[positions[alive]] = True
        chosen = to_kept[winner(channels)]  # [h, w] position among the kept queries
        hidden = None
        if min_visible > 0:
            won = torch.bincount(chosen.flatten(), minlength=len(label_list))
            hidden = alive & things & (won < min_visible * own_area)
        if first_pass or merge_stuff == "merge":
            chosen = group_tensor[chosen]
        id_map = nearest_resize_ids(chosen, target_size)
        area = torch.bincount(id_map.flatten(), minlength=len(label_list))
        if merge_stuff == "merge":
            small = alive & (area[group_tensor] <= min_area)
        else:
            small = alive & (area <= min_area)
        if hidden is not None:
            small |= hidden
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
