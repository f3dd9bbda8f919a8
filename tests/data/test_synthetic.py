"""Synthetic Cityscapes trees: layout, determinism, label content, accepted by the real tools."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.cli import main
from detr_panoptic.data.synthetic import (
    SceneOptions,
    _split_seed,
    make_synthetic_cityscapes,
    parse_size,
    synthetic_sample,
)
from detr_panoptic.utils.errors import UserInputError

labels_module = pytest.importorskip("cityscapesscripts.helpers.labels")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_names(tmp_path: Path) -> None:
    make_synthetic_cityscapes(tmp_path, train=2, val=1, size=(64, 128), seed=3)
    images = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "leftImg8bit").rglob("*.png"))
    assert images == ["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
                      "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png",
                      "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"]
    gt = tmp_path / "gtFine" / "val" / "frankfurt"
    names = sorted(p.name for p in gt.iterdir())
    assert names == [f"frankfurt_000000_000019_gtFine_{kind}" for kind in
                     ("color.png", "instanceIds.png", "labelIds.png", "polygons.json")]
    ids_png = Image.open(gt / "frankfurt_000000_000019_gtFine_instanceIds.png")
    assert ids_png.mode.startswith("I;16")
    ids = np.asarray(ids_png)
    label_ids = np.asarray(Image.open(gt / "frankfurt_000000_000019_gtFine_labelIds.png"))
    assert label_ids.dtype == np.uint8 and ids.shape == label_ids.shape == (64, 128)
    np.testing.assert_array_equal(np.where(ids < 1000, ids, ids // 1000), label_ids)
    rgb = Image.open(tmp_path / images[2])
    assert rgb.mode == "RGB" and rgb.size == (128, 64)
    polygons = json.loads((gt / "frankfurt_000000_000019_gtFine_polygons.json").read_text())
    assert polygons["imgHeight"] == 64 and polygons["imgWidth"] == 128
    known = {label.name for label in labels_module.labels}
    for obj in polygons["objects"]:
        assert obj["label"] in known or obj["label"].removesuffix("group") in known
        assert len(obj["polygon"]) >= 3
    from cityscapesscripts.helpers.annotation import Annotation

    annotation = Annotation()
    annotation.fromJsonFile(str(gt / "frankfurt_000000_000019_gtFine_polygons.json"))
    assert (annotation.imgHeight, annotation.imgWidth) == (64, 128) and annotation.objects


def test_deterministic_per_seed(tmp_path: Path) -> None:
    make_synthetic_cityscapes(tmp_path / "a", train=1, val=1, size=(48, 96), seed=7)
    make_synthetic_cityscapes(tmp_path / "b", train=1, val=1, size=(48, 96), seed=7, workers=2)
    make_synthetic_cityscapes(tmp_path / "c", train=1, val=1, size=(48, 96), seed=8)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_scene_content_over_many_seeds() -> None:
    defined = {label.id for label in labels_module.labels}
    things = {label.id for label in labels_module.labels if label.hasInstances}
    seen_classes: set[int] = set()
    crowd = ignored = 0
    for seed in range(24):
        rgb, ids, _ = synthetic_sample(seed, 96, 192)
        assert rgb.dtype == np.uint8 and rgb.shape == (96, 192, 3) and ids.dtype == np.uint16
        values = np.unique(ids)
        semantic = np.where(values < 1000, values, values // 1000)
        assert set(semantic.tolist()) <= defined
        seen_classes |= set(semantic[values >= 1000].tolist())
        crowd += int(np.isin(values, list(things)).any())
        ignored += int(np.isin(semantic, [1, 3, 29, 30]).any())
        assert {7, 23}.issubset(set(semantic.tolist()))  # road and sky everywhere
    assert {24, 25, 26, 33}.issubset(seen_classes)
    assert crowd >= 3 and ignored >= 3


def test_appearance_is_not_a_flat_colour_per_class() -> None:
    rgb, ids, _ = synthetic_sample(1, 256, 512)
    cars = (ids // 1000) == 26
    assert cars.sum() > 100
    assert rgb[cars].std(axis=0).max() > 10  # textured, several parts and paints


def test_small_sizes_and_bad_arguments(tmp_path: Path) -> None:
    _, ids, _ = synthetic_sample(0, 16, 32)
    assert ids.shape == (16, 32)
    with pytest.raises(UserInputError):
        synthetic_sample(0, 8, 8)
    with pytest.raises(UserInputError):
        make_synthetic_cityscapes(tmp_path, train=0, val=0)
    with pytest.raises(UserInputError):
        parse_size("512by1024")
    assert parse_size("512x1024") == (512, 1024)


def test_cli(tmp_path: Path) -> None:
    assert main(["synth-cityscapes", str(tmp_path), "--train", "1", "--val", "1", "--size", "32x64", "--seed", "2"]) == 0
    assert len(list((tmp_path / "gtFine").rglob("*_instanceIds.png"))) == 2
    other = tmp_path / "options"
    assert main(["synth-cityscapes", str(other), "--train", "1", "--val", "0", "--size", "48x96", "--seed", "2",
                 "--near", "0.5", "--density", "0.5", "--no-street-furniture"]) == 0
    written = next((other / "gtFine" / "train").rglob("*_instanceIds.png"))
    options = SceneOptions(near=0.5, density=0.5, street_furniture=False)
    _, expected, _ = synthetic_sample(_split_seed(2, "train", 0), 48, 96, options=options)
    assert np.array_equal(np.asarray(Image.open(written)), expected)
    assert main(["synth-cityscapes", str(tmp_path / "bad"), "--near", "3"]) == 2


def test_scene_options_leave_out_street_furniture_and_bring_things_near() -> None:
    furniture = {13, 17, 19, 20}  # fence, pole, traffic light, traffic sign
    plain, near = SceneOptions(), SceneOptions(near=0.6, street_furniture=False)
    seen_furniture = 0
    thing_sizes: dict[str, list[float]] = {"plain": [], "near": []}
    for seed in range(20):
        for name, options in (("plain", plain), ("near", near)):
            _, ids, scene = synthetic_sample(seed, 96, 192, options=options)
            semantic = np.where(ids < 1000, ids, ids // 1000)
            if name == "plain":
                seen_furniture += int(np.isin(semantic, list(furniture)).any())
            else:
                assert not np.isin(semantic, list(furniture)).any()
                assert not any(label in ("pole", "fence", "traffic sign", "traffic light")
                               for _, _, label, _ in scene.shapes)
            _, counts = np.unique(ids[ids >= 1000], return_counts=True)
            thing_sizes[name].extend(counts.tolist())
    assert seen_furniture >= 5
    # Things nearer the camera are larger.
    assert np.median(thing_sizes["near"]) > 1.3 * np.median(thing_sizes["plain"])


def test_scene_options_are_checked_and_reach_the_tree(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="near"):
        SceneOptions(near=1.5)
    with pytest.raises(UserInputError, match="density"):
        SceneOptions(density=-1)
    options = SceneOptions(near=0.5, street_furniture=False)
    make_synthetic_cityscapes(tmp_path, train=1, val=0, size=(48, 96), seed=2, options=options)
    written = next((tmp_path / "gtFine" / "train").rglob("*_instanceIds.png"))
    _, expected, _ = synthetic_sample(_split_seed(2, "train", 0), 48, 96, options=options)
    assert np.array_equal(np.asarray(Image.open(written)), expected)
