"""Overlays drawn from hand-made results and from the COCO sample's ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.data.categories import Category, CategoryMap, coco_category_map
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.visualize.overlay import (
    draw_panoptic,
    result_from_panoptic_png,
    save_image,
    segment_boundaries,
    segment_colors,
    shade,
)

CATEGORIES = CategoryMap.contiguous([
    Category(1, "car", True, (0, 0, 142)),
    Category(2, "road", False, (128, 64, 128)),
])


def two_cars_on_road(height: int = 60, width: int = 80) -> PanopticResult:
    id_map = torch.full((height, width), 1, dtype=torch.long)          # road everywhere
    id_map[10:30, 10:30] = 2                                          # car A
    id_map[35:55, 40:70] = 3                                          # car B
    id_map[0:5, :] = 0                                                # void strip
    segments = [
        {"id": 1, "category_id": 2, "isthing": False, "area": 0, "score": 0.97, "query": 4},
        {"id": 2, "category_id": 1, "isthing": True, "area": 0, "score": 0.91, "query": 7},
        {"id": 3, "category_id": 1, "isthing": True, "area": 0, "score": 0.88, "query": 9},
    ]
    return PanopticResult(id_map, segments)


def test_stuff_keeps_category_colour_and_things_get_distinct_shades():
    result = two_cars_on_road()
    colors = segment_colors(result.segments_info, CATEGORIES.by_id())
    assert colors[1] == (128, 64, 128)
    assert colors[2] != colors[3]
    # Shades keep the hue of the category colour.
    import colorsys
    hues = {round(colorsys.rgb_to_hls(*(c / 255 for c in colors[i]))[0], 2) for i in (2, 3)}
    assert hues == {round(colorsys.rgb_to_hls(0, 0, 142 / 255)[0], 2)}
    assert len({shade((200, 30, 30), i, 6) for i in range(6)}) == 6


def test_overlay_has_image_size_and_colours_segments():
    result = two_cars_on_road()
    image = torch.full((3, 60, 80), 255, dtype=torch.uint8)
    out = draw_panoptic(image, result, CATEGORIES, labels=False, boxes=False, boundaries=False, alpha=1.0,
                        min_side=0)
    assert out.shape == (3, 60, 80) and out.dtype == torch.uint8
    colors = segment_colors(result.segments_info, CATEGORIES.by_id())
    assert tuple(out[:, 50, 5].tolist()) == colors[1]              # road interior
    assert tuple(out[:, 20, 20].tolist()) == colors[2]             # car A interior
    assert tuple(out[:, 45, 55].tolist()) == colors[3]             # car B interior
    assert tuple(out[:, 2, 40].tolist()) == (255, 255, 255)        # void untouched


def test_boundaries_labels_and_boxes_change_pixels_only_where_expected():
    result = two_cars_on_road()
    image = torch.zeros((3, 60, 80), dtype=torch.uint8)
    plain = draw_panoptic(image, result, CATEGORIES, labels=False, boxes=False, boundaries=False, min_side=0)
    edges = segment_boundaries(result.id_map)
    assert edges[10, 15] and edges[30, 15] and not edges[20, 20]
    outlined = draw_panoptic(image, result, CATEGORIES, labels=False, boxes=False, min_side=0)
    # torchvision blends in float: pixels outside a mask may move by one grey level.
    changed = ((outlined.int() - plain.int()).abs() > 2).any(0)
    assert changed[edges].float().mean() > 0.9 and not changed[~edges].any()
    labelled = draw_panoptic(image, result, CATEGORIES, font_size=10, min_side=0)
    assert (labelled != outlined).any()


def test_empty_result_returns_the_image_and_size_mismatch_is_an_error():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    empty = PanopticResult(torch.zeros((20, 30), dtype=torch.long), [])
    assert torch.equal(draw_panoptic(image, empty, CATEGORIES, min_side=0), torch.zeros((3, 20, 30), dtype=torch.uint8))
    with pytest.raises(ValueError, match="image size|original image size"):
        draw_panoptic(image, two_cars_on_road(), CATEGORIES)


def test_small_images_are_drawn_enlarged_by_a_whole_factor():
    result = two_cars_on_road()  # 60 x 80
    image = torch.full((3, 60, 80), 255, dtype=torch.uint8)
    plain = draw_panoptic(image, result, CATEGORIES, labels=False, boxes=False, boundaries=False, min_side=0)
    big = draw_panoptic(image, result, CATEGORIES, labels=False, boxes=False, boundaries=False, min_side=200)
    assert big.shape == (3, 240, 320)  # 4 = the smallest factor that takes 60 to >= 200
    # Without boundaries, boxes and labels, the enlarged overlay is the small one with each pixel repeated.
    assert torch.equal(big, plain.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))
    labelled = draw_panoptic(image, result, CATEGORIES, min_side=200)
    assert labelled.shape == (3, 240, 320)
    assert draw_panoptic(image, result, CATEGORIES, min_side=60).shape == (3, 60, 80)  # large enough already


def test_draws_coco_ground_truth_on_the_sample_images(coco_sample, tmp_path):
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    annotation = data["annotations"][0]
    image = Image.open(coco_sample / "input_images" / annotation["file_name"].replace(".png", ".jpg"))
    result = result_from_panoptic_png(Image.open(coco_sample / "panoptic_examples" / annotation["file_name"]),
                                      annotation["segments_info"])
    assert set(torch.unique(result.id_map).tolist()) - {0} == {s["id"] for s in annotation["segments_info"]}
    overlay = draw_panoptic(image, result, coco_category_map())
    assert overlay.shape == (3, image.height, image.width)
    path = tmp_path / "overlay.png"
    save_image(overlay, path)
    assert Image.open(path).size == image.size
    # A large stuff segment is tinted towards its category colour.
    biggest = max((s for s in annotation["segments_info"] if s["category_id"] > 90), key=lambda s: s["area"])
    color = torch.tensor(coco_category_map().by_id()[biggest["category_id"]].color, dtype=torch.float)
    inside = result.id_map == biggest["id"]
    before = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[:, inside].float().mean(1)
    after = overlay[:, inside].float().mean(1)
    assert torch.dist(after, color) < torch.dist(before, color)


def test_labels_near_the_right_and_bottom_edges_stay_inside_the_picture():
    id_map = torch.zeros((120, 200), dtype=torch.long)
    id_map[100:120, 190:200] = 1  # a thing in the bottom-right corner
    result = PanopticResult(id_map, [{"id": 1, "category_id": 1, "isthing": True, "area": 200, "score": 0.9}])
    image = torch.zeros((3, 120, 200), dtype=torch.uint8)
    plain = draw_panoptic(image, result, CATEGORIES, labels=False, min_side=0)
    labelled = draw_panoptic(image, result, CATEGORIES, font_size=12, min_side=0)
    changed = (labelled != plain).any(0)
    columns = torch.nonzero(changed.any(0)).flatten()
    rows = torch.nonzero(changed.any(1)).flatten()
    # "car 0.90" is ~50 px wide at 12 px: drawn from its box's corner it would run off the picture.
    assert columns.min() < 150 and columns.max() <= 199
    assert rows.max() - rows.min() >= 8 and rows.min() < 105  # the whole line of text, lifted


def test_blend_segments_equals_torchvisions_mask_drawing():
    from torchvision.utils import draw_segmentation_masks

    from detr_panoptic.visualize.overlay import blend_segments

    generator = torch.Generator().manual_seed(3)
    canvas = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=generator)
    id_map = torch.randint(0, 7, (40, 60), generator=generator)
    colors = {1: (255, 0, 0), 2: (0, 128, 255), 4: (12, 34, 56), 6: (200, 200, 10)}  # 3 and 5 not drawn
    masks = torch.stack([id_map == i for i in colors])
    for alpha in (0.0, 0.3, 0.55, 1.0):
        expected = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=list(colors.values()))
        assert torch.equal(blend_segments(canvas, id_map, colors, alpha), expected)
