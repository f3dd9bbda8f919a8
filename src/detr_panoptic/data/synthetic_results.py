"""Imperfect Cityscapes results made from a split's ground truth, in the benchmark's three formats,
for the tests and benchmarks of the evaluators (``detr-panoptic cityscapes-eval``).

``write_cityscapes_results(root, split, out, seed=0)`` reads ``gtFine/<split>/<city>/*_gtFine_instanceIds.png``
and writes, per image (stem ``<city>_<seq>_<frame>``)::

    out/cityscapes/semantic/<stem>_leftImg8bit.png     labelIds: the ground truth with wrong rectangles
    out/cityscapes/instance/<stem>_leftImg8bit.txt     one line per mask: path labelId confidence
    out/cityscapes/instance/masks/<stem>_<k>.png       0/255 masks: shifted copies of ground-truth
                                                       instances (some mislabelled, some duplicated), masks
                                                       on crowd regions, random false positives, empty masks
    out/predictions.json + out/predictions/<stem>.png  COCO panoptic (labelIds as category ids)

Each image's results are a pure function of ``(seed, stem)``.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from detr_panoptic.utils.png import decode_grey16_png, encode_id_png
from detr_panoptic.utils.png_grey import encode_grey8_png

THING_IDS = (24, 25, 26, 27, 28, 31, 32, 33)
STUFF_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23)
IGNORED_IDS = (0, 1, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


def _label_of(values: np.ndarray) -> np.ndarray:
    return np.where(values < 1000, values, values // 1000)


def _rectangle(rng: np.random.Generator, shape: tuple[int, int], largest: float) -> tuple[slice, slice]:
    h, w = shape
    rh = int(rng.integers(1, max(2, int(h * largest))))
    rw = int(rng.integers(1, max(2, int(w * largest))))
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    return slice(y, y + rh), slice(x, x + rw)


def _shifted(mask: np.ndarray, rng: np.random.Generator, amount: int) -> np.ndarray:
    dy, dx = (int(v) for v in rng.integers(-amount, amount + 1, 2))
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def _semantic(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    labels = _label_of(ids).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        rows, cols = _rectangle(rng, labels.shape, 0.3)
        labels[rows, cols] = rng.choice(STUFF_IDS + THING_IDS + IGNORED_IDS)
    return labels


def _instances(ids: np.ndarray, rng: np.random.Generator, extra: int = 0) -> list[tuple[np.ndarray, int, float]]:
    """(mask, labelId, confidence) per predicted instance; ``extra`` more low-confidence candidates
    (shifted ground-truth instances and rectangles, as a detector's tail of ranked masks)."""
    shift = max(1, ids.shape[0] // 100)
    out = []
    values = np.unique(ids)
    for value in values.tolist():
        label = value if value < 1000 else value // 1000
        if label not in THING_IDS + (29, 30):
            continue
        mask = ids == value
        if value < 1000 and rng.random() < 0.5:  # a crowd region predicted as one instance
            out.append((mask, label, float(rng.random())))
            continue
        if rng.random() < 0.15:  # missed
            continue
        wrong = rng.random() < 0.1
        out.append((_shifted(mask, rng, shift), int(rng.choice(THING_IDS)) if wrong else label,
                    float(rng.random())))
        if rng.random() < 0.2:  # a duplicate
            out.append((_shifted(mask, rng, 3 * shift), label, float(rng.random())))
    for _ in range(int(rng.integers(1, 6))):  # false positives
        mask = np.zeros(ids.shape, bool)
        rows, cols = _rectangle(rng, ids.shape, 0.15)
        mask[rows, cols] = True
        out.append((mask, int(rng.choice(THING_IDS)), float(rng.random())))
    out.append((np.zeros(ids.shape, bool), int(rng.choice(THING_IDS)), 0.5))  # an empty mask
    things = [v for v in values.tolist() if v >= 1000 and v // 1000 in THING_IDS]
    for _ in range(extra):
        if things and rng.random() < 0.6:
            value = int(rng.choice(things))
            mask = _shifted(ids == value, rng, 6 * shift)
        else:
            mask = np.zeros(ids.shape, bool)
            rows, cols = _rectangle(rng, ids.shape, 0.1)
            mask[rows, cols] = True
        out.append((mask, int(rng.choice(THING_IDS)), float(rng.random() * 0.3)))
    return out


def _panoptic(ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    pred = ids.astype(np.uint32)
    for k in range(int(rng.integers(2, 8))):
        rows, cols = _rectangle(rng, pred.shape, 0.25)
        label = int(rng.choice(STUFF_IDS + THING_IDS))
        pred[rows, cols] = label * 1000 + 900 + k if label in THING_IDS else label
    label_of = _label_of(pred)
    pred[np.isin(label_of, IGNORED_IDS)] = 0
    segments = []
    for value in np.unique(pred).tolist():
        if value:
            label = value if value < 1000 else value // 1000
            segments.append({"id": int(value), "category_id": int(label), "iscrowd": 0})
    return pred, segments


def write_cityscapes_results(root: str | Path, split: str, out: str | Path, *, seed: int = 0,
                             pillow_masks: bool = False, extra_candidates: int = 0) -> list[str]:
    """Write the three kinds of results for every ground-truth image of ``split``; the stems written.

    ``pillow_masks``: write the masks with Pillow (its adaptive row filters) instead of our encoder.
    ``extra_candidates``: low-confidence instance masks added per image."""
    out = Path(out)
    semantic_dir = out / "cityscapes" / "semantic"
    instance_dir = out / "cityscapes" / "instance"
    panoptic_dir = out / "predictions"
    for folder in (semantic_dir, instance_dir / "masks", panoptic_dir):
        folder.mkdir(parents=True, exist_ok=True)
    annotations, stems = [], []
    for path in sorted((Path(root) / "gtFine" / split).glob("*/*_gtFine_instanceIds.png")):
        stem = path.name[: -len("_gtFine_instanceIds.png")]
        data = path.read_bytes()
        ids = decode_grey16_png(data, str(path))
        if ids is None:
            ids = np.asarray(Image.open(path)).astype(np.uint16)
        rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
        (semantic_dir / f"{stem}_leftImg8bit.png").write_bytes(encode_grey8_png(_semantic(ids, rng)))
        lines = []
        for k, (mask, label, confidence) in enumerate(_instances(ids, rng, extra_candidates)):
            name = f"masks/{stem}_{k}.png"
            pixels = mask.astype(np.uint8) * 255
            if pillow_masks:
                Image.fromarray(pixels).save(instance_dir / name)
            else:
                (instance_dir / name).write_bytes(encode_grey8_png(pixels))
            lines.append(f"{name} {label} {confidence:.6f}\n")
        (instance_dir / f"{stem}_leftImg8bit.txt").write_text("".join(lines))
        pred, segments = _panoptic(ids, rng)
        (panoptic_dir / f"{stem}.png").write_bytes(encode_id_png(pred))
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
        stems.append(stem)
    (out / "predictions.json").write_text(json.dumps({"annotations": annotations}))
    return stems
