"""The Cityscapes evaluators (evaluation/semantic.py, instance.py, cityscapes.py) against
cityscapesScripts' own pixel-level and instance-level evaluators and against pq_compute."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.data.synthetic import make_synthetic_cityscapes
from detr_panoptic.data.synthetic_results import write_cityscapes_results
from detr_panoptic.evaluation.cityscapes import evaluate_cityscapes_results, format_cityscapes_table
from detr_panoptic.utils.errors import UserInputError
from tests.evaluation.cityscapes_reference import reference_instance_level, reference_pixel_level


def close(ours: float | None, reference: float) -> bool:
    if ours is None:
        return math.isnan(reference)
    return math.isclose(ours, 100.0 * reference, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=0, val=5, size=(192, 384), seed=3)
    return root


def assert_equal_to_reference(results: Path, root: Path, tmp_path: Path) -> dict:
    metrics = evaluate_cityscapes_results(results, root, "val", parts=("semantic", "instance"))
    pixel = reference_pixel_level(results / "cityscapes" / "semantic", root)
    by_name = {entry["name"]: entry for entry in metrics["per_class"].values()}
    for name, value in pixel["classScores"].items():
        if name in by_name:
            assert close(by_name[name]["iou"], value), name
    for name, value in pixel["classInstScores"].items():
        if name in by_name and by_name[name]["isthing"]:
            assert close(by_name[name]["iiou"], value), name
    for category, value in pixel["categoryScores"].items():
        if category != "void":
            assert close(metrics["per_category"][category]["iou"], value), category
    for category, value in pixel["categoryInstScores"].items():
        if category in ("human", "vehicle"):
            assert close(metrics["per_category"][category]["iiou"], value), category
    assert close(metrics["miou"], pixel["averageScoreClasses"])
    assert close(metrics["iiou"], pixel["averageScoreInstClasses"])
    assert close(metrics["category_miou"], pixel["averageScoreCategories"])
    assert close(metrics["category_iiou"], pixel["averageScoreInstCategories"])

    instance = reference_instance_level(results / "cityscapes" / "instance", root, cache=tmp_path)["averages"]
    assert close(metrics["ap"], instance["allAp"])
    assert close(metrics["ap50"], instance["allAp50%"])
    for name, values in instance["classes"].items():
        assert close(by_name[name]["ap"], values["ap"]), name
        assert close(by_name[name]["ap50"], values["ap50%"]), name
    return metrics


@pytest.mark.parametrize("pillow_masks", [False, True])
def test_scores_equal_cityscapesscripts(scenes: Path, tmp_path: Path, pillow_masks: bool) -> None:
    results = tmp_path / "results"
    write_cityscapes_results(scenes, "val", results, seed=1, pillow_masks=pillow_masks)
    metrics = assert_equal_to_reference(results, scenes, tmp_path)
    assert metrics["ap"] is not None and 0 < metrics["ap"] < 100
    assert metrics["miou"] is not None and 0 < metrics["miou"] < 100


def _write_tree(root: Path, instance_ids: list[np.ndarray]) -> None:
    folder = root / "gtFine" / "val" / "aachen"
    folder.mkdir(parents=True)
    for k, ids in enumerate(instance_ids):
        stem = f"aachen_{k:06d}_000019"
        Image.fromarray(ids.astype(np.uint16)).save(folder / f"{stem}_gtFine_instanceIds.png")
        labels = np.where(ids < 1000, ids, ids // 1000).astype(np.uint8)
        Image.fromarray(labels).save(folder / f"{stem}_gtFine_labelIds.png")


def _write_results(results: Path, semantic: list[np.ndarray], instances: list[list[tuple[np.ndarray, int, float]]]
                   ) -> None:
    (results / "cityscapes" / "semantic").mkdir(parents=True)
    (results / "cityscapes" / "instance" / "masks").mkdir(parents=True)
    for k, (labels, predictions) in enumerate(zip(semantic, instances)):
        stem = f"aachen_{k:06d}_000019"
        Image.fromarray(labels.astype(np.uint8)).save(results / "cityscapes" / "semantic" / f"{stem}.png")
        lines = []
        for j, (mask, label, confidence) in enumerate(predictions):
            Image.fromarray(mask.astype(np.uint8) * 255).save(results / "cityscapes" / "instance" / "masks" / f"{stem}_{j}.png")
            lines.append(f"masks/{stem}_{j}.png {label} {confidence}\n")
        (results / "cityscapes" / "instance" / f"{stem}.txt").write_text("".join(lines))


def test_edge_cases_equal_cityscapesscripts(tmp_path: Path) -> None:
    """Crowd regions, ignored labels (void, caravan), an instance under 100 pixels, predictions lying on
    them, a duplicate, an empty mask, an image without predictions, a class without ground truth."""
    ids = np.full((40, 60), 7, np.int64)             # road
    ids[:8] = 23                                      # sky
    ids[8:12] = 0                                     # unlabeled (ignored)
    ids[12:30, 0:15] = 26001                          # car
    ids[12:30, 15:25] = 26                            # car crowd region
    ids[30:38, 0:10] = 24001                          # person, 80 pixels (< 100)
    ids[14:34, 30:45] = 24002                         # person
    ids[14:30, 48:58] = 29001                         # caravan (ignored class with instances)
    second = np.full((40, 60), 8, np.int64)
    second[5:25, 5:25] = 33001                        # bicycle, never predicted
    _write_tree(tmp_path / "cs", [ids, second])
    semantic = [np.where(ids < 1000, ids, ids // 1000), np.full((40, 60), 8)]
    semantic[0][0:4, :] = 26                          # car on sky: a false positive
    mask = lambda rows, cols: np.pad(np.ones((rows.stop - rows.start, cols.stop - cols.start), bool),
                                     ((rows.start, 40 - rows.stop), (cols.start, 60 - cols.stop)))
    first = [
        (mask(slice(12, 30), slice(0, 14)), 26, 0.9),    # the car
        (mask(slice(12, 30), slice(1, 15)), 26, 0.95),   # a duplicate of it
        (mask(slice(12, 30), slice(15, 25)), 26, 0.8),   # on the crowd region: ignored
        (mask(slice(30, 38), slice(0, 10)), 24, 0.7),    # on the small person: ignored
        (mask(slice(14, 34), slice(31, 45)), 24, 0.6),   # the person
        (mask(slice(14, 30), slice(48, 58)), 26, 0.5),   # a car on the caravan: on ignored pixels
        (mask(slice(8, 12), slice(0, 30)), 25, 0.4),     # a rider on unlabeled pixels
        (mask(slice(0, 8), slice(0, 20)), 25, 0.3),      # a rider on sky: a false positive
        (np.zeros((40, 60), bool), 24, 0.99),            # an empty mask: dropped
        (mask(slice(0, 5), slice(0, 5)), 29, 0.99),      # a caravan: not scored
    ]
    _write_results(tmp_path / "results", semantic, [first, []])
    metrics = assert_equal_to_reference(tmp_path / "results", tmp_path / "cs", tmp_path)
    by_name = {entry["name"]: entry for entry in metrics["per_class"].values()}
    assert by_name["bicycle"]["ap"] == 0.0
    assert by_name["bus"]["ap"] is None


def test_panoptic_part_equals_pq_compute(scenes: Path, tmp_path: Path) -> None:
    from detr_panoptic.data.cityscapes import convert_cityscapes
    from detr_panoptic.evaluation import pq_compute

    results = tmp_path / "results"
    write_cityscapes_results(scenes, "val", results, seed=2)
    converted = tmp_path / "converted"
    convert_cityscapes(scenes, converted, splits=("val",), workers=1, progress=False)
    json_path = converted / "cityscapes_panoptic_val.json"
    expected = pq_compute(json_path, results / "predictions.json", json_path.with_suffix(""), results / "predictions")
    metrics = evaluate_cityscapes_results(results, scenes, "val", parts=("panoptic",))
    assert math.isclose(metrics["pq"], 100 * expected["All"]["pq"], rel_tol=1e-12)
    assert math.isclose(metrics["rq_things"], 100 * expected["Things"]["rq"], rel_tol=1e-12)
    for key, values in expected["per_class"].items():
        assert math.isclose(metrics["per_class"][str(key)]["pq"], 100 * values["pq"], rel_tol=1e-12, abs_tol=1e-12)
    assert "PQ" in format_cityscapes_table(metrics)


def test_missing_files_are_named(scenes: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    stems = write_cityscapes_results(scenes, "val", results, seed=1)
    (results / "cityscapes" / "semantic" / f"{stems[1]}_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"no semantic result for image {stems[1]}"):
        evaluate_cityscapes_results(results, scenes, "val", parts=("semantic",))
    mask = next((results / "cityscapes" / "instance" / "masks").glob(f"{stems[2]}_0.png"))
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=str(mask)):
        evaluate_cityscapes_results(results, scenes, "val", parts=("instance",))
    shutil.rmtree(results / "cityscapes")
    (results / "predictions" / f"{stems[0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{stems[0]}.png"):
        evaluate_cityscapes_results(results, scenes, "val")


def test_bad_results_are_errors(scenes: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    stems = write_cityscapes_results(scenes, "val", results, seed=1)
    semantic = results / "cityscapes" / "semantic" / f"{stems[0]}_leftImg8bit.png"
    Image.fromarray(np.full((192, 384), 40, np.uint8)).save(semantic)
    with pytest.raises(UserInputError, match="unknown labelIds \\[40\\]"):
        evaluate_cityscapes_results(results, scenes, "val", parts=("semantic",))
    Image.fromarray(np.full((96, 384), 7, np.uint8)).save(semantic)
    with pytest.raises(UserInputError, match="384x96 but the ground truth"):
        evaluate_cityscapes_results(results, scenes, "val", parts=("semantic",))
    listing = results / "cityscapes" / "instance" / f"{stems[0]}_leftImg8bit.txt"
    listing.write_text("../../../outside.png 26 0.5\n")
    with pytest.raises(UserInputError, match="points outside"):
        evaluate_cityscapes_results(results, scenes, "val", parts=("instance",))
    listing.write_text("masks/a.png 26\n")
    with pytest.raises(UserInputError, match="line 1"):
        evaluate_cityscapes_results(results, scenes, "val", parts=("instance",))


def test_command_prints_one_table_and_writes_metrics(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from detr_panoptic.cli import main

    results = tmp_path / "results"
    stems = write_cityscapes_results(scenes, "val", results, seed=1)
    assert main(["cityscapes-eval", str(results), "--cityscapes", str(scenes), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["parts"] == ["panoptic", "semantic", "instance"]
    for key in ("pq", "miou", "iiou", "ap", "ap50"):
        assert f"{metrics[key]:6.1f}" in printed
    (results / "cityscapes" / "semantic" / f"{stems[0]}_leftImg8bit.png").unlink()
    assert main(["cityscapes-eval", str(results), "--cityscapes", str(scenes)]) == 2
    assert f"no semantic result for image {stems[0]}" in capsys.readouterr().err


def test_a_script_without_a_main_guard_does_not_hang(scenes: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    results = tmp_path / "results"
    write_cityscapes_results(scenes, "val", results, seed=1)
    script = tmp_path / "score.py"
    script.write_text("from detr_panoptic.evaluation.cityscapes import evaluate_cityscapes_results\n"
                      f"m = evaluate_cityscapes_results({str(results)!r}, {str(scenes)!r}, 'val', workers=2)\n"
                      "print(round(m['pq'], 6), round(m['ap'], 6))\n")
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    expected = evaluate_cityscapes_results(results, scenes, "val", workers=1)
    assert completed.stdout.split() == [str(round(expected["pq"], 6)), str(round(expected["ap"], 6))]
