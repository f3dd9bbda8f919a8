"""inference.evaluate_dataset (model over a split -> COCO panoptic predictions -> PQ), the ``evaluate`` command,
and the per-class chart."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.cli import main
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.evaluation import pq_compute, read_id_png
from detr_panoptic.inference import PanopticPredictor, PredictorSettings, evaluate_dataset
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.utils.errors import UserInputError
from tests.evaluation.pq_cases import CATEGORIES, reference_pq

TINY_MODEL = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
              "dim_feedforward": 32, "num_queries": 6, "dropout": 0.0, "aux_loss": False}


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    from detr_panoptic.data import convert_cityscapes, make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=0, val=3, size=(64, 128), seed=11)
    convert_cityscapes(root, splits=("val",), workers=1, progress=False)
    return root


def val_dataset(root: Path):
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset

    return cityscapes_panoptic_dataset(root, "val", min_size=64, max_size=128)


class Oracle(torch.nn.Module):
    """A 'model' whose predict returns the ground truth of the images in the order they are given
    (ids renumbered 1..n), so that PQ must be exactly 1 for every category present."""

    def __init__(self, dataset, category_map: CategoryMap) -> None:
        super().__init__()
        self.category_map = category_map
        self.num_classes = category_map.num_classes
        self.queue = []
        for ann in dataset.annotations:
            ids = read_id_png(dataset.panoptic_path(ann)).astype(np.int64)
            renumbered = np.zeros_like(ids)
            segments = []
            for k, segment in enumerate(ann["segments_info"], start=1):
                renumbered[ids == segment["id"]] = k
                segments.append({"id": k, "category_id": segment["category_id"], "score": 1.0})
            self.queue.append(PanopticResult(torch.from_numpy(renumbered), segments))
        self.sizes = []

    def predict(self, images, *, target_sizes):
        self.sizes.extend(tuple(s) for s in target_sizes)
        return [self.queue.pop(0) for _ in images]


class OraclePredictor(PanopticPredictor):
    """The real predictor around an ``Oracle``: its results come straight from the model's ``predict``."""

    def predict_tensors(self, images, orig_sizes):
        return self.model.predict(images, target_sizes=list(orig_sizes))


def evaluate_model(model, dataset, out, *, batch_size=1, device="cpu", **kwargs):
    """``evaluate_dataset`` with a predictor around ``model`` (its categories, the dataset's input size)."""
    settings = PredictorSettings(model.category_map, min_size=dataset.min_size, max_size=dataset.max_size)
    return evaluate_dataset(OraclePredictor(model, settings, device=device), dataset, out, batch_size=batch_size,
                            num_workers=0, **kwargs)


def test_oracle_predictions_score_perfectly(cityscapes, tmp_path):
    dataset = val_dataset(cityscapes)
    model = Oracle(dataset, dataset.category_map)
    out = evaluate_model(model, dataset, tmp_path / "eval", batch_size=2, device="cpu", workers=1, progress=False)
    assert model.sizes == [(64, 128)] * 3  # predictions asked at the original size
    results = out["results"]
    seen = [r for r in results["per_class"].values() if r != {"pq": 0.0, "sq": 0.0, "rq": 0.0}]
    assert seen and all(r == {"pq": 1.0, "sq": 1.0, "rq": 1.0} for r in seen)
    assert results["All"]["pq"] == 1.0
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == [a["image_id"] for a in dataset.annotations]
    assert len(predictions["images"]) == 3
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pq"] == 100.0 and metrics["num_images"] == 3
    # Cityscapes' own formats and scores, from the same results (semantic and instances from the panoptic maps)
    assert metrics["miou"] == 100.0 and metrics["category_miou"] == 100.0
    assert metrics["ap"] in (100.0, None)  # None: no ground-truth instance reaches 100 pixels at 64x128
    assert sorted(p.name for p in (tmp_path / "eval" / "cityscapes" / "semantic").iterdir()) == sorted(
        f"{a['image_id']}.png" for a in dataset.annotations)
    with Image.open(tmp_path / "eval" / "per_class_pq.png") as chart:
        assert chart.size[0] > 300


class Interrupted(Oracle):
    """An ``Oracle`` killed after its first image (the writer's journal then holds that image)."""

    def predict(self, images, *, target_sizes):
        if self.sizes:
            raise KeyboardInterrupt
        return super().predict(images, target_sizes=target_sizes)


def test_a_resumed_evaluation_reuses_files_only_with_the_same_dense_outputs(cityscapes, tmp_path):
    """How the Cityscapes semantic map and instances are made is part of the folder's fingerprint."""
    from detr_panoptic.models.dense_outputs import DenseOutputs

    dataset = val_dataset(cityscapes)
    queries = DenseOutputs(semantic="queries", instances="queries")
    resumed = [queries, DenseOutputs(semantic="panoptic", instances="queries"),
               DenseOutputs(semantic="queries", instances="queries", candidate_threshold=0.3)]
    predicted = []
    for i, dense in enumerate(resumed):
        out = tmp_path / f"eval{i}"
        with pytest.raises(KeyboardInterrupt):
            evaluate_model(Interrupted(dataset, dataset.category_map), dataset, out, dense=queries, workers=1,
                           progress=False, chart=False)
        model = Oracle(dataset, dataset.category_map)
        model.queue = model.queue[1:] if dense == queries else model.queue  # the images left to predict
        metrics = evaluate_model(model, dataset, out, dense=dense, workers=1, progress=False, chart=False)
        assert metrics["metrics"]["pq"] == 100.0
        predicted.append(len(model.sizes))
    assert predicted == [2, 3, 3]  # the same choice resumes; another source or threshold starts over


