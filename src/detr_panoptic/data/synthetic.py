"""Synthetic street scenes in the exact Cityscapes layout, for the demo, the tests and the benchmarks.

``make_synthetic_cityscapes(out, train=N, val=M)`` writes::

    out/leftImg8bit/<split>/<city>/<city>_<seq:06d>_000019_leftImg8bit.png
    out/gtFine/<split>/<city>/<city>_<seq:06d>_000019_gtFine_{instanceIds,labelIds,color}.png
    out/gtFine/<split>/<city>/<city>_<seq:06d>_000019_gtFine_polygons.json

with Cityscapes label ids (``cityscapesscripts.helpers.labels``) and 16-bit instance ids
(``class * 1000 + k`` for instances, the class id for stuff and for crowd ``*group`` regions).

A scene is an ordered list of polygons (later ones occlude earlier ones): sky, buildings (with
windows), vegetation, road (with lane marks), sidewalks, terrain, poles with traffic signs/lights;
then things sorted far to near, each built from recognisable parts: cars (body, cabin, windows,
wheels), trucks (cab, box, wheels), persons (head, torso, two legs), bicycles (two wheels and a
frame), riders on bicycles; sometimes crowd groups (``persongroup``/``cargroup``), an ego vehicle,
an out-of-ROI border and caravans/trailers (ignored in evaluation). Every part has a *material*: a
randomly jittered base colour plus texture (pixel noise, blotches, window grids, tiles, gradients),
so classes are told apart by shape and appearance statistics, not by one flat colour.

Each image is a pure function of ``(seed, split, index)`` (numpy ``default_rng``), so trees are
deterministic and can be generated in any order or in parallel (the scenes themselves: ``data.scene``).
``polygons.json`` lists the drawn
parts in order (one object per part, as Cityscapes lists one per polygon); the PNGs are the ground truth.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.data.cityscapes import FILE_MODE
from detr_panoptic.data.scene import Scene, SceneOptions, build_scene, rasterize, render
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path
from detr_panoptic.utils.parallel import map_in_processes

TRAIN_CITIES: tuple[str, ...] = ("aachen", "bochum", "bremen")
VAL_CITIES: tuple[str, ...] = ("frankfurt", "lindau", "munster")
TEST_CITIES: tuple[str, ...] = ("berlin", "bielefeld")
FRAME = 19  # Cityscapes' annotated frame is the 20th of each snippet: <city>_<seq>_000019

def synthetic_sample(seed: int | Sequence[int], height: int = 512, width: int = 1024, *,
                     things: bool = True, options: SceneOptions | None = None
                     ) -> tuple[np.ndarray, np.ndarray, Scene]:
    """One scene: (RGB uint8 [H, W, 3], instance ids uint16 [H, W], the Scene with its polygons)."""
    if height < 16 or width < 16:
        raise UserInputError(f"synthetic images need at least 16x16 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    scene = build_scene(rng, height, width, things=things, options=options)
    ids, material_map = rasterize(scene)
    return render(scene, material_map, rng), ids, scene


def _label_ids(ids: np.ndarray) -> np.ndarray:
    return np.where(ids < 1000, ids, ids // 1000).astype(np.uint8)


def _color_png(label_ids: np.ndarray) -> np.ndarray:
    from cityscapesscripts.helpers.labels import labels

    palette = np.zeros((256, 4), np.uint8)
    palette[:, 3] = 255
    for label in labels:
        if label.id >= 0:
            palette[label.id, :3] = label.color
    return palette[label_ids]


def _polygons_json(scene: Scene) -> str:
    objects = [{"label": label, "polygon": [[round(x), round(y)] for x, y in polygon]}
               for _, _, label, polygon in scene.shapes]
    return json.dumps({"imgHeight": scene.height, "imgWidth": scene.width, "objects": objects}, indent=4)


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
        os.chmod(tmp, FILE_MODE)


def write_sample(root: Path, split: str, city: str, sequence: int, rgb: np.ndarray, ids: np.ndarray,
                 scene: Scene | None = None) -> str:
    """Write one image and its gtFine files into a Cityscapes tree; returns the image id."""
    image_id = f"{city}_{sequence:06d}_{FRAME:06d}"
    image_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    _save_png(image_dir / f"{image_id}_leftImg8bit.png", rgb)
    ids = np.asarray(ids, np.uint16)
    labels = _label_ids(ids)
    _save_png(gt_dir / f"{image_id}_gtFine_instanceIds.png", ids)
    _save_png(gt_dir / f"{image_id}_gtFine_labelIds.png", labels)
    _save_png(gt_dir / f"{image_id}_gtFine_color.png", _color_png(labels))
    if scene is not None:
        with atomic_path(gt_dir / f"{image_id}_gtFine_polygons.json") as tmp:
            tmp.write_text(_polygons_json(scene))
            os.chmod(tmp, FILE_MODE)
    return image_id


def _split_seed(seed: int, split: str, index: int) -> list[int]:
    return [int(seed), sum(ord(c) * 31 ** i for i, c in enumerate(split)) % (2 ** 31), int(index)]


def _write_one(job: tuple[str, str, str, int, int, int, int, bool, SceneOptions | None]) -> str:
    root, split, city, index, seed, height, width, things, options = job
    rgb, ids, scene = synthetic_sample(_split_seed(seed, split, index), height, width, things=things,
                                       options=options)
    return write_sample(Path(root), split, city, index, rgb, ids, scene)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> ``(512, 1024)`` (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserInputError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 512x1024") from None
    return height, width


def make_synthetic_cityscapes(
    out: str | os.PathLike,
    train: int = 8,
    val: int = 4,
    size: tuple[int, int] = (512, 1024),
    seed: int = 0,
    cities: dict[str, Sequence[str]] | None = None,
    *,
    test: int = 0,
    workers: int = 1,
    progress: bool = False,
    options: SceneOptions | None = None,
) -> Path:
    """Write a synthetic Cityscapes tree under ``out`` (see the module docstring); returns ``out``.

    ``size`` is (height, width); images are spread round-robin over the split's ``cities``
    (default: three real Cityscapes city names per split). Image ``i`` of a split is
    ``<city>_<i:06d>_000019`` and depends only on ``(seed, split, i)`` (and ``options``, the
    ``SceneOptions``; default: the full mix).
    """
    height, width = (int(v) for v in size)
    counts = {"train": int(train), "val": int(val), "test": int(test)}
    if any(n < 0 for n in counts.values()):
        raise UserInputError(f"image counts must be >= 0, got {counts}")
    cities = {"train": TRAIN_CITIES, "val": VAL_CITIES, "test": TEST_CITIES, **(cities or {})}
    root = Path(out)
    jobs = []
    for split, n in counts.items():
        if not cities.get(split):
            raise UserInputError(f"no cities given for split {split!r}")
        for i in range(n):
            jobs.append((str(root), split, cities[split][i % len(cities[split])], i, seed, height, width, True,
                         options))
    if not jobs:
        raise UserInputError("nothing to generate: train, val and test are all 0")
    from tqdm import tqdm

    # The pool starts before the progress bar's monitor thread, so that it may fork (utils.parallel).
    written = map_in_processes(_write_one, jobs, workers) if workers > 1 else (_write_one(job) for job in jobs)
    with contextlib.closing(written), tqdm(total=len(jobs), desc="synthesise", unit="img", disable=not progress,
                                           dynamic_ncols=True) as bar:
        for _ in written:
            bar.update(1)
    return root
