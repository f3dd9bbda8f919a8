"""evaluation/detection.py: recall, kept queries per ground truth, mask IoU of things."""
from __future__ import annotations

import math

import pytest
import torch

from detr_panoptic.evaluation.detection import (
    DetectionAccumulator,
    mask_boxes,
    panoptic_detection_inputs,
)
from detr_panoptic.models.outputs import KeptQueries, PanopticResult

CAR, PERSON = 26, 24


def _mask(h, w, box):
    m = torch.zeros(h, w, dtype=torch.bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_recall_duplicates_and_kept_ratio_of_a_designed_image():
    acc = DetectionAccumulator()
    gt_boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]]
    pred_boxes = [
        [0, 0, 10, 10],     # car 0, exact
        [1, 0, 10, 10],     # car 0 again, IoU 0.9: a duplicate
        [20, 20, 30, 30],   # right box, wrong class (person) for car 1: no hit
        [40, 0, 45, 10],    # person 2 at IoU 0.5 exactly: found
        [70, 70, 80, 80],   # a car nowhere near anything
    ]
    acc.add([CAR, CAR, PERSON], gt_boxes, [CAR, CAR, PERSON, PERSON, CAR], pred_boxes)
    out = acc.compute()
    assert out["n_gt"] == 3 and out["n_found"] == 2 and out["n_kept"] == 5
    assert out["recall"] == pytest.approx(200 / 3)
    assert out["kept_per_gt"] == pytest.approx(3 / 3)  # hits: 2 (car 0) + 0 (car 1) + 1 (person 2)
    assert out["duplicates_per_gt"] == pytest.approx(1 / 2)
    assert out["kept_ratio"] == pytest.approx(5 / 3)
    assert math.isnan(out["mask_iou"])  # no masks given
    car, person = out["per_class"][str(CAR)], out["per_class"][str(PERSON)]
    assert car["recall"] == 50.0 and car["kept_per_gt"] == 1.0 and car["kept_ratio"] == 1.5
    assert person["recall"] == 100.0 and person["n_kept"] == 2 and person["duplicates_per_gt"] == 0.0


def test_below_threshold_is_not_found_and_threshold_is_configurable():
    gt, pred = [[0, 0, 10, 10]], [[0, 0, 10, 4]]  # IoU 0.4
    acc = DetectionAccumulator()
    acc.add([CAR], gt, [CAR], pred)
    assert acc.compute()["recall"] == 0.0
    loose = DetectionAccumulator(iou_threshold=0.4)
    loose.add([CAR], gt, [CAR], pred)
    assert loose.compute()["recall"] == 100.0


def test_mask_iou_of_the_best_box_match():
    h, w = 20, 20
    gt_masks = torch.stack([_mask(h, w, (0, 0, 10, 10))])
    # the better box match has a half-size mask; the worse one a perfect mask: the best box decides
    pred_masks = torch.stack([_mask(h, w, (0, 0, 5, 10)), _mask(h, w, (0, 0, 10, 10))])
    acc = DetectionAccumulator()
    acc.add([CAR], [[0, 0, 10, 10]], [CAR, CAR], [[0, 0, 10, 10], [0, 0, 10, 9]],
            gt_masks=gt_masks, pred_masks=pred_masks)
    out = acc.compute()
    assert out["mask_iou"] == pytest.approx(50.0)
    assert out["kept_per_gt"] == 2.0


def test_empty_images_and_merge():
    a, b = DetectionAccumulator(), DetectionAccumulator()
    a.add([], [], [], [])
    assert math.isnan(a.compute()["recall"]) and a.compute()["images"] == 1
    a.add([CAR], [[0, 0, 10, 10]], [], [])
    b.add([CAR], [[0, 0, 10, 10]], [CAR], [[0, 0, 10, 10]])
    b.add([], [], [PERSON], [[0, 0, 1, 1]])
    merged = a.merge(b).compute()
    assert merged["images"] == 4
    assert merged["recall"] == 50.0 and merged["n_kept"] == 2
    assert merged["per_class"][str(PERSON)]["n_gt"] == 0
    assert math.isnan(merged["per_class"][str(PERSON)]["recall"])
    with pytest.raises(ValueError, match="thresholds"):
        a.merge(DetectionAccumulator(iou_threshold=0.7))


