"""The COCO-panoptic dataset on the real COCO sample and on converted synthetic Cityscapes; check_dataset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.cli import main
from detr_panoptic.data import (
    CategoryMap,
    CocoPanopticDataset,
    check_dataset,
    cityscapes_panoptic_dataset,
    collate,
    convert_cityscapes,
    make_synthetic_cityscapes,
    prepare_cache,
)
from detr_panoptic.data.check import check_cityscapes
from detr_panoptic.utils.batching import pad_images
from detr_panoptic.utils.errors import UserInputError

TARGET_KEYS = {"labels", "boxes", "masks", "iscrowd", "area", "image_id", "orig_size", "size",
               "segment_ids", "category_ids"}


def identity(image, id_map, boxes):
    return image, id_map, boxes


def decode_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_cityscapes")
    make_synthetic_cityscapes(root, train=2, val=3, size=(96, 192), seed=5)
    convert_cityscapes(root, splits=("train", "val"), workers=1, progress=False)
    return root


def coco_dataset(sample: Path, **kwargs) -> CocoPanopticDataset:
    return CocoPanopticDataset(sample / "panoptic_examples.json", sample / "panoptic_examples",
                               sample / "input_images", **kwargs)


def test_coco_sample_targets_match_the_annotation(coco_sample: Path) -> None:
    dataset = coco_dataset(coco_sample, transforms=identity)
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    assert len(dataset) == len(data["annotations"]) == 2
    assert dataset.category_map.num_classes == len(data["categories"]) == 133
    for index, ann in enumerate(data["annotations"]):
        image, target = dataset[index]
        assert set(target) == TARGET_KEYS
        record = next(i for i in data["images"] if i["id"] == ann["image_id"])
        assert target["image_id"] == ann["image_id"]
        assert target["orig_size"].tolist() == target["size"].tolist() == [record["height"], record["width"]]
        assert image.shape == (3, record["height"], record["width"])
        ids = decode_ids(coco_sample / "panoptic_examples" / ann["file_name"])
        segments = ann["segments_info"]
        assert target["segment_ids"].tolist() == [s["id"] for s in segments]  # every segment kept, in order
        assert target["category_ids"].tolist() == [s["category_id"] for s in segments]
        assert target["iscrowd"].tolist() == [s["iscrowd"] for s in segments]
        assert target["area"].tolist() == [float(s["area"]) for s in segments]
        classes = [dataset.category_map.class_ids[i] for i in target["labels"].tolist()]
        assert classes == [s["category_id"] for s in segments]
        assert target["masks"].dtype == torch.bool and target["labels"].dtype == torch.int64
        h, w = ids.shape
        for mask, segment, box in zip(target["masks"], segments, target["boxes"]):
            np.testing.assert_array_equal(mask.numpy(), ids == segment["id"])
            x, y, bw, bh = segment["bbox"]  # COCO [x, y, w, h]; ours: pixel extent, DETR's masks_to_boxes
            expected = torch.tensor([(x + (bw - 1) / 2) / w, (y + (bh - 1) / 2) / h, (bw - 1) / w, (bh - 1) / h])
            torch.testing.assert_close(box, expected)


def test_coco_sample_default_transforms_and_collate(coco_sample: Path) -> None:
    dataset = coco_dataset(coco_sample, min_size=200, max_size=400)
    batch = [dataset[0], dataset[1]]
    images, targets = collate(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and min(image.shape[-2:]) == 200 and max(image.shape[-2:]) <= 400
        assert target["size"].tolist() == list(image.shape[-2:])
        assert target["masks"].shape[-2:] == image.shape[-2:]
        assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
        assert abs(float(image.mean())) < 2
    padded, mask = pad_images(images)
    assert padded.shape[0] == 2 and mask.shape == (2, *padded.shape[-2:])


def test_explicit_category_map_and_unknown_category(coco_sample: Path) -> None:
    from detr_panoptic.data.categories import coco_category_map

    dataset = coco_dataset(coco_sample, category_map=coco_category_map(), transforms=identity)
    _, target = dataset[0]
    assert torch.equal(target["labels"], target["category_ids"])  # identity layout: class == category id
    only_person = CategoryMap.from_coco_json([{"id": 1, "name": "person", "isthing": 1}])
    with pytest.raises(UserInputError, match="not one of the known categories"):
        coco_dataset(coco_sample, category_map=only_person)


def test_cityscapes_dataset(cityscapes_root: Path) -> None:
    dataset = cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=48, max_size=200)
    assert len(dataset) == 3
    names = [c.name for c in dataset.category_map.categories]
    assert "car" in names and "unlabeled" not in names and dataset.category_map.num_classes == 19
    image, target = dataset[0]
    assert isinstance(target["image_id"], str) and target["image_id"].startswith("frankfurt_")
    assert image.shape == (3, 48, 96) and target["orig_size"].tolist() == [96, 192]
    assert target["masks"].shape[1:] == (48, 96) and len(target["labels"]) == len(target["boxes"]) > 3
    assert dataset.image_path(dataset.image_record(0)) == (
        cityscapes_root / "leftImg8bit" / "val" / "frankfurt" / f"{target['image_id']}_leftImg8bit.png")


def test_cityscapes_dataset_needs_the_conversion(cityscapes_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="convert-cityscapes"):
        cityscapes_panoptic_dataset(cityscapes_root, "val", use_train_id=True)


def test_augmented_items_stay_consistent(cityscapes_root: Path) -> None:
    from detr_panoptic.data.transforms import make_transforms

    dataset = cityscapes_panoptic_dataset(cityscapes_root, "train", transforms=make_transforms(
        min_size=64, max_size=160, augment=True))
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = dataset[seed % 2]
        assert target["masks"].shape[1:] == image.shape[1:] and target["masks"].flatten(1).any(1).all()
        assert len({len(target[k]) for k in ("labels", "boxes", "masks", "iscrowd", "area", "segment_ids")}) == 1


def test_prepared_cache_gives_the_same_items(cityscapes_root: Path, tmp_path: Path) -> None:
    plain = cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=48, max_size=200)
    to_prepare = cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=48, max_size=200)
    assert prepare_cache(to_prepare, tmp_path / "cache", progress=False) == tmp_path / "cache"
    assert len(list((tmp_path / "cache").glob("*.np[yz]"))) == 2 * len(plain)
    cached = cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=48, max_size=200, cache_dir=tmp_path / "cache")
    for index in range(len(plain)):
        (a, ta), (b, tb) = plain[index], cached[index]
        torch.testing.assert_close(a, b)
        for key in TARGET_KEYS - {"image_id"}:
            torch.testing.assert_close(ta[key], tb[key], msg=key)
    with pytest.raises(UserInputError, match="min_size"):
        cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=64, cache_dir=tmp_path / "cache")


def test_cache_fills_on_first_read(cityscapes_root: Path, tmp_path: Path) -> None:
    dataset = cityscapes_panoptic_dataset(cityscapes_root, "train", min_size=48, max_size=200, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").glob("*.np[yz]")) == []
    first_image, first_target = dataset[1]
    assert len(list((tmp_path / "c").glob("*.np[yz]"))) == 2
    (tmp_path / "c" / "marker").write_text("")  # the second read must come from the cache files
    image_file = next((tmp_path / "c").glob("*.image.npy"))
    np.save(image_file, np.zeros_like(np.load(image_file)))
    second_image, second_target = dataset[1]
    assert not torch.equal(first_image, second_image)
    assert torch.equal(first_target["masks"], second_target["masks"])
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


def test_validation_at_construction(cityscapes_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(cityscapes_root, root)
    missing = next((root / "leftImg8bit" / "val").rglob("*.png"))
    missing.unlink()
    with pytest.raises(UserInputError, match=str(missing.name)):
        cityscapes_panoptic_dataset(root, "val")


# -- check_dataset ------------------------------------------------------------------------------------
def test_check_dataset_clean(cityscapes_root: Path, coco_sample: Path) -> None:
    assert check_cityscapes(cityscapes_root, "val") == []
    assert check_dataset(coco_sample / "panoptic_examples.json", coco_sample / "panoptic_examples",
                         coco_sample / "input_images", workers=1) == []


def test_check_dataset_reports_each_problem(cityscapes_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "copy"
    shutil.copytree(cityscapes_root, root)
    json_path = root / "gtFine" / "cityscapes_panoptic_val.json"
    data = json.loads(json_path.read_text())
    first, second, third = data["annotations"]
    first["segments_info"].append({"id": 999999, "category_id": 26, "area": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0})
    dropped = second["segments_info"].pop()
    third["segments_info"][0]["category_id"] = 77
    json_path.write_text(json.dumps(data))
    image = root / "leftImg8bit" / "val" / "frankfurt" / f"{first['image_id']}_leftImg8bit.png"
    image.unlink()

    problems = check_cityscapes(root, "val")
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert f"{image} (image id {first['image_id']!r}) is missing" in text
    assert f"{first['file_name']}: segment id(s) [999999]" in text
    assert f"{second['file_name']}: PNG id(s) [{dropped['id']}]" in text
    assert "category id 77" in text and third["file_name"] in text

    assert main(["check-dataset", "--cityscapes", str(root), "--split", "val"]) == 1
    assert "4 problem(s)" in capsys.readouterr().out


def test_check_dataset_cli_clean_and_bad_usage(coco_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-dataset", "--json", str(coco_sample / "panoptic_examples.json"),
                 "--panoptic-dir", str(coco_sample / "panoptic_examples"),
                 "--image-dir", str(coco_sample / "input_images")]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    assert main(["check-dataset"]) == 2
    assert main(["check-dataset", "--json", "/nonexistent.json", "--panoptic-dir", "/x"]) == 2
    assert "/nonexistent.json" in capsys.readouterr().err


def test_corrupt_files_are_named(cityscapes_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(cityscapes_root, root)
    dataset = cityscapes_panoptic_dataset(root, "val")
    image_path = dataset.image_path(dataset.image_record(0))
    image_path.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(UserInputError, match=image_path.name):
        dataset[0]
    png = dataset.panoptic_path(dataset.annotations[1])
    png.write_bytes(b"not a png")
    with pytest.raises(UserInputError, match=png.name):
        dataset[1]
    problems = check_cityscapes(root, "val")
    assert any(str(png) in p and "cannot decode the PNG" in p for p in problems)


def test_dataset_pickles_for_spawned_workers(cityscapes_root: Path) -> None:
    import pickle

    dataset = cityscapes_panoptic_dataset(cityscapes_root, "val", min_size=48, max_size=200)
    clone = pickle.loads(pickle.dumps(dataset))
    (a, ta), (b, tb) = dataset[0], clone[0]
    torch.testing.assert_close(a, b)
    assert ta["image_id"] == tb["image_id"]
