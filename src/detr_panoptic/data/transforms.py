"""Image + panoptic id-map transforms with torchvision.transforms.v2 and tv_tensors.

A sample travels through the transforms as ``(image, id_map, boxes)``:

* ``image``: ``tv_tensors.Image`` uint8 ``[3, H, W]``;
* ``id_map``: ``tv_tensors.Mask`` int32 ``[1, H, W]`` holding the panoptic segment ids (0 = void).
  One id map instead of N binary masks: nearest resizing / flipping / cropping an id map and then
  comparing with each id gives exactly the per-mask results, at a fraction of the cost;
* ``boxes``: ``tv_tensors.BoundingBoxes`` (XYXY, pixels) of the segments, moved along with the image.

Two pipelines (``make_transforms``):

* default, the reference fast path: resize the shorter side to ``min_size`` with the longer side at
  most ``max_size`` (DETR's ``get_size`` rounding, see ``detr_resize_size``), then float + ImageNet
  normalisation;
* ``augment=True``, DETR's training augmentation: horizontal flip (p=0.5), then with p=0.5 either a
  multi-scale resize (shorter side in 480..800 step 32, longer <= 1333, scaled by ``min_size/800``)
  or resize to 400/500/600 -> random crop (384..600) -> multi-scale resize.

``targets_from_id_map`` then turns the transformed id map into the target's ``masks`` / ``boxes`` /
``area``; segments that a crop emptied are dropped. Randomness comes from torch's RNG, so DataLoader
worker seeding applies.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DETR's training scales for min_size 800.
DETR_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))


def detr_resize_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) of DETR's ``get_size_with_aspect_ratio``: shorter side ``size``, longer <= ``max_size``.

    Same arithmetic and rounding as the reference (``int(round(...))`` when the longer side would
    exceed ``max_size``, ``int(...)`` truncation for the longer side).
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = round(max_size * short / long)  # Python rounding (half to even), as the reference
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _choice(values: Sequence[Any]) -> Any:
    return values[int(torch.randint(len(values), ()).item())]


class RandomShorterSideResize(v2.Transform):
    """Resize so that the shorter side is one of ``sizes`` (uniform choice), longer <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, antialias: bool = True) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"size": list(detr_resize_size(height, width, _choice(self.sizes), self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=self.antialias)


class RandomSizeCrop(v2.Transform):
    """DETR's ``RandomSizeCrop``: a crop of random size in [min_size, max_size] per side, random place.

    Sides shorter than ``min_size`` are kept whole (the reference would fail on such images).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()).item())
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()).item())
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


_MEAN_255 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1) * 255.0
_SCALE_255 = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1) * 255.0)


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` (or float in 0..1) -> float32 normalised with ImageNet mean/std, in one pass."""
    image = image.as_subclass(torch.Tensor)
    out = image.to(torch.float32) if image.dtype == torch.uint8 else image.to(torch.float32) * 255.0
    return out.sub_(_MEAN_255.to(out.device)).mul_(_SCALE_255.to(out.device))


def resize_for_model(image: torch.Tensor, min_size: int, max_size: int | None) -> torch.Tensor:
    """``[3, H, W]`` resized to DETR's evaluation size (``detr_resize_size``), antialiased."""
    height, width = image.shape[-2:]
    return F.resize(image, list(detr_resize_size(height, width, min_size, max_size)), antialias=True)


def preprocess_image(image: torch.Tensor, min_size: int, max_size: int | None) -> torch.Tensor:
    """The evaluation transform of one image: ``resize_for_model`` then ``normalize_image``.

    ``make_transforms(augment=False)`` (the dataset's evaluation transform) runs the same two kernels on
    the image, and ``inference.preprocess`` calls this, so training validation, ``evaluate`` and
    ``predict`` feed the model the same tensors for the same image file.
    """
    return normalize_image(resize_for_model(image, min_size, max_size))


class NormalizeImage(v2.Transform):
    """uint8 image -> float32 normalised with ImageNet mean/std (``normalize_image``); other inputs untouched."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return tv_tensors.Image(normalize_image(inpt))


def make_transforms(*, min_size: int = 800, max_size: int | None = 1333, augment: bool = False,
                    normalize: bool = True) -> v2.Compose:
    """The reference fast path (default) or DETR's training augmentation (``augment=True``).

    Scales of the augmentation follow DETR's (480..800 step 32; crop branch 400/500/600 then
    RandomSizeCrop(384, 600)) multiplied by ``min_size / 800``.
    """
    steps: list[v2.Transform] = []
    if augment:
        factor = min_size / 800.0
        scales = sorted({max(1, round(s * factor)) for s in DETR_SCALES})
        crop_branch = v2.Compose([
            RandomShorterSideResize([max(1, round(s * factor)) for s in (400, 500, 600)]),
            RandomSizeCrop(max(1, round(384 * factor)), max(1, round(600 * factor))),
            RandomShorterSideResize(scales, max_size),
        ])
        steps += [v2.RandomHorizontalFlip(0.5),
                  v2.RandomChoice([RandomShorterSideResize(scales, max_size), crop_branch])]
    else:
        steps.append(RandomShorterSideResize([min_size], max_size))
    if normalize:
        steps.append(NormalizeImage())
    return v2.Compose(steps)


ID_LIMIT = 1 << 24  # panoptic PNG ids are R + 256 G + 256^2 B < 2^24


def compact_id_map(id_map: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """``[H, W]`` map of 1 + the index of each pixel's id in ``segment_ids`` (0 where it is none of them).

    One gather through a lookup table over all 2^24 possible ids; ``np.zeros`` allocates it lazily,
    so only the memory pages of the ids in play are ever touched. uint8 output below 255 segments.
    """
    segment_ids = np.asarray(segment_ids, dtype=np.int64)
    dtype = np.uint8 if segment_ids.size < 255 else np.int32
    if segment_ids.size == 0:
        return np.zeros(id_map.shape, dtype)
    if len(np.unique(segment_ids)) != segment_ids.size:
        raise ValueError(f"duplicate segment ids {segment_ids.tolist()}")
    if id_map.size and (int(id_map.min()) < 0 or int(id_map.max()) >= ID_LIMIT):
        raise ValueError(f"ids must lie in [0, 2^24), got {int(id_map.min())}..{int(id_map.max())}")
    lut = np.zeros(ID_LIMIT, dtype)
    valid = (segment_ids >= 0) & (segment_ids < ID_LIMIT)  # others cannot occur in the map
    lut[segment_ids[valid]] = (np.flatnonzero(valid) + 1).astype(dtype)
    return lut[id_map]


def targets_from_id_map(id_map: torch.Tensor, segment_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks, boxes and areas of ``segment_ids`` in an id map ``[H, W]`` (or ``[1, H, W]``).

    Returns ``keep`` (Bool [N]: the segment still has pixels), and for the kept segments ``masks``
    (Bool [K, H, W]), ``boxes`` (Float [K, 4] normalised cxcywh, from the mask's pixel extent as
    DETR's ``masks_to_boxes``: x1, y1 are the last pixel's indices) and ``area`` (Float [K], pixels).
    """
    ids = id_map.as_subclass(torch.Tensor).reshape(id_map.shape[-2:]).numpy()
    height, width = ids.shape
    compact = compact_id_map(ids, segment_ids.numpy())
    area = np.bincount(compact.ravel(), minlength=int(segment_ids.numel()) + 1)[1:]
    keep = area > 0
    # numpy's vectorised comparisons are much faster than torch's for this broadcast on CPU.
    kept_index = (np.flatnonzero(keep) + 1).astype(compact.dtype)
    masks = compact[None] == kept_index[:, None, None]
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    if masks.shape[0]:
        rows, cols = masks.any(axis=2), masks.any(axis=1)  # [K, H], [K, W]
        y0, y1 = rows.argmax(1), height - 1 - rows[:, ::-1].argmax(1)
        x0, x1 = cols.argmax(1), width - 1 - cols[:, ::-1].argmax(1)
        boxes = np.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                          (x1 - x0) / width, (y1 - y0) / height], 1).astype(np.float32)
    masks = torch.from_numpy(masks)
    return {"keep": torch.from_numpy(keep), "masks": masks, "boxes": torch.from_numpy(boxes),
            "area": torch.from_numpy(area[keep].astype(np.float32))}
