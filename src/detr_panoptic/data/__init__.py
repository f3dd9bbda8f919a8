"""Datasets and data preparation: Cityscapes conversion, COCO-panoptic dataset, transforms, synthetic scenes.

Never imports ``detr_panoptic.models``. The names below are loaded lazily, so that importing
``detr_panoptic.data.categories`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from detr_panoptic.data.categories import Category, CategoryMap, coco_category_map

_LAZY = {
    "check_cityscapes": "check",
    "check_dataset": "check",
    "cityscapes_image_path": "cityscapes",
    "convert_cityscapes": "cityscapes",
    "CocoPanopticDataset": "coco_panoptic",
    "cityscapes_panoptic_dataset": "coco_panoptic",
    "collate": "coco_panoptic",
    "prepare_cache": "coco_panoptic",
    "make_synthetic_cityscapes": "synthetic",
    "make_transforms": "transforms",
}

__all__ = [
    "Category",
    "CategoryMap",
    "CocoPanopticDataset",
    "check_cityscapes",
    "check_dataset",
    "cityscapes_image_path",
    "cityscapes_panoptic_dataset",
    "coco_category_map",
    "collate",
    "convert_cityscapes",
    "make_synthetic_cityscapes",
    "make_transforms",
    "prepare_cache",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"detr_panoptic.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'detr_panoptic.data' has no attribute {name!r}")
