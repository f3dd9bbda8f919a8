"""Inference plumbing: inputs, loading, outputs, attention; with fake models behind the real predictor."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.data.categories import Category, CategoryMap
from detr_panoptic.data.transforms import detr_resize_size
from detr_panoptic.inference import (
    PanopticPredictor,
    PredictorSettings,
    expand_inputs,
    load_image,
    predict_to_folder,
)
from detr_panoptic.inference.samples import unique_names
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.utils.devices import resolve_device
from detr_panoptic.utils.errors import UserInputError

CATEGORIES = CategoryMap.contiguous([Category(1, "car", True, (0, 0, 142)), Category(7, "road", False, (128, 64, 128))])


def write_image(path, size=(40, 30), color=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


class FakeModel(torch.nn.Module):
    """``predict`` returns road on the left half and a car in the top-right quarter, at target size (through
    ``FakePredictor``: results straight from the model, no network, no post-processing)."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def predict(self, images, *, threshold, target_sizes):
        self.calls.append({"batch": len(images), "shapes": [tuple(i.shape) for i in images],
                           "sizes": list(target_sizes), "threshold": threshold})
        results = []
        for height, width in target_sizes:
            id_map = torch.zeros((height, width), dtype=torch.long)
            id_map[:, : width // 2] = 1
            id_map[: height // 2, width // 2:] = 2
            results.append(PanopticResult(id_map, [
                {"id": 1, "category_id": 7, "isthing": False, "area": 0, "score": 0.9, "query": 3},
                {"id": 2, "category_id": 1, "isthing": True, "area": 0, "score": 0.95, "query": 5},
                {"id": 3, "category_id": 1, "isthing": True, "area": 0, "score": 0.86, "query": 8},  # area 0
            ]))
        return results


class FakePredictor(PanopticPredictor):
    """The real predictor (preprocessing, batching, attention) with the model's canned results."""

    def predict_tensors(self, images, orig_sizes):
        return self.model.predict(images, threshold=self.settings.threshold, target_sizes=list(orig_sizes))


def predictor(model=None, **settings):
    sizes = {"min_size": settings.pop("size", 16), "max_size": settings.pop("max_size", 1333)}
    return FakePredictor(model or FakeModel(), PredictorSettings(CATEGORIES, **sizes, **settings), device="cpu")


# -- inputs ----------------------------------------------------------------------------------------
def test_expand_inputs_files_folders_globs(tmp_path):
    a = write_image(tmp_path / "in" / "a.jpg")
    b = write_image(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    c = write_image(tmp_path / "deep" / "x" / "c.png")
    found = expand_inputs([str(tmp_path / "in"), str(tmp_path / "deep" / "**" / "*.png"), str(a)])
    assert found == [a.resolve(), b.resolve(), c.resolve()]


def test_missing_empty_and_unreadable_inputs_give_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        expand_inputs([str(tmp_path / "nope.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty.*no images"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match=r"\*\.jpg"):
        expand_inputs([str(tmp_path / "*.jpg")])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(UserInputError, match="cannot read image .*broken.jpg"):
        load_image(broken)


def test_skip_bad_warns_and_keeps_going(tmp_path, caplog):
    good = write_image(tmp_path / "good.png")
    (tmp_path / "empty").mkdir()
    assert expand_inputs([str(tmp_path / "missing.png"), str(tmp_path / "empty"), str(good)],
                         skip_bad=True) == [good.resolve()]
    assert "missing.png" in caplog.text and "empty" in caplog.text
    with pytest.raises(UserInputError, match="no input images"):
        expand_inputs([str(tmp_path / "missing.png")], skip_bad=True)


def test_load_image_applies_exif_rotation(tmp_path):
    image = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_resized_shape_follows_the_reference_rule():
    assert detr_resize_size(1024, 2048, 800, 1333) == (666, 1332)  # round(666.5) == 666, as in the reference
    assert detr_resize_size(480, 640, 800, 1333) == (800, 1066)
    assert detr_resize_size(800, 600, 800, None) == (1066, 800)
    assert detr_resize_size(600, 800, 600, 1333) == (600, 800)


# -- outputs ---------------------------------------------------------------------------------------
def test_unique_names():
    from pathlib import Path
    assert unique_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg"), Path("c/x.jpg")]) == ["x", "x-2", "y", "x-3"]
    assert unique_names([Path("x.jpg"), Path("x.png"), Path("x-2.jpg")]) == ["x", "x-2", "x-2-2"]


def _decode(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def test_predict_to_folder_writes_pngs_overlays_and_json(tmp_path):
    write_image(tmp_path / "in" / "000000000042.jpg", size=(40, 30))
    write_image(tmp_path / "in" / "street.png", size=(50, 20))
    model = FakeModel()
    summary = predict_to_folder(predictor(model, size=16, max_size=64), [str(tmp_path / "in")], tmp_path / "out",
                                batch_size=2, progress=False, num_workers=0)
    assert len(summary.processed) == 2 and model.calls[0]["batch"] == 2
    assert model.calls[0]["sizes"] == [(30, 40), (20, 50)]
    assert model.calls[0]["shapes"] == [(3, 16, 21), (3, 16, 40)]
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 7]
    assert [a["image_id"] for a in data["annotations"]] == [42, "street"]
    for annotation, image in zip(data["annotations"], data["images"]):
        assert annotation["image_id"] == image["id"]
        ids = _decode(tmp_path / "out" / "predictions" / annotation["file_name"])
        assert ids.shape == (image["height"], image["width"])
        assert set(np.unique(ids)) - {0} == {s["id"] for s in annotation["segments_info"]} == {1, 2}
        for segment in annotation["segments_info"]:
            assert segment["area"] == int((ids == segment["id"]).sum())
        overlay = Image.open(tmp_path / "out" / "overlays" / annotation["file_name"])
        factor = -(-400 // min(image["width"], image["height"]))  # small images are drawn enlarged
        assert overlay.size == (image["width"] * factor, image["height"] * factor)


def test_image_ids_stay_unique(tmp_path):
    write_image(tmp_path / "in" / "0139.png")
    write_image(tmp_path / "in" / "139.png")
    predict_to_folder(predictor(), [str(tmp_path / "in")], tmp_path / "out", progress=False)
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [a["image_id"] for a in data["annotations"]] == [139, "139"]


def test_predict_to_folder_bad_inputs(tmp_path, caplog):
    good = write_image(tmp_path / "good.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="broken.jpg"):
        predict_to_folder(predictor(), [str(good), str(broken)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "predictions.json").exists()
    summary = predict_to_folder(predictor(), [str(good), str(broken)], tmp_path / "out", progress=False,
                                skip_bad=True)
    assert [p.name for p in summary.processed] == ["good.png"]
    assert [p.name for p, _ in summary.skipped] == ["broken.jpg"] and "broken.jpg" in caplog.text
    with pytest.raises(UserInputError, match="no image could be processed"):
        predict_to_folder(predictor(), [str(broken)], tmp_path / "out2", progress=False, skip_bad=True)


@pytest.mark.parametrize("options, message", [
    ({"threshold": 1.5}, "threshold"), ({"size": 0}, "size"), ({"size": 800, "max_size": 100}, "max size"),
    ({"merge_stuff": "blend"}, "merge_stuff"), ({"min_area": -1}, "min_area"),
])
def test_bad_settings_fail_before_any_work(tmp_path, options, message):
    with pytest.raises(UserInputError, match=message):
        predictor(**options)
    good = write_image(tmp_path / "good.png")
    with pytest.raises(UserInputError, match="batch size"):
        predict_to_folder(predictor(), [str(good)], tmp_path / "out", progress=False, batch_size=0)
    assert not (tmp_path / "out").exists()


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(UserInputError, match="device"):
        resolve_device("tpu:banana")


class FakeAttentionModel(FakeModel):
    """``forward(return_attention=True)`` with hand-set logits, boxes, masks and attention maps."""

    def forward(self, images, *, return_attention=False, mask_queries=None):
        from detr_panoptic.models.outputs import DETROutput

        (image,) = images
        feat_h, feat_w = -(-image.shape[1] // 32), -(-image.shape[2] // 32)
        logits = torch.tensor([[[9.0, 0.0, 0.0],     # query 0: class 0 (car), kept
                                [0.0, 0.0, 9.0],     # query 1: no object
                                [0.0, 0.4, 0.0]]])   # query 2: road but below the threshold
        boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]]])
        masks = torch.full((1, 3, -(-image.shape[1] // 4), -(-image.shape[2] // 4)), -5.0)
        masks[0, 0, :2] = 5.0
        cross = torch.arange(2 * 3 * feat_h * feat_w, dtype=torch.float).reshape(1, 2, 3, feat_h * feat_w)
        encoder = torch.rand(1, 2, feat_h * feat_w, feat_h * feat_w)
        output = DETROutput(pred_logits=logits, pred_boxes=boxes, image_sizes=[tuple(image.shape[-2:])],
                            attentions={"decoder_cross": [cross * 0, cross], "encoder_self": encoder,
                                        "feature_size": (feat_h, feat_w)})
        selected = [torch.as_tensor(q, dtype=torch.long) for q in mask_queries(output)]
        output.pred_masks, output.mask_queries = masks[0, selected[0]], selected
        return output


def test_compute_attention_keeps_confident_queries_and_reshapes_maps():
    image = Image.new("RGB", (100, 60))
    maps = predictor(FakeAttentionModel(), size=64, max_size=200).attention(image)
    assert maps.queries.tolist() == [0] and maps.category_ids.tolist() == [1]
    feat_h, feat_w = maps.feature_size
    assert (feat_h, feat_w) == (2, 4)                                  # a 64 x 107 input at stride 32
    expected = torch.arange(2 * 3 * 8, dtype=torch.float).reshape(2, 3, 2, 4)[:, 0]
    assert torch.equal(maps.decoder[0], expected)                      # last layer, query 0, every head
    assert maps.encoder.shape == (2, 4, 2, 4)
    assert torch.allclose(maps.boxes[0], torch.tensor([25.0, 15.0, 75.0, 45.0]))
    assert maps.masks.shape == (1, 60, 100) and maps.masks[0, 0, 0] > 0.9 and maps.masks[0, -1, -1] < 0.1
    assert maps.result is not None and maps.result.id_map.shape == (60, 100)


def test_attention_with_no_kept_query_still_draws(tmp_path):
    from detr_panoptic.visualize.attention import write_attention_figures

    image = Image.new("RGB", (100, 60))
    maps = predictor(FakeAttentionModel(), size=64, max_size=200, threshold=0.99999).attention(image)
    assert len(maps.queries) == 0 and maps.decoder.shape[:2] == (0, 2) and maps.masks.shape == (0, 60, 100)
    written = write_attention_figures(maps, tmp_path, CATEGORIES, points=2)
    assert [p.name for p in written] == ["queries_01.png", "encoder.png", "masks.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_loader_workers_give_the_same_files_in_order(tmp_path):
    paths = [write_image(tmp_path / "in" / f"{i:02d}.png", size=(16 + i, 12)) for i in range(5)]
    one = predict_to_folder(predictor(), [str(tmp_path / "in")], tmp_path / "a", progress=False, num_workers=0,
                            overlays=False)
    two = predict_to_folder(predictor(), [str(tmp_path / "in")], tmp_path / "b", progress=False, num_workers=2,
                            overlays=False, batch_size=2)
    assert one.processed == two.processed == [p.resolve() for p in paths]
    a = json.loads((tmp_path / "a" / "predictions.json").read_text())
    b = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
    for annotation in a["annotations"]:
        assert (_decode(tmp_path / "a" / "predictions" / annotation["file_name"])
                == _decode(tmp_path / "b" / "predictions" / annotation["file_name"])).all()


def test_predict_writes_cityscapes_formats(tmp_path):
    from detr_panoptic.utils.png_grey import read_grey8_png, read_mask_pixels

    write_image(tmp_path / "in" / "berlin_000001_000019_leftImg8bit.png", size=(40, 30))
    predict_to_folder(predictor(size=16, max_size=64), [str(tmp_path / "in")], tmp_path / "out", progress=False,
                      num_workers=0, overlays=False, cityscapes=True)
    stem = "berlin_000001_000019_leftImg8bit"
    labels = read_grey8_png(tmp_path / "out" / "cityscapes" / "semantic" / f"{stem}.png")
    assert labels.shape == (30, 40)
    assert (labels[:, :20] == 7).all() and (labels[:15, 20:] == 26).all() and (labels[15:, 20:] == 0).all()
    lines = (tmp_path / "out" / "cityscapes" / "instance" / f"{stem}.txt").read_text().splitlines()
    assert lines[0] == f"masks/{stem}_0.png 26 0.950000"
    shape, pixels = read_mask_pixels(tmp_path / "out" / "cityscapes" / "instance" / "masks" / f"{stem}_0.png")
    expected = np.zeros((30, 40), bool)
    expected[:15, 20:] = True
    assert shape == (30, 40) and np.array_equal(pixels, np.flatnonzero(expected))


def test_cityscapes_format_needs_cityscapes_categories(tmp_path):
    write_image(tmp_path / "in" / "a.png")
    other = CategoryMap.contiguous([Category(1, "car", True, (0, 0, 142)), Category(90, "toaster", False, (1, 2, 3))])
    model = FakeModel()
    with pytest.raises(UserInputError, match="toaster"):
        predict_to_folder(PanopticPredictor(model, PredictorSettings(other, min_size=16, max_size=64), device="cpu"),
                          [str(tmp_path / "in")], tmp_path / "out", progress=False, num_workers=0, cityscapes=True)
