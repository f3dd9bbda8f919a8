"""Small Cityscapes trees for the data tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.data.synthetic import make_synthetic_cityscapes


def write_instance_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(ids, np.uint16)).save(path)


def edge_case_images(height: int = 48, width: int = 96) -> dict[str, np.ndarray]:
    """Hand-made instanceIds arrays covering the converter's special cases."""
    stuff_only = np.full((height, width), 23, np.uint16)          # sky
    stuff_only[height // 2:] = 7                                   # road
    stuff_only[height // 2:, : width // 4] = 8                     # sidewalk
    stuff_only[-4:] = 1                                            # ego vehicle (ignored)
    stuff_only[:, :2] = 3                                          # out of roi (ignored)

    crowded = np.full((height, width), 11, np.uint16)              # building
    crowded[height // 2:] = 7
    crowded[10:20, 5:15] = 24                                      # persongroup: crowd
    crowded[25:35, 5:25] = 26                                      # cargroup: crowd
    crowded[30:40, 30:40] = 33                                     # bicyclegroup: crowd
    crowded[5:15, 40:45] = 18                                      # polegroup: ignoreInEval
    crowded[5:30, 46:48] = 17                                      # pole
    crowded[30:44, 50:70] = 26000                                  # car instances
    crowded[32:46, 60:80] = 26001
    crowded[12:30, 82:88] = 24005                                  # a person with a high index
    crowded[40:47, 85:95] = 29000                                  # caravan: ignoreInEval
    crowded[0:3, 0:96] = 30001                                     # trailer: ignoreInEval
    crowded[3:5, 0:10] = 29                                        # caravan crowd: ignoreInEval
    crowded[44:48, 0:4] = 7001                                     # a stuff class written as an "instance"
    crowded[20:22, 20:60] = 5                                      # dynamic (ignored)
    crowded[22:23, 20:60] = 9                                      # parking (ignored)
    crowded[23:24, 20:60] = 0                                      # unlabeled

    void = np.zeros((height, width), np.uint16)                    # nothing kept at all
    return {"stuff_only": stuff_only, "crowded": crowded, "void": void}


def make_tree(root: Path, *, synthetic: tuple[int, int] = (2, 3), size: tuple[int, int] = (64, 128),
              edge_cases: bool = True, seed: int = 0) -> Path:
    """A Cityscapes root: synthetic train/val scenes plus the edge cases in val (two extra cities)."""
    make_synthetic_cityscapes(root, train=synthetic[0], val=synthetic[1], size=size, seed=seed)
    if edge_cases:
        for i, (name, ids) in enumerate(edge_case_images().items()):
            city = "a-b" if i % 2 else "a"  # '-' sorts before '/': the order must follow the full paths
            write_instance_png(root / "gtFine" / "val" / city / f"{city}_{i:06d}_000019_gtFine_instanceIds.png", ids)
    return root


def json_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
