"""Transforms: DETR's resize rounding, and boxes/masks that move consistently with the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from detr_panoptic.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomShorterSideResize,
    RandomSizeCrop,
    compact_id_map,
    detr_resize_size,
    make_transforms,
    targets_from_id_map,
)


@pytest.mark.parametrize("hw, size, max_size, expected", [
    ((1024, 2048), 800, 1333, (666, 1332)),    # round(666.5) -> 666 (Python's round), then int(666 * 2)
    ((1024, 2048), 800, 1600, (800, 1600)),
    ((427, 640), 800, 1333, (800, 1199)),      # int() truncates the longer side
    ((640, 427), 800, 1333, (1199, 800)),
    ((100, 1000), 800, 1333, (133, 1330)),
    ((800, 1000), 800, 1333, (800, 1000)),     # already the right size: unchanged
    ((360, 640), 480, None, (480, 853)),
])
def test_detr_resize_size(hw: tuple[int, int], size: int, max_size: int | None, expected: tuple[int, int]) -> None:
    assert detr_resize_size(*hw, size, max_size) == expected


def sample(height: int = 60, width: int = 90) -> tuple[tv_tensors.Image, tv_tensors.Mask, torch.Tensor]:
    ids = torch.zeros((height, width), dtype=torch.int32)
    ids[5:20, 10:40] = 1001
    ids[30:55, 50:85] = 2002
    ids[40:45, 2:8] = 7
    ids[20:, :] = torch.where(ids[20:, :] == 0, torch.tensor(9, dtype=torch.int32), ids[20:, :])
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(ids[None]), torch.tensor([1001, 2002, 7, 9])


def expected_boxes(masks: torch.Tensor) -> torch.Tensor:
    h, w = masks.shape[-2:]
    xyxy = masks_to_boxes(masks)
    cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                          xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
    return cxcywh / torch.tensor([w, h, w, h])


def test_targets_from_id_map_matches_masks_to_boxes() -> None:
    _, ids, segment_ids = sample()
    parts = targets_from_id_map(ids, torch.tensor([1001, 2002, 7, 9, 5555]))
    assert parts["keep"].tolist() == [True, True, True, True, False]
    masks = parts["masks"]
    assert masks.dtype == torch.bool and masks.shape == (4, 60, 90)
    for mask, sid in zip(masks, segment_ids):
        assert torch.equal(mask, ids[0] == sid)
    torch.testing.assert_close(parts["boxes"], expected_boxes(masks))
    assert parts["area"].tolist() == [float((ids[0] == s).sum()) for s in segment_ids]


def test_targets_empty() -> None:
    parts = targets_from_id_map(torch.zeros((1, 8, 8), dtype=torch.int32), torch.zeros(0, dtype=torch.int64))
    assert parts["masks"].shape == (0, 8, 8) and parts["boxes"].shape == (0, 4) and parts["area"].shape == (0,)


def test_compact_id_map_large_coco_ids() -> None:
    rng = np.random.default_rng(0)
    segment_ids = rng.choice(2 ** 24, 40, replace=False)
    ids = rng.choice(np.concatenate([segment_ids, [0, 123]]), (30, 40)).astype(np.int32)
    compact = compact_id_map(ids, segment_ids)
    expected = np.zeros_like(compact)
    for i, sid in enumerate(segment_ids):
        expected[ids == sid] = i + 1
    np.testing.assert_array_equal(compact, expected)


def test_fast_path_resize_and_normalise() -> None:
    image, ids, _ = sample(60, 90)
    out_image, out_ids = make_transforms(min_size=40, max_size=1000)(image, ids)
    assert out_image.shape == (3, 40, 60) and out_image.dtype == torch.float32
    assert out_ids.shape == (1, 40, 60) and out_ids.dtype == torch.int32
    assert set(torch.unique(out_ids).tolist()) == {0, 1001, 2002, 7, 9}
    reference = v2.functional.resize(image, [40, 60], antialias=True).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), (reference - mean) / std, atol=1e-5, rtol=1e-5)


def box_of(ids: torch.Tensor, segment_id: int) -> torch.Tensor:
    """Exclusive-end XYXY pixel box of one segment."""
    ys, xs = torch.nonzero(ids.reshape(ids.shape[-2:]) == segment_id, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("transform", [
    v2.RandomHorizontalFlip(1.0),
    RandomShorterSideResize([37], 1000),
    RandomShorterSideResize([120], 1000),
    RandomSizeCrop(30, 50),
], ids=["flip", "downscale", "upscale", "crop"])
def test_boxes_and_masks_move_with_the_image(transform: v2.Transform) -> None:
    torch.manual_seed(3)
    image, ids, segment_ids = sample()
    boxes = tv_tensors.BoundingBoxes(torch.stack([box_of(ids, int(s)) for s in segment_ids]),
                                     format="XYXY", canvas_size=(60, 90))
    out_image, out_ids, out_boxes = transform(image, ids, boxes)
    assert out_image.shape[-2:] == out_ids.shape[-2:] == out_boxes.canvas_size
    parts = targets_from_id_map(out_ids, segment_ids)
    torch.testing.assert_close(parts["boxes"], expected_boxes(parts["masks"]))
    # The box of each transformed mask is the transformed box (up to nearest-neighbour rounding).
    scale = out_ids.shape[-1] / 90
    for i, sid in enumerate(segment_ids.tolist()):
        if not parts["keep"][i]:
            continue
        clipped = out_boxes[i].as_subclass(torch.Tensor)
        torch.testing.assert_close(box_of(out_ids, sid), clipped, atol=max(1.0, scale), rtol=0)


def test_crop_drops_emptied_segments() -> None:
    _, ids, segment_ids = sample()
    out_ids = v2.functional.crop(ids, 0, 0, 20, 45)
    parts = targets_from_id_map(out_ids, segment_ids)
    assert parts["keep"].tolist() == [True, False, False, False]


def test_augmentation_is_random_but_consistent() -> None:
    transforms = make_transforms(min_size=64, max_size=200, augment=True)
    image, ids, segment_ids = sample(96, 160)
    sizes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_ids = transforms(image, ids)
        sizes.add(tuple(out_image.shape[-2:]))
        assert out_image.shape[-2:] == out_ids.shape[-2:]
        assert max(out_image.shape[-2:]) <= 200
        parts = targets_from_id_map(out_ids, segment_ids)
        assert parts["keep"].any()
    assert len(sizes) > 3
