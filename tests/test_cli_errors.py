"""Odd and bad inputs through the command line, as a user meets them (the table of docs/inputs.md
points at these tests).

Odd inputs that can be used are used; bad ones give exit status 2 and one line on stderr naming the file
or key and what is wrong, no traceback, and nothing half-written. ``check-dataset`` reports the problems
it finds in a dataset as lines on stdout with exit status 1 (its documented contract), and status 2 when
it cannot read the dataset at all.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detr_panoptic.cli import main

TINY_MODEL = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
              "dim_feedforward": 32, "num_queries": 6, "dropout": 0.0, "aux_loss": False}
SMALL = ["--size", "64", "--max-size", "128", "--device", "cpu"]


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str, code: int = 2) -> str:
    """Run the CLI; assert the exit status and one error line holding every needle; return the line.
    (Log lines of the work done before the error may precede it on stderr.)"""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(f"detr-panoptic {argv[0]}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detr_panoptic.data import convert_cityscapes, make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=2, val=2, size=(64, 128), seed=5)
    convert_cityscapes(root, splits=("train", "val"), workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(cityscapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.models.detr import PanopticDETR

    category_map = cityscapes_panoptic_dataset(cityscapes, "val", min_size=64, max_size=128).category_map
    torch.manual_seed(0)
    model = PanopticDETR(category_map.num_classes, **TINY_MODEL)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model, category_map=category_map,
                           model_config=dict(TINY_MODEL, num_classes=category_map.num_classes))


@pytest.fixture
def tree(cityscapes: Path, tmp_path: Path) -> Path:
    """A private copy of the converted tree, to damage."""
    shutil.copytree(cityscapes, tmp_path / "cs")
    return tmp_path / "cs"


def write_empty_split(root: Path, split: str = "empty") -> None:
    gtfine = root / "gtFine"
    data = json.loads((gtfine / "cityscapes_panoptic_val.json").read_text())
    data["images"], data["annotations"] = [], []
    (gtfine / f"cityscapes_panoptic_{split}.json").write_text(json.dumps(data))
    (gtfine / f"cityscapes_panoptic_{split}").mkdir()


# -- train -------------------------------------------------------------------------------------------
def train_config(tmp_path: Path, root: Path, **sections) -> dict:
    config = {"name": "t", "model": dict(TINY_MODEL), "logging": {"tensorboard": False, "progress": False},
              "data": {"dataset": "cityscapes", "root": str(root), "min_size": 64, "max_size": 128, "workers": 0},
              "train": {"output_dir": str(tmp_path / "runs"), "max_steps": 1, "epochs": 1, "device": "cpu"}}
    for key, value in sections.items():
        config[key] = value if not isinstance(value, dict) else {**config.get(key, {}), **value}
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("stage2, key", [
    ({"freeze": {"first_layers": "two"}}, "stages[1].freeze.first_layers must be an integer, got 'two'"),
    ({"train": {"lr": "fast"}}, "stages[1].train.lr must be a number, got 'fast'"),
    ({"model": {"backbone": "resnet9"}}, "stages[1].model.backbone must be one of"),
    ({"train": {"warmup": 5}}, "unknown key stages[1].train.warmup"),
])
def test_train_wrong_value_deep_in_a_stage(cityscapes, tmp_path, capsys, stage2, key):
    config = train_config(tmp_path, cityscapes, stages=[{"name": "stage1"}, {"name": "stage2", **stage2}])
    path = write_config(tmp_path / "chained.yaml", config)
    fails(["train", str(path)], capsys, str(path), "stage 'stage2'", key)
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback_of_a_bad_input(cityscapes, tmp_path):
    from detr_panoptic.utils.errors import UserInputError

    config = train_config(tmp_path, cityscapes, stages=[{"name": "s1", "train": {"lr": "fast"}}])
    with pytest.raises(UserInputError, match=r"stage 's1': stages\[0\]\.train\.lr"):
        main(["--debug", "train", str(write_config(tmp_path / "c.yaml", config))])


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_train_output_folder_that_cannot_be_made(cityscapes, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    output_dir = blocker if where == "file" else blocker / "runs"
    path = write_config(tmp_path / "c.yaml", train_config(tmp_path, cityscapes, train={"output_dir": str(output_dir)}))
    fails(["train", str(path)], capsys, str(output_dir), "not a folder")
    assert blocker.read_text() == "a file, not a folder" and files_under(tmp_path) == sorted([blocker, path])


def test_train_output_folder_without_write_permission(cityscapes, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    path = write_config(tmp_path / "c.yaml", train_config(tmp_path, cityscapes, train={"output_dir": str(locked / "run")}))
    if os.geteuid() == 0:  # root writes anywhere: let the permission check see what a user would get
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    else:
        locked.chmod(0o500)
    try:
        fails(["train", str(path)], capsys, str(locked / "run"), "permission denied")
    finally:
        locked.chmod(0o700)
    assert not any(locked.iterdir())


@pytest.mark.parametrize("which", ["train_split", "val_split"])
def test_train_empty_split(tree, tmp_path, capsys, which):
    write_empty_split(tree)
    path = write_config(tmp_path / "c.yaml", train_config(tmp_path, tree, data={which: "empty"}))
    fails(["train", str(path)], capsys, "cityscapes_panoptic_empty.json", "no images")
    assert not (tmp_path / "runs").exists()


def test_train_unknown_split(cityscapes, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", train_config(tmp_path, cityscapes))
    fails(["train", str(path), "--set", "data.train_split=nosuch"], capsys, "cityscapes_panoptic_nosuch.json",
          "convert-cityscapes")
    assert not (tmp_path / "runs").exists()


def test_train_config_not_found_lists_the_shipped_names(tmp_path, capsys):
    fails(["train", "cityscapes/recipe"], capsys, "cityscapes/recipe", "cityscapes/recipe_two_stages")


# -- convert-cityscapes -------------------------------------------------------------------------------
def test_convert_empty_gtfine_folder(tmp_path, capsys):
    (tmp_path / "gtFine").mkdir()
    fails(["convert-cityscapes", str(tmp_path / "gtFine"), "--no-progress"], capsys,
          "no instance id files for split 'val'", str(tmp_path / "gtFine" / "val"))
    assert files_under(tmp_path) == [] and sorted(tmp_path.iterdir()) == [tmp_path / "gtFine"]


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "corrupt or truncated"),
    (lambda data: b"GIF89a and more", "not a PNG (it starts with b'GIF89a a')"),
    (lambda data: b"", "an empty file"),
])
def test_convert_corrupt_instance_ids_png(cityscapes, tmp_path, capsys, damage, message):
    shutil.copytree(cityscapes / "gtFine" / "val", tmp_path / "gtFine" / "val")
    bad = min((tmp_path / "gtFine" / "val").glob("*/*_instanceIds.png"))
    bad.write_bytes(damage(bad.read_bytes()))
    fails(["convert-cityscapes", str(tmp_path / "gtFine"), "--splits", "val", "--no-progress", "--workers", "1"],
          capsys, str(bad), message)
    out = tmp_path / "gtFine"
    assert not (out / "cityscapes_panoptic_val.json").exists()
    # What stays is whole: finished images (kept for the rerun) and no temporary file.
    assert not [p for p in out.rglob(".*.tmp*")]
    for png in (out / "cityscapes_panoptic_val").glob("*.png"):
        Image.open(png).load()


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_convert_unwritable_output(cityscapes, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    output = blocker if where == "file" else blocker / "out"
    fails(["convert-cityscapes", str(cityscapes / "gtFine"), "--splits", "val", "--output", str(output),
           "--no-progress"], capsys, f"output folder {output}", "not a folder")
    assert files_under(tmp_path) == [blocker]


def test_convert_output_without_write_permission(cityscapes, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    else:
        locked.chmod(0o500)
    try:
        fails(["convert-cityscapes", str(cityscapes / "gtFine"), "--splits", "val", "--output", str(locked / "out"),
               "--no-progress"], capsys, str(locked / "out"), "permission denied")
    finally:
        locked.chmod(0o700)
    assert not any(locked.iterdir())


# -- check-dataset ------------------------------------------------------------------------------------
def test_check_dataset_missing_png(tree, capsys):
    png = min((tree / "gtFine" / "cityscapes_panoptic_val").glob("*.png"))
    png.unlink()
    assert main(["check-dataset", "--cityscapes", str(tree), "--split", "val", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"panoptic PNG {png} is missing" in out and "1 problem(s)" in out


def test_check_dataset_wrong_size_png(tree, capsys):
    png = min((tree / "gtFine" / "cityscapes_panoptic_val").glob("*.png"))
    with Image.open(png) as image:
        image.crop((0, 0, 100, 50)).save(png)
    assert main(["check-dataset", "--cityscapes", str(tree), "--split", "val", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{png}: size 50x100 differs from the image record's 64x128" in out


def test_check_dataset_json_that_is_not_json(tree, capsys):
    json_path = tree / "gtFine" / "cityscapes_panoptic_val.json"
    json_path.write_text('{"images": [')
    fails(["check-dataset", "--json", str(json_path), "--panoptic-dir", str(tree / "gtFine" / "cityscapes_panoptic_val")],
          capsys, str(json_path), "not valid JSON")
    fails(["check-dataset", "--cityscapes", str(tree), "--split", "val"], capsys, str(json_path), "not valid JSON")


def test_check_dataset_json_without_the_coco_lists(tree, capsys):
    json_path = tree / "gtFine" / "cityscapes_panoptic_val.json"
    json_path.write_text('{"images": []}')
    fails(["check-dataset", "--cityscapes", str(tree), "--split", "val"], capsys, str(json_path), "'annotations'")


# -- evaluate -----------------------------------------------------------------------------------------
def test_evaluate_empty_split(tree, checkpoint, tmp_path, capsys):
    write_empty_split(tree)
    fails(["evaluate", "--checkpoint", str(checkpoint), "--cityscapes", str(tree), "--split", "empty",
           "--out", str(tmp_path / "eval"), "--workers", "1", *SMALL], capsys,
          "cityscapes_panoptic_empty.json", "no images")
    assert files_under(tmp_path / "eval") == []


def test_evaluate_unknown_split(cityscapes, checkpoint, tmp_path, capsys):
    fails(["evaluate", "--checkpoint", str(checkpoint), "--cityscapes", str(cityscapes), "--split", "nosuch",
           "--out", str(tmp_path / "eval"), "--workers", "1", *SMALL], capsys,
          "cityscapes_panoptic_nosuch.json", "convert-cityscapes")
    assert files_under(tmp_path / "eval") == []


def test_evaluate_images_missing(tree, checkpoint, tmp_path, capsys):
    image = min((tree / "leftImg8bit" / "val").glob("*/*.png"))
    image.unlink()
    fails(["evaluate", "--checkpoint", str(checkpoint), "--cityscapes", str(tree), "--split", "val",
           "--out", str(tmp_path / "eval"), "--workers", "1", *SMALL], capsys, str(image), "is missing")
    assert files_under(tmp_path / "eval") == []


# -- predict ------------------------------------------------------------------------------------------
def odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images in unusual modes that predict must take; name -> (height, width) as displayed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 56), dtype=np.uint16)).save(folder / "gray16.png")
    rotated = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (90, 120, 30)).save(folder / "one_pixel.png")
    return {"gray": (40, 56), "rgba": (40, 56), "palette": (40, 56), "cmyk": (40, 56), "gray16": (40, 56),
            "exif": (56, 40), "one_pixel": (1, 1)}


def test_predict_takes_odd_images(checkpoint, tmp_path, capsys):
    expected = odd_images(tmp_path / "in")
    with Image.open(tmp_path / "in" / "gray16.png") as image:
        assert image.mode.startswith("I;16")  # what the test means to feed
    with Image.open(tmp_path / "in" / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0.0",
                 *SMALL, str(tmp_path / "in")]) == 0
    for name, (height, width) in expected.items():
        with Image.open(out / "predictions" / f"{name}.png") as png:
            assert png.size == (width, height), name  # at the displayed size (EXIF applied)
    data = json.loads((out / "predictions.json").read_text())
    assert sorted(a["file_name"] for a in data["annotations"]) == sorted(f"{n}.png" for n in expected)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "text_named_jpg"])
def test_predict_refuses_unreadable_images(checkpoint, tmp_path, capsys, kind):
    bad = tmp_path / "in" / "bad.jpg"
    bad.parent.mkdir()
    if kind == "truncated_jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[:600])
    else:
        bad.write_text("just some notes, not a picture\n")
    out = tmp_path / "out"
    fails(["predict", "--checkpoint", str(checkpoint), "--out", str(out), *SMALL, str(bad)], capsys, str(bad))
    assert not (out / "predictions.json").exists() and not list(out.rglob("*.png"))
    # --skip-bad: skipped with a warning naming it, the good image predicted.
    Image.new("RGB", (48, 32), (10, 200, 30)).save(tmp_path / "in" / "good.png")
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--skip-bad", *SMALL,
                 str(tmp_path / "in")]) == 0
    assert "bad.jpg" in capsys.readouterr().err
    data = json.loads((out / "predictions.json").read_text())
    assert [a["file_name"] for a in data["annotations"]] == ["good.png"]


@pytest.mark.parametrize("kind", [
    "resnet_state_dict",
    "truncated_pth",
])
def test_predict_refuses_a_checkpoint_that_is_not_one(checkpoint, tmp_path, capsys, kind):
    import torchvision

    image = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (10, 200, 30)).save(image)
    weights = tmp_path / "weights.pth"
    if kind == "resnet_state_dict":
        torch.save(torchvision.models.resnet18().state_dict(), weights)
    else:
        data = checkpoint.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    fails(["predict", "--checkpoint", str(weights), "--out", str(out), *SMALL, str(image)], capsys, str(weights))
    assert files_under(out) == []