def test_bad_shapes_are_errors():
    acc = DetectionAccumulator()
    with pytest.raises(ValueError, match="xyxy"):
        acc.add([CAR], [[0, 0, 1]], [], [])
    with pytest.raises(ValueError, match="categories"):
        acc.add([CAR, CAR], [[0, 0, 1, 1]], [], [])
    with pytest.raises(ValueError, match="pred_masks"):
        acc.add([], [], [CAR], [[0, 0, 1, 1]], gt_masks=torch.zeros(0, 4, 4, dtype=torch.bool),
                pred_masks=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        DetectionAccumulator(iou_threshold=0.0)


def test_mask_boxes_are_continuous_pixel_extents():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 2, 3] = True
    assert mask_boxes(m).tolist() == [[3.0, 2.0, 4.0, 3.0]]


def test_inputs_from_a_panoptic_result():
    h, w = 20, 30
    gt_id_map = torch.zeros(h, w, dtype=torch.long)
    gt_id_map[:, :] = 1                      # road (stuff)
    gt_id_map[0:10, 0:10] = 2                # car
    gt_id_map[10:20, 20:30] = 3              # crowd of persons: not a ground truth
    gt_segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": CAR},
                   {"id": 3, "category_id": PERSON, "iscrowd": 1}]
    id_map = torch.ones(h, w, dtype=torch.long)
    id_map[0:10, 0:5] = 2                    # query 4's segment covers half the car
    kept = KeptQueries(indices=torch.tensor([1, 4, 9]), labels=torch.tensor([0, 2, 2]),
                       category_ids=torch.tensor([7, CAR, CAR]), scores=torch.tensor([0.9, 0.8, 0.7]),
                       boxes=torch.tensor([[0.0, 0, 30, 20], [0, 0, 10, 10], [0, 0, 10, 10]]))
    result = PanopticResult(id_map, [{"id": 1, "category_id": 7, "query": 1},
                                     {"id": 2, "category_id": CAR, "query": 4}], kept=kept)
    inputs = panoptic_detection_inputs(gt_id_map, gt_segments, result, thing_ids=[CAR, PERSON])
    assert inputs["gt_categories"] == [CAR]
    assert inputs["gt_boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    assert inputs["pred_categories"].tolist() == [CAR, CAR]
    assert not inputs["pred_masks"][1].any()  # query 9 lost its segment in the merge
    acc = DetectionAccumulator()
    acc.add(**inputs)
    out = acc.compute()
    assert out["recall"] == 100.0 and out["kept_per_gt"] == 2.0
    assert out["mask_iou"] == pytest.approx(50.0)  # the first best box match: query 4

    # segments=True: what the output shows. Query 9 made no segment, so the car is found once, by the box of
    # query 4's segment (half the car: box IoU 0.5)
    segments = panoptic_detection_inputs(gt_id_map, gt_segments, result, thing_ids=[CAR, PERSON], segments=True)
    assert segments["pred_categories"] == [CAR] and segments["pred_boxes"].tolist() == [[0.0, 0.0, 5.0, 10.0]]
    acc = DetectionAccumulator()
    acc.add(**segments)
    out = acc.compute()
    assert out["recall"] == 100.0 and out["kept_per_gt"] == 1.0 and out["duplicates_per_gt"] == 0.0


def test_a_result_without_kept_queries_counts_its_thing_segments():
    h, w = 20, 30
    gt_id_map = torch.ones(h, w, dtype=torch.long)
    gt_id_map[0:10, 0:10] = 2
    gt_segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": CAR}]
    result = PanopticResult(gt_id_map.clone(), [{"id": 1, "category_id": 7, "score": 1.0},
                                                {"id": 2, "category_id": CAR, "score": 0.9}])
    acc = DetectionAccumulator()
    acc.add(**panoptic_detection_inputs(gt_id_map, gt_segments, result, thing_ids=[CAR]))
    out = acc.compute()
    assert out["recall"] == 100.0 and out["kept_ratio"] == 1.0 and out["mask_iou"] == 100.0
