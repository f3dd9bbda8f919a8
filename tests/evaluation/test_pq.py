"""pq_compute and PQAccumulator against cityscapesscripts' panopticapi implementation, and errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.evaluation import PQAccumulator, pq_compute
from detr_panoptic.utils.errors import UserInputError
from tests.evaluation.pq_cases import CATEGORIES, Case, assert_same_results, reference_pq, to_rgb


def ours(case: Case, workers: int = 1) -> dict:
    return pq_compute(case.gt_json_path, case.pred_json_path, case.gt_folder, case.pred_folder, workers=workers)


@pytest.mark.parametrize("seed", range(12))
def test_equals_reference_on_generated_cases(make_case, seed):
    case = make_case(seed, string_ids=seed % 3 == 0)
    assert_same_results(ours(case), reference_pq(case))


@pytest.mark.parametrize("num_images", [8, 40])  # chunks of 1 image, of 2 images
def test_equals_reference_with_worker_processes(make_case, num_images):
    case = make_case(21, num_images=num_images)
    assert_same_results(ours(case, workers=2), reference_pq(case))


def test_inputs_may_be_dicts_and_folders_default_to_json_name(make_case):
    case = make_case(3)
    expected = ours(case)
    assert_same_results(pq_compute(case.gt_json, case.pred_json, case.gt_folder, case.pred_folder, workers=1),
                        expected)
    (case.root / "gt.json").rename(case.root / "gt_copy.json")
    case.gt_folder.rename(case.root / "gt_copy")
    (case.root / "pred.json").rename(case.root / "pred_copy.json")
    case.pred_folder.rename(case.root / "pred_copy")
    assert_same_results(pq_compute(case.root / "gt_copy.json", case.root / "pred_copy.json", workers=1), expected)


def test_result_structure_is_panopticapis(make_case):
    result = ours(make_case(1))
    assert list(result) == ["All", "per_class", "Things", "Stuff"]
    assert set(result["All"]) == {"pq", "sq", "rq", "n"}
    assert sorted(result["per_class"]) == [c["id"] for c in CATEGORIES]
    assert result["per_class"][6] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # a category never seen
    assert all(0.0 <= result["All"][m] <= 1.0 for m in ("pq", "sq", "rq"))
    json.dumps(result)  # plain Python numbers


def single_image_case(tmp_path, gt, gt_segments, pred, pred_segments, image_id="img") -> Case:
    gt_json = {"annotations": [{"image_id": image_id, "file_name": "a.png", "segments_info": gt_segments}],
               "categories": copy.deepcopy(CATEGORIES)}
    pred_json = {"annotations": [{"image_id": image_id, "file_name": "a.png", "segments_info": pred_segments}]}
    return Case(gt_json, pred_json, {image_id: np.asarray(gt)}, {image_id: np.asarray(pred)}).write(tmp_path)


def counts(case: Case) -> dict:
    accumulator = PQAccumulator(case.gt_json["categories"])
    for ann in case.gt_json["annotations"]:
        pred = next(p for p in case.pred_json["annotations"] if p["image_id"] == ann["image_id"])
        accumulator.add(case.gt_maps[ann["image_id"]], ann["segments_info"],
                        case.pred_maps[ann["image_id"]], pred["segments_info"])
    return accumulator.counts()


def test_union_leaves_out_predicted_pixels_on_void(tmp_path):
    # gt car: 10 pixels; pred: 6 on the car + 6 on void. IoU = 6 / (12 + 10 - 6 - 6) = 0.6 > 0.5;
    # counting the void pixels it would be 6 / 16 < 0.5.
    gt = np.zeros((4, 8), np.int64)
    gt[0, :] = 5
    gt[1, :2] = 5
    gt[2:, :] = 70
    pred = np.full((4, 8), 2, np.int64)
    pred[0, :6] = 1
    pred[1, 2:8] = 1
    gt_segments = [{"id": 5, "category_id": 2, "iscrowd": 0, "area": 10},
                   {"id": 70, "category_id": 7, "iscrowd": 0, "area": 16}]
    pred_segments = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 7}]
    case = single_image_case(tmp_path, gt, gt_segments, pred, pred_segments)
    c = counts(case)
    assert c[2] == {"iou": pytest.approx(0.6), "tp": 1.0, "fp": 0.0, "fn": 0.0}
    assert_same_results(ours(case), reference_pq(case))


def test_crowd_is_not_matched_and_prediction_on_it_is_not_a_false_positive(tmp_path):
    gt = np.full((4, 8), 70, np.int64)
    gt[:2, :4] = 9  # crowd of persons
    pred = np.full((4, 8), 3, np.int64)
    pred[:2, :4] = 1  # exactly the crowd, category person: ignored
    pred[:2, 4:6] = 2  # a person on road: a false positive
    gt_segments = [{"id": 9, "category_id": 1, "iscrowd": 1, "area": 8},
                   {"id": 70, "category_id": 7, "iscrowd": 0, "area": 24}]
    pred_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 7}]
    case = single_image_case(tmp_path, gt, gt_segments, pred, pred_segments)
    c = counts(case)
    assert c[1] == {"iou": 0.0, "tp": 0.0, "fp": 1.0, "fn": 0.0}
    assert c[7]["tp"] == 1.0
    assert_same_results(ours(case), reference_pq(case))


def test_more_than_half_on_void_is_not_a_false_positive_but_half_is(tmp_path):
    gt = np.full((4, 8), 70, np.int64)
    gt[0, :] = 0
    pred = np.full((4, 8), 3, np.int64)
    pred[0, :3] = 1  # 3 of 4 on void: ignored
    pred[1, 0] = 1
    pred[0, 4:6] = 2  # 2 of 4 on void: exactly half, a false positive
    pred[1, 4:6] = 2
    gt_segments = [{"id": 70, "category_id": 7, "iscrowd": 0, "area": 24}]
    pred_segments = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 3}, {"id": 3, "category_id": 7}]
    case = single_image_case(tmp_path, gt, gt_segments, pred, pred_segments)
    c = counts(case)
    assert c[2]["fp"] == 0.0 and c[3]["fp"] == 1.0
    assert_same_results(ours(case), reference_pq(case))


def test_iou_of_exactly_half_does_not_match_and_gt_area_comes_from_the_json(tmp_path):
    gt = np.full((2, 8), 70, np.int64)
    gt[0, :4] = 5
    pred = np.full((2, 8), 2, np.int64)
    pred[0, :2] = 1
    gt_segments = [{"id": 5, "category_id": 2, "iscrowd": 0, "area": 4},
                   {"id": 70, "category_id": 7, "iscrowd": 0, "area": 12}]
    pred_segments = [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 7}]
    case = single_image_case(tmp_path, gt, gt_segments, pred, pred_segments)
    assert counts(case)[2] == {"iou": 0.0, "tp": 0.0, "fp": 1.0, "fn": 1.0}  # IoU 2/4 = 0.5
    assert_same_results(ours(case), reference_pq(case))
    # panopticapi takes the gt area from the JSON: claiming 3 pixels makes IoU 2/3 a match.
    case.gt_json["annotations"][0]["segments_info"][0]["area"] = 3
    case.write(case.root)
    assert counts(case)[2]["tp"] == 1.0
    assert_same_results(ours(case), reference_pq(case))


def test_in_memory_api_equals_file_api(make_case):
    case = make_case(5, num_images=4)
    accumulator = PQAccumulator(case.gt_json["categories"])
    predictions = {p["image_id"]: p for p in case.pred_json["annotations"]}
    for i, ann in enumerate(case.gt_json["annotations"]):
        gt_map = case.gt_maps[ann["image_id"]]
        pred_map = case.pred_maps[ann["image_id"]]
        if i % 2:  # torch tensors work too
            gt_map, pred_map = torch.from_numpy(gt_map), torch.from_numpy(pred_map)
        accumulator.add(gt_map, ann["segments_info"], pred_map, predictions[ann["image_id"]]["segments_info"],
                        image_id=ann["image_id"])
    assert accumulator.num_images == 4
    assert_same_results(accumulator.compute(), ours(case), tol=0.0)


def test_accumulators_merge_and_round_trip_through_tensors(make_case):
    case = make_case(7, num_images=4)
    predictions = {p["image_id"]: p for p in case.pred_json["annotations"]}
    parts = [PQAccumulator(case.gt_json["categories"]) for _ in range(2)]
    for i, ann in enumerate(case.gt_json["annotations"]):
        parts[i % 2].add(case.gt_maps[ann["image_id"]], ann["segments_info"],
                         case.pred_maps[ann["image_id"]], predictions[ann["image_id"]]["segments_info"])
    summed = parts[0].to_tensor() + parts[1].to_tensor()  # what all_reduce(SUM) does
    assert summed.dtype == torch.float64 and summed.shape == (len(CATEGORIES), 4)
    from_tensor = PQAccumulator.from_tensor(case.gt_json["categories"], summed)
    merged = PQAccumulator(case.gt_json["categories"]).merge(parts[0]).merge(parts[1])
    expected = ours(case)
    assert_same_results(from_tensor.compute(), expected)
    assert_same_results(merged.compute(), expected)
    assert merged.num_images == 4


@pytest.mark.parametrize("block", [None, 1, 7])
@pytest.mark.parametrize("noise", [False, True])
def test_run_length_counting_equals_pixel_counting(noise, block, monkeypatch):
    from detr_panoptic.evaluation import pq_stats
    from detr_panoptic.evaluation.pq_stats import runs

    if block is not None:  # runs cross the boundaries of the blocks that runs works in
        monkeypatch.setattr(pq_stats, "_RUN_BLOCK", block)
    rng = np.random.default_rng(1)
    gt = np.repeat(rng.integers(0, 4, (6, 5)), 3, axis=1)
    pred = np.repeat(rng.integers(0, 3, (6, 5)), 3, axis=1)
    if noise:
        gt, pred = rng.integers(0, 4, (6, 15)), rng.integers(0, 3, (6, 15))
    gt_values, pred_values, lengths = runs(gt, pred)
    assert lengths.sum() == gt.size
    counted = {}
    for g, p, n in zip(gt_values.tolist(), pred_values.tolist(), lengths.tolist()):
        counted[(g, p)] = counted.get((g, p), 0) + n
    pairs, counts = np.unique(np.stack([gt.ravel(), pred.ravel()]), axis=1, return_counts=True)
    assert counted == {(int(g), int(p)): int(c) for (g, p), c in zip(pairs.T, counts)}


@pytest.mark.parametrize("largest", [40, 70000, 1 << 24])  # table lookup, binary search
def test_labels_of_run_values(largest):
    from detr_panoptic.evaluation.pq_stats import _labels

    rng = np.random.default_rng(largest)
    segment_ids = rng.choice(np.arange(1, largest), size=12, replace=False)
    values = np.concatenate([[0], segment_ids, rng.integers(0, largest, 50)])
    expected = [0 if v not in segment_ids and v != 0 else 1 if v == 0 else 2 + segment_ids.tolist().index(v)
                for v in values.tolist()]
    assert _labels(values, segment_ids).tolist() == expected
    assert _labels(values - largest, segment_ids).tolist()[1:13] == [0] * 12  # negative ids: search


def test_packed_png_reading_keeps_ids_in_the_low_24_bits(make_case):
    from detr_panoptic.evaluation import read_id_png

    case = make_case(9, num_images=1)
    ann = case.pred_json["annotations"][0]
    path = case.pred_folder / ann["file_name"]
    expected = case.pred_maps[ann["image_id"]]
    np.testing.assert_array_equal(read_id_png(path), expected)
    np.testing.assert_array_equal(read_id_png(path, packed=True) & 0xFFFFFF, expected)


@pytest.mark.parametrize("without", [("_unfilter",), ("_unfilter", "_pyvips")])
def test_the_fallback_decoders_give_the_same_results(make_case, monkeypatch, without):
    from detr_panoptic.utils import png as png_decoding

    case = make_case(4)
    for name in without:  # as without the compiled extension, then also without pyvips: libvips, Pillow
        monkeypatch.setattr(png_decoding, name, None)
    assert_same_results(ours(case), reference_pq(case))


def test_no_category_seen_gives_zero_averages():
    accumulator = PQAccumulator(CATEGORIES)
    assert accumulator.compute()["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def rewrite_pred(case: Case, image_index: int, segments=None, pred_map=None) -> None:
    ann = case.pred_json["annotations"][image_index]
    if segments is not None:
        ann["segments_info"] = segments
    if pred_map is not None:
        Image.fromarray(to_rgb(pred_map)).save(case.pred_folder / ann["file_name"])
    case.pred_json_path.write_text(json.dumps(case.pred_json))


def test_error_names_the_image_without_prediction(make_case):
    case = make_case(2)
    missing = case.pred_json["annotations"].pop(1)
    case.pred_json_path.write_text(json.dumps(case.pred_json))
    with pytest.raises(UserInputError, match=rf"no prediction for image {missing['image_id']!r}.*pred.json"):
        ours(case)


def test_error_hints_at_image_id_type_mismatch(make_case):
    case = make_case(2)
    for ann in case.pred_json["annotations"]:
        ann["image_id"] = str(ann["image_id"])
    case.pred_json_path.write_text(json.dumps(case.pred_json))
    with pytest.raises(UserInputError, match="same type"):
        ours(case)


def test_error_names_png_segment_missing_from_json(make_case):
    case = make_case(2)
    ann = case.pred_json["annotations"][0]
    dropped = ann["segments_info"][0]["id"]
    rewrite_pred(case, 0, segments=ann["segments_info"][1:])
    with pytest.raises(UserInputError, match=rf"image {ann['image_id']!r}: segment ids \[{dropped}\] are in "
                                             rf"prediction \(.*{ann['file_name']}\) PNG but not in its JSON"):
        ours(case)


def test_error_names_json_segment_missing_from_png(make_case):
    case = make_case(2)
    ann = case.pred_json["annotations"][0]
    rewrite_pred(case, 0, segments=ann["segments_info"] + [{"id": 12345, "category_id": 1}])
    with pytest.raises(UserInputError, match=r"segment ids \[12345\] are in prediction .* JSON segments_info "
                                             r"but not in its PNG"):
        ours(case)


def test_error_names_unknown_category(make_case):
    case = make_case(2)
    ann = case.pred_json["annotations"][0]
    ann["segments_info"][0]["category_id"] = 77
    rewrite_pred(case, 0)
    with pytest.raises(UserInputError, match=rf"segment {ann['segments_info'][0]['id']} -> 77"):
        ours(case)


def test_error_names_missing_png_file(make_case):
    case = make_case(2)
    ann = case.pred_json["annotations"][0]
    (case.pred_folder / ann["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"image {ann['image_id']!r}: predicted PNG .*{ann['file_name']}"):
        ours(case)


@pytest.mark.parametrize("image_index", [0, 3])
def test_errors_raised_in_worker_threads_reach_the_caller(make_case, image_index):
    # 4 images, 2 threads, one image per task: the first and the last image fail.
    case = make_case(2, num_images=4)
    file_name = case.gt_json["annotations"][image_index]["file_name"]
    (case.gt_folder / file_name).unlink()
    with pytest.raises(FileNotFoundError, match=f"ground-truth PNG .*{file_name}"):
        ours(case, workers=2)


def test_worker_threads_share_the_work(make_case, monkeypatch):
    import threading

    from detr_panoptic.evaluation import pq

    case = make_case(21, num_images=8)
    threads = []
    pair_stats = pq._pair_stats
    both_working = threading.Barrier(2, timeout=60)  # broken (an error) unless two threads take images

    def recorded(*args):
        threads.append(threading.get_ident())
        if len(threads) <= 2:  # the first two images are taken by two threads at once
            both_working.wait()
        return pair_stats(*args)

    monkeypatch.setattr(pq, "_pair_stats", recorded)
    assert_same_results(ours(case, workers=2), reference_pq(case))
    assert len(threads) == 8
    assert len(set(threads)) == 2 and threading.get_ident() not in threads


def test_error_on_size_mismatch_duplicate_prediction_and_missing_inputs(make_case, tmp_path):
    case = make_case(2)
    ann = case.pred_json["annotations"][0]
    rewrite_pred(case, 0, pred_map=np.zeros((5, 5), np.int64))
    with pytest.raises(UserInputError, match=rf"image {ann['image_id']!r}: prediction .* is 5x5 but ground truth"):
        ours(case)
    case.pred_json["annotations"].append(copy.deepcopy(ann))
    case.pred_json_path.write_text(json.dumps(case.pred_json))
    with pytest.raises(UserInputError, match="two predictions for image"):
        ours(case)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        pq_compute(tmp_path / "nope.json", case.pred_json_path, case.gt_folder, case.pred_folder)
    with pytest.raises(FileNotFoundError, match="prediction PNG folder"):
        pq_compute(case.gt_json_path, case.pred_json_path, case.gt_folder, tmp_path / "nowhere")


def test_in_memory_errors_name_the_image():
    accumulator = PQAccumulator(CATEGORIES)
    gt = np.full((3, 3), 70)
    segments = [{"id": 70, "category_id": 7}]
    with pytest.raises(UserInputError, match=r"image 'x': segment ids \[4\] are in prediction PNG"):
        accumulator.add(gt, segments, np.full((3, 3), 4), [], image_id="x")
    with pytest.raises(UserInputError, match="duplicate segment ids"):
        accumulator.add(gt, segments, gt, segments + segments, image_id="x")
    with pytest.raises(UserInputError, match="segment id 0 is reserved"):
        accumulator.add(gt, segments, np.zeros((3, 3), int), [{"id": 0, "category_id": 7}], image_id="x")
    with pytest.raises(UserInputError, match="integer"):
        accumulator.add(gt.astype(float), segments, gt, segments)


def test_percentage_forms(make_case):
    from detr_panoptic.evaluation import results_to_metrics, results_to_percentages

    case = make_case(6)
    results = ours(case)
    flat = results_to_percentages(results)
    assert flat["pq"] == 100 * results["All"]["pq"] and flat["n_stuff"] == results["Stuff"]["n"]
    assert flat["per_class"]["7"] == {m: 100 * results["per_class"][7][m] for m in ("pq", "sq", "rq")}
    assert "panopticapi" not in flat
    named = results_to_metrics(results, CATEGORIES)
    assert named["per_class"]["7"]["name"] == "road" and named["per_class"]["7"]["isthing"] is False
    assert named["panopticapi"]["All"] == results["All"]


def test_zero_copy_pixel_view_equals_tobytes_and_outlives_the_image(make_case):
    from detr_panoptic.utils.png import _rgbx_view

    case = make_case(9, num_images=1)
    ann = case.gt_json["annotations"][0]
    with Image.open(case.gt_folder / ann["file_name"]) as image:
        image.load()
        view = _rgbx_view(image)
        copied = np.frombuffer(image.tobytes("raw", "RGBX"), dtype="<u4").reshape(image.height, image.width)
    if view is None:
        pytest.skip("this Pillow has no Arrow export")
    del image
    np.testing.assert_array_equal(view, copied)
    np.testing.assert_array_equal(view & 0xFFFFFF, case.gt_maps[ann["image_id"]])
