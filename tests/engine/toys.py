"""Tiny generated data and a tiny model config for the engine tests (CPU, 64x96 images)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_convert, masks_to_boxes

from detr_panoptic.config import Config, config_from_dict
from detr_panoptic.data.categories import Category, CategoryMap

TOY_CATEGORIES = CategoryMap.contiguous([
    Category(7, "road", False), Category(24, "person", True), Category(26, "car", True),
])


class ToyPanoptic(torch.utils.data.Dataset):
    """Images with a road band and 1-2 rectangles; targets as the dataset contract says."""

    def __init__(self, size: int = 8, height: int = 64, width: int = 96, seed: int = 0,
                 num_segments: int | None = None) -> None:
        self.size, self.height, self.width, self.seed = size, height, width, seed
        self.num_segments = num_segments
        self.category_map = TOY_CATEGORIES

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + index)
        h, w = self.height, self.width
        masks = [torch.zeros(h, w, dtype=torch.bool)]
        masks[0][h * 3 // 4:, :] = True  # road
        labels, category_ids = [0], [7]
        count = self.num_segments - 1 if self.num_segments is not None else int(torch.randint(1, 3, (1,), generator=g))
        for k in range(count):
            y0 = int(torch.randint(0, h // 2, (1,), generator=g))
            x0 = int(torch.randint(0, w // 2, (1,), generator=g))
            m = torch.zeros(h, w, dtype=torch.bool)
            m[y0:y0 + h // 3, x0:x0 + w // 3] = True
            m &= ~masks[0]
            for prev in masks[1:]:
                m &= ~prev
            if not m.any():
                m[0, k] = True
            masks.append(m)
            labels.append(1 + k % 2)
            category_ids.append(24 if k % 2 == 0 else 26)
        mask_tensor = torch.stack(masks)
        image = torch.randn(3, h, w, generator=g) * 0.1
        for m, label in zip(mask_tensor, labels):
            image[label % 3] += m.float()
        boxes = box_convert(masks_to_boxes(mask_tensor), "xyxy", "cxcywh") / torch.tensor([w, h, w, h])
        n = len(labels)
        return image, {
            "labels": torch.tensor(labels), "boxes": boxes, "masks": mask_tensor,
            "iscrowd": torch.zeros(n, dtype=torch.long), "area": mask_tensor.sum((1, 2)).float(),
            "image_id": f"toy_{index}", "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w]),
            "segment_ids": torch.arange(1, n + 1), "category_ids": torch.tensor(category_ids),
        }


class SometimesEmpty(ToyPanoptic):
    """Every third image has no segment at all (an all-void image: zero targets)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = super().__getitem__(index)
        if index % 3 == 1:
            n = len(target["labels"])
            target = {k: v[:0] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                      and k not in ("orig_size", "size") else v for k, v in target.items()}
        return image, target


TINY_MODEL = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
              "dim_feedforward": 64, "num_queries": 8, "dropout": 0.1, "aux_loss": True}


def tiny_config(output_dir: str | Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "name": "toy",
        "model": dict(TINY_MODEL),
        "train": {"output_dir": str(output_dir), "batch_size": 2, "epochs": 2, "lr": 1e-3, "lr_backbone": 0.0,
                  "device": "cpu", "seed": 3},
        "data": {"workers": 0},
        "logging": {"tensorboard": False, "progress": False, "log_every_steps": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, source="test")


def toy_datasets(train_size: int = 8, val_size: int = 2, **kwargs: Any):
    return ToyPanoptic(train_size, **kwargs), ToyPanoptic(val_size, seed=99, **kwargs), TOY_CATEGORIES


