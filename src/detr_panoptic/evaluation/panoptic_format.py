"""The COCO panoptic file format: RGB PNGs of segment ids plus a JSON of ``segments_info``.

A segment id is stored in a pixel as ``id = R + 256 * G + 256**2 * B``; id 0 is VOID. A prediction
folder holds one PNG per image; the JSON (``{"annotations": [...], "categories": [...]}``) lists,
per image, ``image_id``, ``file_name`` (the PNG's name in the folder) and ``segments_info``
(``id``, ``category_id``, ``area``, ``bbox`` [x, y, w, h] in pixels, ``iscrowd`` and optional extras
such as ``score``). By panopticapi's convention ``X.json`` goes with the folder ``X/``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path, atomic_write_json
from detr_panoptic.utils.png import MAX_SEGMENT_ID, encode_id_png, read_id_png  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

def rgb_to_id_map(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB -> ``[H, W]`` int64 segment ids (``R + 256 G + 256^2 B``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UserInputError(f"expected an [H, W, 3] RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64, copy=False)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_map_to_rgb(id_map: Any) -> np.ndarray:
    """``[H, W]`` segment ids (numpy or torch, 0..256^3-1) -> ``[H, W, 3]`` uint8 RGB."""
    ids = to_numpy(id_map).astype(np.int64, copy=False)
    if ids.ndim != 2:
        raise UserInputError(f"expected an [H, W] id map, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise UserInputError(f"segment ids must be in 0..{MAX_SEGMENT_ID} to fit an RGB PNG, "
                             f"got {int(ids.min())}..{int(ids.max())}")
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids & 255
    rgb[..., 1] = (ids >> 8) & 255
    rgb[..., 2] = (ids >> 16) & 255
    return rgb


def write_id_png(path: str | os.PathLike, id_map: Any) -> None:
    """Write ``[H, W]`` segment ids as an RGB PNG, atomically."""
    try:
        data = encode_id_png(to_numpy(id_map))  # checks the ids once
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(data)


def load_panoptic_json(source: str | os.PathLike | Mapping[str, Any], *, what: str = "panoptic JSON"
                       ) -> dict[str, Any]:
    """A COCO panoptic JSON as a dict: ``source`` is a path or an already loaded dict.

    A bare list is taken as the ``annotations`` list (the COCO results format).
    """
    if isinstance(source, Mapping):
        data = dict(source)
    elif isinstance(source, list):
        data = {"annotations": source}
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} not found (expected a COCO panoptic .json file)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{what} {path} is not valid JSON: {exc}") from None
        if isinstance(data, list):
            data = {"annotations": data}
    if not isinstance(data.get("annotations"), list):
        raise UserInputError(f"{what} {describe_source(source)}: expected a dict with an 'annotations' list")
    return data


def describe_source(source: Any) -> str:
    return "(in-memory dict)" if isinstance(source, (Mapping, list)) else str(source)


def to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, possibly on an accelerator
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def category_records(categories: Any) -> list[dict[str, Any]]:
    """COCO category records from a ``CategoryMap``, ``Category`` objects, dicts or ``{id: record}``."""
    if categories is None:
        return []
    if hasattr(categories, "categories") and not isinstance(categories, Mapping):
        categories = categories.categories  # a CategoryMap
    if isinstance(categories, Mapping):
        categories = list(categories.values())
    records = []
    for category in categories:
        if hasattr(category, "to_json"):
            records.append(category.to_json())
        elif isinstance(category, Mapping):
            records.append(dict(category))
        else:
            raise UserInputError(f"expected category records with id, name and isthing, got {category!r}")
    return records


def segment_boxes_and_areas(id_map: np.ndarray, segment_ids: Sequence[int]
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Per segment id: pixel count and ``[x, y, w, h]`` box (zeros when absent). Vectorised.

    Returns ``(areas [N] int64, boxes [N, 4] int64)``. Pixels whose id is not listed are ignored.
    """
    ids = np.asarray(id_map)
    n = len(segment_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    order = np.asarray(segment_ids, dtype=np.int64)
    sorter = np.argsort(order)
    pos = np.searchsorted(order[sorter], ids)
    pos = np.minimum(pos, n - 1)
    index = sorter[pos]
    index = np.where(order[index] == ids, index, n)  # n: not a listed segment
    height, width = ids.shape
    rows = np.bincount((np.arange(height)[:, None] * (n + 1) + index).ravel(), minlength=height * (n + 1))
    cols = np.bincount((np.arange(width)[None, :] * (n + 1) + index).ravel(), minlength=width * (n + 1))
    rows = rows.reshape(height, n + 1)[:, :n] > 0
    cols = cols.reshape(width, n + 1)[:, :n] > 0
    areas = np.bincount(index.ravel(), minlength=n + 1)[:n].astype(np.int64)
    boxes = np.zeros((n, 4), np.int64)
    present = areas > 0
    if present.any():
        y0 = rows.argmax(0)
        y1 = height - 1 - rows[::-1].argmax(0)
        x0 = cols.argmax(0)
        x1 = width - 1 - cols[::-1].argmax(0)
        boxes[:, 0], boxes[:, 1] = x0, y0
        boxes[:, 2], boxes[:, 3] = x1 - x0 + 1, y1 - y0 + 1
        boxes[~present] = 0
    return areas, boxes


class PanopticPredictionWriter:
    """Write predictions in COCO panoptic format, one image at a time.

    PNGs go to ``png_folder`` (default: ``json_path`` without its suffix, panopticapi's convention)
    as they are added; the JSON is written atomically by ``close()`` (or leaving a ``with`` block
    without error). Each image's segment ids must be unique and non-zero; segments with no pixel
    are dropped (panopticapi rejects them) and pixels whose id has no segment are an error.
    """

    def __init__(self, json_path: str | os.PathLike, png_folder: str | os.PathLike | None = None,
                 categories: Any = None) -> None:
        self.json_path = Path(json_path)
        self.png_folder = Path(png_folder) if png_folder is not None else self.json_path.with_suffix("")
        self.categories = category_records(categories)
        self._known = {int(c["id"]) for c in self.categories}
        self.annotations: list[dict[str, Any]] = []
        self._file_names: set[str] = set()
        self.png_folder.mkdir(parents=True, exist_ok=True)

    def add(self, image_id: int | str, id_map: Any, segments_info: Iterable[Mapping[str, Any]],
            file_name: str | None = None) -> dict[str, Any]:
        """Write one image's ``[H, W]`` id map (0 = void) as PNG and record its annotation."""
        ids = to_numpy(id_map)
        if ids.ndim != 2:
            raise UserInputError(f"image {image_id!r}: expected an [H, W] id map, got shape {ids.shape}")
        segments = [dict(s) for s in segments_info]
        seg_ids = [int(s["id"]) for s in segments]
        if len(set(seg_ids)) != len(seg_ids):
            raise UserInputError(f"image {image_id!r}: duplicate segment ids in {seg_ids}")
        bad = [i for i in seg_ids if i <= 0 or i > MAX_SEGMENT_ID]
        if bad:
            raise UserInputError(f"image {image_id!r}: segment ids {bad} are not in 1..{MAX_SEGMENT_ID} "
                                 "(0 is VOID)")
        if self._known:
            unknown = sorted({int(s["category_id"]) for s in segments} - self._known)
            if unknown:
                raise UserInputError(f"image {image_id!r}: unknown category ids {unknown}")
        areas, boxes = segment_boxes_and_areas(ids, seg_ids)
        listed = int(areas.sum()) + int((ids == 0).sum())
        if listed != ids.size:
            stray = sorted(set(np.unique(ids).tolist()) - set(seg_ids) - {0})
            raise UserInputError(f"image {image_id!r}: the id map holds segment ids {stray} that have no "
                                 "entry in segments_info")
        file_name = file_name or f"{image_id}.png"
        if file_name in self._file_names:
            raise UserInputError(f"image {image_id!r}: file name {file_name} was already written")
        kept = []
        for segment, area, box in zip(segments, areas.tolist(), boxes.tolist()):
            if area == 0:
                log.debug("image %r: dropping segment %s with no pixel", image_id, segment["id"])
                continue
            record = {"id": int(segment["id"]), "category_id": int(segment["category_id"]),
                      "area": int(area), "bbox": box, "iscrowd": int(segment.get("iscrowd", 0))}
            for key in ("isthing", "score"):
                if key in segment:
                    record[key] = _plain(segment[key])
            kept.append(record)
        write_id_png(self.png_folder / file_name, ids)
        self._file_names.add(file_name)
        annotation = {"image_id": image_id, "file_name": file_name, "segments_info": kept}
        self.annotations.append(annotation)
        return annotation

    def close(self) -> Path:
        """Write the JSON (atomically) and return its path."""
        atomic_write_json(self.json_path, {"annotations": self.annotations, "categories": self.categories})
        return self.json_path

    def __enter__(self) -> PanopticPredictionWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, float):
        return float(value)
    return value


