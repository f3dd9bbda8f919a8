"""``PredictorSettings``: what a predictor needs beyond the weights, restored from the checkpoint.

Hugging Face carries ``id2label`` in a model's config; we carry a small frozen object: the category map
(class index -> category), the input resize the model was trained with, and the post-processing
settings (keep threshold, stuff merge mode, minimum segment area; written into the checkpoint by
``calibrate``). Explicit arguments win over the checkpoint, which wins over DETR's defaults.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.models.postprocess import (
    DEFAULT_THRESHOLD,
    MERGE_MODES,
    MIN_AREA,
    PanopticPostProcessor,
    PostprocessSettings,
)
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333
POSTPROCESS_KEYS = ("threshold", "merge_stuff", "min_area", "min_visible")


@dataclass(frozen=True)
class PredictorSettings:
    """How images become panoptic results with one model.

    category_map: class index <-> category (``is_thing``, the reported ``category_id``).
    min_size / max_size: inputs are resized to a shorter side of ``min_size``, the longer at most
        ``max_size`` (DETR's rule, ``data.transforms.detr_resize_size``).
    threshold: a query is kept when its best class is not "no object", has a category, and scores above this.
    merge_stuff: ``"reference"`` or ``"merge"`` (``models.postprocess.PostprocessSettings``).
    min_area: segments of at most this many pixels are dropped (reference: 4).
    min_visible: thing queries winning less than this fraction of their own mask are dropped (reference: 0,
        no such rule; ``models.postprocess.PostprocessSettings``).
    """

    category_map: CategoryMap
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int | None = DEFAULT_MAX_SIZE
    threshold: float = DEFAULT_THRESHOLD
    merge_stuff: str = "reference"
    min_area: int = MIN_AREA
    min_visible: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.category_map, CategoryMap):
            raise UserInputError(f"category_map must be a CategoryMap, got {type(self.category_map).__name__}")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise UserInputError(f"threshold must be in [0, 1), got {self.threshold}")
        if int(self.min_size) < 1:
            raise UserInputError(f"size must be a positive number of pixels, got {self.min_size}")
        if self.max_size is not None and int(self.max_size) < int(self.min_size):
            raise UserInputError(f"max size {self.max_size} is smaller than size {self.min_size}")
        if self.merge_stuff not in MERGE_MODES:
            raise UserInputError(f"merge_stuff must be one of {', '.join(MERGE_MODES)}, got {self.merge_stuff!r}")
        if int(self.min_area) < 0:
            raise UserInputError(f"min_area must be >= 0, got {self.min_area}")
        if not 0.0 <= float(self.min_visible) <= 1.0:
            raise UserInputError(f"min_visible must be in [0, 1], got {self.min_visible}")

    def replace(self, **changes: Any) -> PredictorSettings:
        """A copy with ``changes`` (None values are ignored, so optional flags pass straight through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def postprocess(self) -> PostprocessSettings:
        """The post-processing part (threshold, merge_stuff, min_area, min_visible)."""
        return PostprocessSettings(float(self.threshold), self.merge_stuff, int(self.min_area), float(self.min_visible))

    def postprocessor(self) -> PanopticPostProcessor:
        """The ``PanopticPostProcessor`` of these settings and categories."""
        return PanopticPostProcessor.for_categories(self.category_map, self.postprocess)

    def postprocess_metadata(self) -> dict[str, Any]:
        """The post-processing part, as stored in a checkpoint's ``detr_panoptic.postprocess``."""
        return self.postprocess.as_dict()

    def input_size_metadata(self) -> dict[str, int | None]:
        return {"min_size": int(self.min_size), "max_size": self.max_size}

    @classmethod
    def from_checkpoint(cls, *, category_map: CategoryMap | None, input_size: tuple[int, int] | None,
                        postprocess: Mapping[str, Any] | None, source: str, threshold: float | None = None,
                        min_size: int | None = None, max_size: int | None = None,
                        merge_stuff: str | None = None, min_area: int | None = None,
                        min_visible: float | None = None) -> PredictorSettings:
        """Settings from what a checkpoint records (``checkpoints.Pretrained``), explicit values first.

        Logs where the input size and the threshold come from (the checkpoint's training size and
        calibrated post-processing are easy to forget, and they change results a lot).
        """
        if category_map is None:
            raise UserInputError(f"{source}: the checkpoint carries no categories (not one of ours, and not "
                                 f"the official 250-class layout); pass a category map to the predictor")
        saved = _checked_postprocess(postprocess, source)
        values: dict[str, Any] = {"category_map": category_map}
        recorded_size = input_size or (DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)
        values["min_size"] = min_size if min_size is not None else recorded_size[0]
        values["max_size"] = max_size if max_size is not None else recorded_size[1]
        if min_size is None or max_size is None:
            log.info("input images resized to a shorter side of %s, longer at most %s (%s)", values["min_size"],
                     values["max_size"], "the checkpoint's training size" if input_size else "DETR's default")
        for key, given in (("threshold", threshold), ("merge_stuff", merge_stuff), ("min_area", min_area),
                           ("min_visible", min_visible)):
            if given is not None:
                values[key] = given
            elif key in saved:
                values[key] = saved[key]
        if threshold is None and "threshold" in saved:
            log.info("post-processing from the checkpoint's calibration: threshold %.2f, merge_stuff %s, "
                     "min_area %d, min_visible %.2f (an explicit --threshold wins)", saved["threshold"],
                     values.get("merge_stuff", "reference"), values.get("min_area", MIN_AREA),
                     values.get("min_visible", 0.0))
        return cls(**values)


def _checked_postprocess(postprocess: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """The usable keys of a checkpoint's ``postprocess`` record; a malformed one is ignored (logged)."""
    if not postprocess:
        return {}
    try:
        out = {}
        if "threshold" in postprocess:
            out["threshold"] = float(postprocess["threshold"])
        if "merge_stuff" in postprocess:
            out["merge_stuff"] = str(postprocess["merge_stuff"])
        if "min_area" in postprocess:
            out["min_area"] = int(postprocess["min_area"])
        if "min_visible" in postprocess:
            out["min_visible"] = float(postprocess["min_visible"])
        if not 0.0 <= out.get("threshold", 0.5) < 1.0 or out.get("min_area", 0) < 0 \
                or not 0.0 <= out.get("min_visible", 0.0) <= 1.0 \
                or out.get("merge_stuff", "reference") not in MERGE_MODES:
            raise ValueError("a value is out of range")
        return out
    except (TypeError, ValueError) as exc:
        log.warning("%s: ignoring malformed post-processing settings %r (%s)", source, dict(postprocess), exc)
        return {}
