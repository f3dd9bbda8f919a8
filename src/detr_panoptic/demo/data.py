"""The demo's data: the synthetic Cityscapes target domain, and the source domain standing in for COCO
(other scenes, relabelled with the coarser COCO-style ``SOURCE_LABELS``) written as a COCO panoptic dataset."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_panoptic.data.categories import Category
from detr_panoptic.demo.settings import DemoSettings
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)


SOURCE_LABELS: dict[str, tuple[int, str, bool] | None] = {
    "person": (1, "person", True),
    "rider": (1, "person", True),
    "bicycle": (2, "bicycle", True),
    "car": (3, "car", True),
    "truck": (8, "truck", True),
    "traffic light": (10, "traffic light", True),
    "traffic sign": (13, "stop sign", True),
    "road": (149, "road", False),
    "fence": (185, "fence-merged", False),
    "vegetation": (184, "tree-merged", False),
    "sky": (187, "sky-other-merged", False),
    "sidewalk": (191, "pavement-merged", False),
    "terrain": (193, "grass-merged", False),
    "building": (197, "building-other-merged", False),
    "wall": (197, "building-other-merged", False),
    "pole": None,
}


def prepare_target_data(root: Path, settings: DemoSettings, *, seed: int, workers: int) -> Path:
    """The synthetic Cityscapes tree under ``root`` with ``gtFine/cityscapes_panoptic_{train,val}.json``."""
    from detr_panoptic.data.cityscapes import convert_cityscapes
    from detr_panoptic.data.synthetic import make_synthetic_cityscapes

    done = [root / "gtFine" / f"cityscapes_panoptic_{split}.json" for split in ("train", "val")]
    if all(p.is_file() for p in done):
        return root
    make_synthetic_cityscapes(root, train=settings.train_images, val=settings.val_images, size=settings.size,
                              seed=seed, workers=workers, options=settings.scene_options())
    convert_cityscapes(root, splits=["train", "val"], workers=workers, progress=False)
    return root


def source_categories() -> list[dict[str, Any]]:
    """COCO category records of the source label set (colours from the COCO panoptic table)."""
    from detr_panoptic.data.categories import coco_panoptic_categories

    coco = {c.id: c for c in coco_panoptic_categories()}
    seen: dict[int, dict[str, Any]] = {}
    for entry in SOURCE_LABELS.values():
        if entry is not None and entry[0] not in seen:
            cid, name, isthing = entry
            color = list(coco[cid].color) if cid in coco else [128, 128, 128]
            seen[cid] = Category(cid, name, isthing, tuple(color)).to_json()
    return [seen[k] for k in sorted(seen)]


def source_segments(ids: np.ndarray, label_names: Mapping[int, str], has_instances: Mapping[int, bool]
                     ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Cityscapes instance ids [H, W] -> (COCO panoptic id map, segments) in the source label set.

    Stuff of one source category becomes one segment; things keep one segment per instance; crowd
    regions (``v < 1000`` of a class with instances) are ``iscrowd`` segments; unmapped labels are void.
    """
    id_map = np.zeros(ids.shape, np.int64)
    segments: list[dict[str, Any]] = []
    stuff_segment: dict[int, int] = {}
    for value in np.unique(ids).tolist():
        label = value // 1000 if value >= 1000 else value
        entry = SOURCE_LABELS.get(label_names.get(label, ""))
        if entry is None:
            continue
        cid, _, isthing = entry
        pixels = ids == value
        if not isthing:
            if cid not in stuff_segment:
                stuff_segment[cid] = len(segments) + 1
                segments.append({"id": stuff_segment[cid], "category_id": cid, "iscrowd": 0})
            id_map[pixels] = stuff_segment[cid]
            continue
        crowd = int(value < 1000 and has_instances.get(label, False))
        segments.append({"id": len(segments) + 1, "category_id": cid, "iscrowd": crowd})
        id_map[pixels] = len(segments)
    return id_map, segments


def prepare_source_data(root: Path, settings: DemoSettings, *, seed: int) -> dict[str, Path]:
    """The source domain as COCO panoptic under ``root``: ``panoptic_{split}.json``, ``panoptic_{split}/``
    and ``images/{split}/``. Returns ``{split: json path}``."""
    from cityscapesscripts.helpers.labels import labels
    from PIL import Image

    from detr_panoptic.data.synthetic import synthetic_sample
    from detr_panoptic.evaluation import PanopticPredictionWriter

    label_names = {label.id: label.name for label in labels}
    has_instances = {label.id: bool(label.hasInstances) for label in labels}
    categories = source_categories()
    written = {}
    for split, count, offset in (("train", settings.source_train_images, 0),
                                 ("val", settings.source_val_images, 1_000_000)):
        json_path = root / f"panoptic_{split}.json"
        written[split] = json_path
        if json_path.is_file():
            continue
        writer = PanopticPredictionWriter(json_path, root / f"panoptic_{split}", categories)
        images = []
        for index in range(count):
            # Other scenes than the target's: the generator's seed space is (seed, split, index).
            rgb, ids, _ = synthetic_sample([int(seed), 7_777_777, offset + index], *settings.size,
                                           options=settings.scene_options())
            id_map, segments = source_segments(ids, label_names, has_instances)
            name = f"source_{split}_{index:06d}"
            image_path = root / "images" / split / f"{name}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(image_path, compress_level=1)
            writer.add(index, id_map, segments, file_name=f"{name}.png")
            images.append({"id": index, "file_name": f"{name}.png", "height": int(rgb.shape[0]),
                           "width": int(rgb.shape[1])})
        atomic_write_json(json_path, {"images": images, "annotations": writer.annotations,
                                      "categories": writer.categories})
    return written


class MemoryDataset(torch.utils.data.Dataset):
    """Every item of ``dataset`` decoded once and kept (the demo has no augmentation, so items never
    change); the training engine then reads tensors instead of PNGs each epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        self.category_map = getattr(dataset, "category_map", None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]