def save_panoptic_predictions(results: Sequence[Any], image_ids: Sequence[int | str],
                              json_path: str | os.PathLike, categories: Any = None, *,
                              file_names: Sequence[str] | None = None,
                              png_folder: str | os.PathLike | None = None) -> Path:
    """Write ``results`` (``PanopticResult``-like objects with ``id_map`` and ``segments_info``, or
    ``(id_map, segments_info)`` pairs) as COCO panoptic PNGs + JSON; returns the JSON path.

    PNGs are named ``file_names[i]`` or ``<image_id>.png`` and go to ``png_folder`` (default: the
    JSON path without suffix).
    """
    if len(results) != len(image_ids):
        raise UserInputError(f"got {len(results)} results but {len(image_ids)} image ids")
    if file_names is not None and len(file_names) != len(image_ids):
        raise UserInputError(f"got {len(file_names)} file names but {len(image_ids)} image ids")
    writer = PanopticPredictionWriter(json_path, png_folder, categories)
    for i, (result, image_id) in enumerate(zip(results, image_ids)):
        if hasattr(result, "id_map"):
            id_map, segments = result.id_map, result.segments_info
        else:
            id_map, segments = result
        writer.add(image_id, id_map, segments, file_names[i] if file_names is not None else None)
    return writer.close()
