"""The predict / attention / plot / report commands end to end, with a tiny random PanopticDETR saved
through the checkpoint code, on generated images and on the COCO sample images."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.cli import main
from detr_panoptic.data.categories import Category, CategoryMap

CATEGORIES = CategoryMap.contiguous([
    Category(1, "person", True, (220, 20, 60)),
    Category(3, "car", True, (0, 0, 142)),
    Category(7, "road", False, (128, 64, 128)),
    Category(9, "sky", False, (70, 130, 180)),
])
TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 8, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 64, "num_queries": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("detr_panoptic.models.postprocess", reason="PanopticDETR.predict needs models.postprocess")
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(CATEGORIES.num_classes, **TINY).eval()
    with torch.no_grad():  # confident, varied classes: most queries are kept, several categories appear
        model.detr.class_embed.weight.normal_(0, 3.0)
        model.detr.class_embed.bias.copy_(torch.tensor([4.0, 4.0, 4.0, 4.0, -10.0]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model, category_map=CATEGORIES, model_config=None)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.jpg": (96, 64), "tall.png": (48, 80)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_predict_resizes_to_the_checkpoints_training_size(checkpoint, images, tmp_path, monkeypatch):
    from detr_panoptic import inference
    from detr_panoptic.checkpoints import load_pretrained, save_checkpoint

    model = load_pretrained(checkpoint)
    recorded = tmp_path / "recorded.pth"
    save_checkpoint(recorded, model, category_map=CATEGORIES, model_config=None,
                    input_size={"min_size": 40, "max_size": 72})
    seen = []
    real = inference.predict_to_folder
    monkeypatch.setattr(inference, "predict_to_folder",
                        lambda predictor, *args, **kwargs: seen.append((predictor.settings.min_size,
                                                                        predictor.settings.max_size))
                        or real(predictor, *args, **kwargs))
    assert main(["predict", "-c", str(recorded), str(images), "--out", str(tmp_path / "a")]) == 0
    assert main(["predict", "-c", str(checkpoint), str(images), "--out", str(tmp_path / "b")]) == 0
    assert main(["predict", "-c", str(recorded), "--size", "32", str(images), "--out", str(tmp_path / "c")]) == 0
    # recorded; none recorded: DETR's default; given: it wins (the other side still from the checkpoint)
    assert seen == [(40, 72), (800, 1333), (32, 72)]


def _ids(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def check_predictions(out, expected_sizes):
    data = json.loads((out / "predictions.json").read_text())
    assert {c["id"] for c in data["categories"]} == {c.id for c in CATEGORIES.categories}
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    assert sorted(sizes.values()) == sorted(expected_sizes)
    total_segments = 0
    for annotation in data["annotations"]:
        ids = _ids(out / "predictions" / annotation["file_name"])
        assert (ids.shape[1], ids.shape[0]) == sizes[annotation["image_id"]]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in annotation["segments_info"]}
        for segment in annotation["segments_info"]:
            assert segment["area"] == int((ids == segment["id"]).sum())
            assert 0.5 < segment["score"] <= 1.0
        total_segments += len(annotation["segments_info"])
        overlay = Image.open(out / "overlays" / annotation["file_name"])
        width, height = sizes[annotation["image_id"]]
        factor = -(-400 // min(width, height))  # small images are drawn enlarged (draw_panoptic's min_side)
        assert overlay.size == (width * factor, height * factor)
    assert total_segments > 0, "the tiny model should keep some queries"
    return data


def test_predict_cli_on_generated_images(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", "-c", str(checkpoint), "--threshold", "0.5", "--size", "64", "--max-size", "128",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out), str(images)])
    assert code == 0
    assert "predicted 2 image(s)" in capsys.readouterr().out
    check_predictions(out, [(96, 64), (48, 80)])


def test_predict_cli_on_the_coco_sample(checkpoint, coco_sample, tmp_path):
    out = tmp_path / "out"
    pattern = str(coco_sample / "input_images" / "*.jpg")
    assert main(["predict", "-c", str(checkpoint), "--threshold", "0.5", "--size", "96", "--max-size", "160",
                 "--out", str(out), pattern]) == 0
    data = check_predictions(out, [(640, 427), (640, 360)])
    assert sorted(a["image_id"] for a in data["annotations"]) == [142238, 439180]  # COCO ids from file names


def test_predict_cli_bad_inputs(checkpoint, images, tmp_path, capsys):
    broken = images / "broken.jpg"
    broken.write_bytes(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["predict", "-c", str(checkpoint), "--size", "32", "--max-size", "64", "--threshold", "0.5"]
    assert main(base + ["--out", str(tmp_path / "a"), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), str(empty)]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c"), str(images)]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "c" / "predictions.json").exists()
    assert main(base + ["--skip-bad", "--out", str(tmp_path / "d"), str(images), str(tmp_path / "missing.jpg")]) == 0
    assert "skipped 1" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "d" / "predictions.json").read_text())["annotations"]) == 2
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(broken, only_bad / "x.jpg")
    assert main(base + ["--skip-bad", "--out", str(tmp_path / "e"), str(only_bad)]) == 2
    assert "no image could be processed" in capsys.readouterr().err


def test_attention_cli_writes_figures(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "attention"
    assert main(["attention", "-c", str(checkpoint), str(images / "wide.jpg"), "--threshold", "0.5",
                 "--size", "64", "--max-size", "128", "--per-head", "--points", "3", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "encoder.png" in names and "masks.png" in names and "overlay.png" in names
    assert "queries_01.png" in names
    for name in ("queries_01.png", "encoder.png", "masks.png"):
        assert Image.open(out / name).size[0] > 300
    assert Image.open(out / "overlay.png").size == (96 * 7, 64 * 7)  # enlarged to a shorter side >= 400
    assert "kept quer" in capsys.readouterr().out


def test_attention_cli_missing_image(checkpoint, tmp_path, capsys):
    assert main(["attention", "-c", str(checkpoint), str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_plot_and_report_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": 1.0 / s, "loss_ce": 0.5 / s} for s in range(1, 4)]
    records.append({"kind": "val", "step": 3, "epoch": 0, "pq": 12.0, "sq": 60.0, "rq": 20.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "losses.png").is_file() and (run / "plots" / "pq.png").is_file()
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64") == 2 and "12.00" in page  # curves drawn once, not twice
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
