"""COCO panoptic format helpers: id <-> RGB, PNG reading/writing, the prediction writer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.evaluation import (
    PanopticPredictionWriter,
    id_map_to_rgb,
    pq_compute,
    read_id_png,
    rgb_to_id_map,
    save_panoptic_predictions,
    segment_boxes_and_areas,
)
from detr_panoptic.utils.errors import UserInputError
from tests.evaluation.pq_cases import CATEGORIES


def test_id_rgb_round_trip_uses_r_plus_256g_plus_65536b():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 123456]])
    rgb = id_map_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[1, 3].tolist() == [123456 % 256, 123456 // 256 % 256, 123456 // 65536]
    np.testing.assert_array_equal(rgb_to_id_map(rgb), ids)
    np.testing.assert_array_equal(id_map_to_rgb(torch.from_numpy(ids)), rgb)
    with pytest.raises(UserInputError, match="0..16777215"):
        id_map_to_rgb(np.array([[1 << 24]]))
    with pytest.raises(UserInputError, match=r"\[H, W, 3\]"):
        rgb_to_id_map(np.zeros((2, 2)))


def test_read_id_png_rgb_and_rgba(tmp_path):
    ids = np.array([[0, 7, 70000], [16777215, 3, 3]])
    Image.fromarray(id_map_to_rgb(ids)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_id_png(tmp_path / "a.png"), ids)
    rgba = np.concatenate([id_map_to_rgb(ids), np.full((2, 3, 1), 200, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_id_png(tmp_path / "b.png"), ids)
    # A greyscale PNG shows (v, v, v): id v * (1 + 256 + 256^2).
    Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8)).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_id_png(tmp_path / "gray.png"), [[0, 65793], [131586, 16777215]])
    Image.fromarray(np.array([[0, 1]], np.uint16)).save(tmp_path / "gray16.png")  # no colour meaning
    with pytest.raises(UserInputError, match=r"gray16.png: expected an RGB panoptic PNG, got mode I;16"):
        read_id_png(tmp_path / "gray16.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "a.png").read_bytes()[:-20])
    with pytest.raises(UserInputError, match=r"broken.png: cannot decode the PNG"):
        read_id_png(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError):
        read_id_png(tmp_path / "missing.png")


def test_segment_boxes_and_areas():
    ids = np.zeros((5, 6), np.int64)
    ids[1:3, 2:5] = 9
    ids[4, 0] = 4
    ids[0, 5] = 77  # not listed: ignored
    areas, boxes = segment_boxes_and_areas(ids, [4, 9, 12])
    assert areas.tolist() == [1, 6, 0]
    assert boxes.tolist() == [[0, 4, 1, 1], [2, 1, 3, 2], [0, 0, 0, 0]]


def test_writer_checks_ids_and_writes_png_and_json_atomically(tmp_path):
    id_map = torch.zeros((4, 5), dtype=torch.long)
    id_map[:2] = 1
    id_map[2:, :3] = 2
    segments = [{"id": 1, "category_id": 8, "isthing": False, "score": torch.tensor(0.9)},
                {"id": 2, "category_id": 2, "isthing": True, "score": 0.95},
                {"id": 3, "category_id": 1, "isthing": True, "score": 0.9}]  # no pixel: dropped
    with PanopticPredictionWriter(tmp_path / "preds.json", categories=CATEGORIES) as writer:
        annotation = writer.add("img_a", id_map, segments)
        assert not (tmp_path / "preds.json").exists()  # the JSON comes at the end
        with pytest.raises(UserInputError, match=r"image 'bad': the id map holds segment ids \[5\]"):
            writer.add("bad", torch.full((2, 2), 5), [])
        with pytest.raises(UserInputError, match="duplicate segment ids"):
            writer.add("bad", id_map, segments[:1] * 2)
        with pytest.raises(UserInputError, match="0 is VOID"):
            writer.add("bad", id_map, [{"id": 0, "category_id": 8}])
        with pytest.raises(UserInputError, match=r"unknown category ids \[99\]"):
            writer.add("bad", id_map, [{"id": 1, "category_id": 99}, segments[1]])
        with pytest.raises(UserInputError, match="already written"):
            writer.add("img_a", id_map, segments)
    assert [s["id"] for s in annotation["segments_info"]] == [1, 2]
    assert annotation["segments_info"][1] == {"id": 2, "category_id": 2, "area": 6, "bbox": [0, 2, 3, 2],
                                              "iscrowd": 0, "isthing": True, "score": 0.95}
    data = json.loads((tmp_path / "preds.json").read_text())
    assert data["annotations"] == [annotation] and data["categories"] == CATEGORIES
    assert annotation["segments_info"][0]["score"] == pytest.approx(0.9)
    np.testing.assert_array_equal(read_id_png(tmp_path / "preds" / "img_a.png"), id_map.numpy())


def test_saved_ground_truth_as_predictions_scores_one(make_case, tmp_path):
    case = make_case(8)
    results, image_ids = [], []
    for ann in case.gt_json["annotations"]:
        keep = [s for s in ann["segments_info"] if s["category_id"] != 4]  # predictable categories only
        id_map = case.gt_maps[ann["image_id"]].copy()
        id_map[~np.isin(id_map, [s["id"] for s in keep])] = 0
        results.append((id_map, [{"id": s["id"], "category_id": s["category_id"]} for s in keep]))
        image_ids.append(ann["image_id"])
    json_path = save_panoptic_predictions(results, image_ids, tmp_path / "out" / "p.json", CATEGORIES,
                                          file_names=[f"{i}.png" for i in image_ids])
    assert (tmp_path / "out" / "p").is_dir()
    result = pq_compute(case.gt_json_path, json_path, case.gt_folder, workers=1)
    assert result["All"]["sq"] == 1.0
    # Predicted crowd regions are unmatched but lie on crowd: not false positives; every other
    # segment matches itself.
    assert result["All"]["pq"] == 1.0 and result["All"]["rq"] == 1.0
    with pytest.raises(UserInputError, match="2 results but 1 image ids"):
        save_panoptic_predictions(results[:2], image_ids[:1], tmp_path / "x.json")