def test_tiny_model_through_the_evaluate_command(cityscapes, tmp_path, capsys):
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.models.detr import PanopticDETR

    category_map = val_dataset(cityscapes).category_map
    torch.manual_seed(0)
    model = PanopticDETR(category_map.num_classes, **TINY_MODEL)
    checkpoint = save_checkpoint(tmp_path / "tiny.pth", model, category_map=category_map,
                                 model_config=dict(TINY_MODEL, num_classes=category_map.num_classes))
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--cityscapes", str(cityscapes), "--split", "val",
                 "--out", str(out), "--threshold", "0.0", "--batch-size", "2", "--device", "cpu",
                 "--size", "64", "--max-size", "128",
                 "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "All" in printed and "road" in printed
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 3
    for ann in predictions["annotations"]:
        ids = read_id_png(out / "predictions" / ann["file_name"])
        listed = [s["id"] for s in ann["segments_info"]]
        assert 0 not in listed and len(set(listed)) == len(listed)
        assert set(np.unique(ids).tolist()) - {0} == set(listed)
        assert ids.shape == (64, 128)
    assert sum(len(a["segments_info"]) for a in predictions["annotations"]) > 0  # threshold 0 keeps queries
    metrics = json.loads((out / "metrics.json").read_text())
    gt_json = cityscapes / "gtFine" / "cityscapes_panoptic_val.json"
    again = pq_compute(gt_json, out / "predictions.json", cityscapes / "gtFine" / "cityscapes_panoptic_val",
                       out / "predictions", workers=1)
    assert metrics["panopticapi"]["All"] == again["All"]
    assert metrics["checkpoint"] == str(checkpoint)
    assert (out / "per_class_pq.png").is_file()
    assert "mIoU" in printed and "AP" in printed
    for key in ("miou", "iiou", "ap", "ap50"):
        assert key in metrics
    assert all("iou" in entry for entry in metrics["per_class"].values())


def test_model_categories_must_exist_in_the_ground_truth(cityscapes, tmp_path):
    from detr_panoptic.data.categories import coco_category_map

    dataset = val_dataset(cityscapes)
    with pytest.raises(UserInputError, match="does not have"):
        evaluate_model(Oracle(dataset, coco_category_map()), dataset, tmp_path, workers=1, progress=False)


def test_evaluate_without_data_is_a_one_line_error(tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(tmp_path / "x.pth")])
    assert code == 2
    assert "no data to evaluate on" in capsys.readouterr().err


def test_per_class_bar_chart_from_both_metric_forms(make_case, tmp_path):
    from detr_panoptic.evaluation import results_to_metrics
    from detr_panoptic.visualize.charts import per_class_bar_chart, per_class_bar_chart_figure

    case = make_case(3)
    results = reference_pq(case)
    fig = per_class_bar_chart_figure(results, CATEGORIES)
    axis = fig.axes[0]
    labels = [t.get_text() for t in axis.get_xticklabels()]
    assert labels[:3] == ["person", "car", "bicycle"]  # things first
    heights = sorted(round(p.get_height(), 6) for p in axis.patches)
    expected = sorted(round(100 * v[m], 6) for v in results["per_class"].values() for m in ("pq", "sq", "rq"))
    assert heights == expected
    flat = per_class_bar_chart_figure(results_to_metrics(results, CATEGORIES), CATEGORIES)
    assert sorted(round(p.get_height(), 6) for p in flat.axes[0].patches) == expected
    path = per_class_bar_chart(results, CATEGORIES, tmp_path / "chart.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """One intra-op thread for these model runs (the fixture lives in tests/conftest.py)."""


def test_coco_layout_data_from_flags(tmp_path):
    from detr_panoptic.inference.tasks import EvalData, build_eval_dataset
    from tests.evaluation.pq_cases import to_rgb

    (tmp_path / "gt").mkdir()
    (tmp_path / "images").mkdir()
    annotations, images = [], []
    for k in range(2):
        ids = np.full((32, 48), 7000, np.int64)
        ids[4:12, 5 + k:20 + k] = 26001
        Image.fromarray(to_rgb(ids)).save(tmp_path / "gt" / f"{k}.png")
        Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(tmp_path / "images" / f"{k}.jpg")
        images.append({"id": k, "file_name": f"{k}.jpg", "height": 32, "width": 48})
        annotations.append({"image_id": k, "file_name": f"{k}.png", "segments_info": [
            {"id": 7000, "category_id": 7, "iscrowd": 0, "area": int((ids == 7000).sum()), "bbox": [0, 0, 48, 32]},
            {"id": 26001, "category_id": 26, "iscrowd": 0, "area": 120, "bbox": [5 + k, 4, 15, 8]}]})
    categories = [{"id": 7, "name": "road", "isthing": 0}, {"id": 26, "name": "car", "isthing": 1}]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                  "categories": categories}))
    dataset = build_eval_dataset(EvalData(gt_json=str(tmp_path / "gt.json"), image_dir=str(tmp_path / "images")))
    assert dataset.panoptic_dir == tmp_path / "gt"
    out = evaluate_model(Oracle(dataset, CategoryMap.from_coco_json(categories)), dataset, tmp_path / "eval",
                         workers=1, progress=False, chart=False, limit=1)
    assert out["num_images"] == 1 and out["results"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    # a generic COCO-panoptic dataset: mIoU over all categories and COCO mask AP of the things
    assert out["metrics"]["miou"] == 100.0 and out["metrics"]["mask_ap"] == pytest.approx(100.0)
    assert out["metrics"]["per_class"]["26"]["iou"] == 100.0 and "mask AP 100.0" in out["table"]
    with pytest.raises(UserInputError, match="--image-dir"):
        build_eval_dataset(EvalData(gt_json=str(tmp_path / "gt.json")))
