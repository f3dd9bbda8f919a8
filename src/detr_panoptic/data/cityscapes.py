"""Cityscapes -> COCO panoptic conversion, identical in output to cityscapesScripts' ``convert2panoptic``.

The reference (``cityscapesscripts.preparation.createPanopticImgs``) reads
``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` (16-bit; value ``v < 1000`` is a class id, a crowd
region for classes with instances; ``v >= 1000`` is instance ``v % 1000`` of class ``v // 1000``),
drops ``ignoreInEval`` classes and writes, per split, ``cityscapes_panoptic_<split>[_trainId].json``
(``json.dump(..., sort_keys=True, indent=4)``) and a folder of RGB PNGs (id = R + 256 G + 256^2 B, the
segment id is the instanceIds value itself). We write the same JSON bytes and the same PNG pixels
(the PNG *files* may be compressed differently: we use a faster zlib level), but:

* images are converted in parallel (``workers`` processes, default all cores), each with a few
  vectorised numpy passes (``bincount`` for areas, one per-row / per-column histogram for the boxes)
  instead of one full-image mask per segment;
* the run is restartable: each finished image leaves its PNG (written to a temporary name, then
  renamed) and a small JSON record in a hidden work folder ``.cityscapes_panoptic_<split>.work/``
  beside the output; a rerun skips images that already have both, and the work folder is removed once
  the split's JSON is written (atomically);
* bad input raises ``UserInputError``/``FileNotFoundError`` naming the file and the problem, where the
  reference prints an error and exits, or fails with a ``KeyError``/traceback.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path, check_writable_folder, remove_stale_temporaries
from detr_panoptic.utils.parallel import available_cores, map_in_processes
from detr_panoptic.utils.png import decode_grey16_png, encode_id_png

log = logging.getLogger(__name__)

DEFAULT_SPLITS: tuple[str, ...] = ("val", "train", "test")
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
# Pillow modes of a 16-bit greyscale PNG (mode "I" comes from older Pillow versions).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
# zlib level of the panoptic PNGs: faster than Pillow's default 6; the pixels are the same.


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# atomic_path's temporary files are created 0600 (mkstemp); outputs get the usual 0666 & ~umask.
FILE_MODE = 0o666 & ~_umask()


# ---------------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------------
def find_gtfine(path: str | os.PathLike) -> Path:
    """The ``gtFine`` folder given either that folder or the Cityscapes root that contains it."""
    path = Path(path)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "no such folder"
        raise FileNotFoundError(f"{path}: {problem} (expected Cityscapes' gtFine folder or the root holding it)")
    if path.name != "gtFine" and (path / "gtFine").is_dir():
        return path / "gtFine"
    return path


def city_of(image_id: str) -> str:
    """City of a Cityscapes image id ``<city>_<seq:06d>_<frame:06d>`` (city names use hyphens, not _)."""
    parts = str(image_id).rsplit("_", 2)
    if len(parts) != 3:
        raise UserInputError(f"{image_id!r} is not a Cityscapes image id (<city>_<sequence>_<frame>)")
    return parts[0]


def cityscapes_image_path(root: str | os.PathLike, split: str, image_id: str) -> Path:
    """``<root>/leftImg8bit/<split>/<city>/<image_id>_leftImg8bit.png`` for a Cityscapes image id.

    The panoptic JSON's image ``file_name`` (``..._gtFine_leftImg8bit.png``) is not a real file name,
    so loaders map by image id with this function.
    """
    return Path(root) / "leftImg8bit" / split / city_of(image_id) / f"{image_id}_leftImg8bit.png"


def panoptic_output_name(split: str, use_train_id: bool = False) -> str:
    """``cityscapes_panoptic_<split>`` (+ ``_trainId``): the JSON's stem and the PNG folder's name."""
    return f"cityscapes_panoptic_{split}{'_trainId' if use_train_id else ''}"


def instance_files(gtfine_dir: str | os.PathLike, split: str) -> list[str]:
    """Sorted ``<gtFine>/<split>/*/*_instanceIds.png`` paths, exactly as the reference finds them."""
    pattern = os.path.join(str(gtfine_dir), split, "*", "*_instanceIds.png")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no instance id files for split {split!r}: nothing matches {pattern}")
    return files


# ---------------------------------------------------------------------------------------------------
# Label tables (from cityscapesscripts' labels.py)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LabelTables:
    """Per label id 0..255: defined?, category id written, kept (not ignoreInEval)?, hasInstances?"""

    defined: np.ndarray
    category: np.ndarray
    kept: np.ndarray
    has_instances: np.ndarray


def _label_tables(use_train_id: bool) -> _LabelTables:
    from cityscapesscripts.helpers.labels import labels

    size = 256
    defined = np.zeros(size, bool)
    category = np.zeros(size, np.int64)
    kept = np.zeros(size, bool)
    has_instances = np.zeros(size, bool)
    for label in labels:
        if label.id < 0:  # "license plate": id -1 never occurs in a uint16 image
            continue
        defined[label.id] = True
        category[label.id] = label.trainId if use_train_id else label.id
        kept[label.id] = not label.ignoreInEval
        has_instances[label.id] = label.hasInstances
    return _LabelTables(defined, category, kept, has_instances)


def cityscapes_categories(use_train_id: bool = False) -> list[dict[str, Any]]:
    """The ``categories`` list of the converted JSON (labels that are not ``ignoreInEval``)."""
    from cityscapesscripts.helpers.labels import labels

    return [
        {"id": int(label.trainId) if use_train_id else int(label.id), "name": label.name,
         "color": list(label.color), "supercategory": label.category,
         "isthing": 1 if label.hasInstances else 0}
        for label in labels if not label.ignoreInEval
    ]


# ---------------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------------
def read_instance_ids(path: str | os.PathLike) -> np.ndarray:
    """Decode a 16-bit ``*_instanceIds.png`` to uint16 ``[H, W]``; errors name the file and the problem.

    zlib-ng and our C unfilter decode it (``utils.png.decode_grey16_png``), else Pillow."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    array = decode_grey16_png(data, str(path))
    if array is not None:
        return array
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            if mode not in SIXTEEN_BIT_MODES:
                raise UserInputError(
                    f"{path}: expected a 16-bit greyscale instance id PNG, got Pillow mode {mode!r}"
                    + (" (an 8-bit PNG: ids >= 1000 cannot be stored in it)" if mode in ("L", "P", "1") else "")
                )
            array = np.asarray(image)
    except UserInputError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        what = "an empty file" if not data else f"not a PNG (it starts with {data[:8]!r})"
        raise UserInputError(f"{path}: cannot decode the instance id PNG: {what}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow: truncated data, bad CRC ...
        raise UserInputError(f"{path}: cannot decode the PNG (corrupt or truncated file?): {exc}") from None
    if array.ndim != 2:
        raise UserInputError(f"{path}: expected a single-channel instance id PNG, got shape {array.shape}")
    if array.dtype != np.uint16:
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UserInputError(f"{path}: instance ids must fit in 16 bits")
        array = array.astype(np.uint16)
    return array


def _segments(ids: np.ndarray, path: str, tables: _LabelTables) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Segment records (sorted by id, as ``np.unique`` orders them) and the uint16 id map of kept ids."""
    counts = np.bincount(ids.ravel(), minlength=65536)
    present = np.flatnonzero(counts)
    semantic = np.where(present < 1000, present, present // 1000)
    undefined = (semantic >= tables.defined.size) | ~tables.defined[np.minimum(semantic, tables.defined.size - 1)]
    if undefined.any():
        bad = present[undefined]
        raise UserInputError(
            f"{path}: pixel value(s) {bad[:10].tolist()} use label id(s) "
            f"{sorted(set(semantic[undefined].tolist()))[:10]} that Cityscapes does not define (labels.py ids 0..33)"
        )
    keep = tables.kept[semantic]
    segment_ids = present[keep]
    semantic = semantic[keep]
    lut = np.zeros(65536, np.uint16)
    lut[segment_ids] = segment_ids
    id_map = lut[ids]
    if segment_ids.size == 0:
        return [], id_map
    x0, y0, x1, y1 = _boxes_from_runs(ids)
    x0, y0, x1, y1 = x0[segment_ids], y0[segment_ids], x1[segment_ids], y1[segment_ids]

    crowd = (segment_ids < 1000) & tables.has_instances[semantic]
    category = tables.category[semantic]
    segments = [
        {"id": int(segment_ids[i]), "category_id": int(category[i]), "area": int(counts[segment_ids[i]]),
         "bbox": [int(x0[i]), int(y0[i]), int(x1[i] - x0[i] + 1), int(y1[i] - y0[i] + 1)],
         "iscrowd": int(crowd[i])}
        for i in range(segment_ids.size)
    ]
    return segments, id_map


def _boxes_from_runs(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inclusive pixel boxes ``(x0, y0, x1, y1)``, each indexed by id (size 65536), of a uint16 map.

    Works on horizontal runs of equal ids (a label map has few): a segment's x extent is the min of
    its runs' starts and the max of their ends, its y extent the rows holding its runs.
    """
    height, width = ids.shape
    starts = np.empty((height, width), bool)
    starts[:, 0] = True
    np.not_equal(ids[:, 1:], ids[:, :-1], out=starts[:, 1:])
    rows, first = np.nonzero(starts)  # row-major: runs in reading order
    values = ids[rows, first]
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    row_ends = np.append(rows[1:] != rows[:-1], True)
    last[row_ends] = width - 1
    x0 = np.full(65536, width, np.int64)
    x1 = np.full(65536, -1, np.int64)
    y0 = np.full(65536, height, np.int64)
    y1 = np.full(65536, -1, np.int64)
    np.minimum.at(x0, values, first)
    np.maximum.at(x1, values, last)
    np.minimum.at(y0, values, rows)
    np.maximum.at(y1, values, rows)
    return x0, y0, x1, y1


def encode_panoptic_png(id_map: np.ndarray) -> Image.Image:
    """RGB image with id = R + 256 G + 256^2 B for an integer id map ``[H, W]``."""
    id_map = np.asarray(id_map, dtype=np.uint32)
    rgb = np.empty((*id_map.shape, 3), np.uint8)
    rgb[..., 0] = id_map & 255
    rgb[..., 1] = (id_map >> 8) & 255
    rgb[..., 2] = (id_map >> 16) & 255
    return Image.fromarray(rgb, mode="RGB")


def convert_image(instance_path: str, panoptic_dir: str, tables: _LabelTables) -> dict[str, Any]:
    """Convert one ``*_instanceIds.png``: write its panoptic PNG, return its image + annotation records."""
    ids = read_instance_ids(instance_path)
    file_name = os.path.basename(instance_path)
    image_id = file_name.replace(INSTANCE_SUFFIX, "")
    output_name = file_name.replace("_instanceIds.png", "_panoptic.png")
    segments, id_map = _segments(ids, instance_path, tables)
    with atomic_path(os.path.join(panoptic_dir, output_name)) as tmp:
        tmp.write_bytes(encode_id_png(id_map))
        os.chmod(tmp, FILE_MODE)
    return {
        "image": {"id": image_id, "width": int(ids.shape[1]), "height": int(ids.shape[0]),
                  "file_name": file_name.replace("_instanceIds.png", "_leftImg8bit.png")},
        "annotation": {"image_id": image_id, "file_name": output_name, "segments_info": segments},
    }


# ---------------------------------------------------------------------------------------------------
# Restartable work folder
# ---------------------------------------------------------------------------------------------------
def _record_path(work_dir: Path, instance_path: str) -> Path:
    return work_dir / (os.path.basename(instance_path).replace(INSTANCE_SUFFIX, "") + ".json")


def _source_stamp(instance_path: str) -> list[int]:
    stat = os.stat(instance_path)
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def _load_record(work_dir: Path, panoptic_dir: str, instance_path: str) -> dict[str, Any] | None:
    """A finished image's record, if its record and PNG exist and its source has not changed since."""
    path = _record_path(work_dir, instance_path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != _source_stamp(instance_path):
        return None
    if not os.path.isfile(os.path.join(panoptic_dir, record["annotation"]["file_name"])):
        return None
    return record


def _convert_and_record(job: tuple[str, str, str, bool]) -> dict[str, Any]:
    instance_path, panoptic_dir, work_dir, use_train_id = job
    record = convert_image(instance_path, panoptic_dir, _tables_for(use_train_id))
    record["source"] = _source_stamp(instance_path)
    # Atomic (rename) but not fsync'ed: a killed process cannot leave half a record; a power cut may
    # lose recent ones, which a rerun then redoes.
    with atomic_path(_record_path(Path(work_dir), instance_path)) as tmp:
        tmp.write_text(json.dumps(record))
    return record


_TABLES: dict[bool, _LabelTables] = {}


def _tables_for(use_train_id: bool) -> _LabelTables:
    if use_train_id not in _TABLES:
        _TABLES[use_train_id] = _label_tables(use_train_id)
    return _TABLES[use_train_id]


def _map_jobs(jobs: list[tuple[str, str, str, bool]], workers: int) -> Iterator[dict[str, Any]]:
    """The jobs' records in order. A pool (``utils.parallel.map_in_processes``) starts here, at the
    call: before the caller's progress bar starts its monitor thread, so that the pool may fork. On an
    error or an interrupt the queued images are dropped: their records are simply missing and a rerun
    converts them."""
    if workers <= 1 or len(jobs) <= 1:
        return (_convert_and_record(job) for job in jobs)
    return map_in_processes(_convert_and_record, jobs, workers)


# ---------------------------------------------------------------------------------------------------
# The converter
# ---------------------------------------------------------------------------------------------------
def convert_cityscapes(
    gtfine_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    use_train_id: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Convert Cityscapes ``gtFine`` annotations to COCO panoptic, like cityscapesScripts' ``convert2panoptic``.

    Args:
        gtfine_dir: the ``gtFine`` folder, or the Cityscapes root that contains it.
        output: output folder (default: the ``gtFine`` folder, as the reference does).
        splits: the splits to convert; every one must have ``<split>/*/*_instanceIds.png`` files.
        use_train_id: write train ids as category ids; file names get the suffix ``_trainId``.
        workers: processes (default: all cores; 1 converts in this process).
        progress: show a tqdm progress bar per split.

    Returns ``{split: path of cityscapes_panoptic_<split>[_trainId].json}``; the PNGs are in the folder
    of the same name without ``.json``. A rerun after a kill resumes where the run stopped.
    """
    gtfine = find_gtfine(gtfine_dir)
    output_dir = Path(output) if output is not None else gtfine
    if isinstance(splits, str):
        splits = [splits]
    if not splits:
        raise UserInputError("no splits to convert")
    workers = available_cores() if workers is None else int(workers)
    if workers < 1:
        raise UserInputError(f"workers must be >= 1, got {workers}")
    files_per_split = {split: instance_files(gtfine, split) for split in splits}  # fail before any work
    _check_output_folder(output_dir)
    categories = cityscapes_categories(use_train_id)
    written: dict[str, Path] = {}
    for split, files in files_per_split.items():
        written[split] = _convert_split(split, files, output_dir, categories, use_train_id, workers, progress)
    return written


def _check_output_folder(output_dir: Path) -> None:
    """Fail before any work when the output folder cannot be made or written (creates nothing)."""
    check_writable_folder(output_dir, what="output folder")


def _convert_split(split: str, files: list[str], output_dir: Path, categories: list[dict[str, Any]],
                   use_train_id: bool, workers: int, progress: bool) -> Path:
    base = panoptic_output_name(split, use_train_id)
    json_path = output_dir / f"{base}.json"
    panoptic_dir = output_dir / base
    work_dir = output_dir / f".{base}.work"
    panoptic_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(panoptic_dir)  # left by a run killed mid-write
    remove_stale_temporaries(work_dir)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for path in files:
        record = _load_record(work_dir, str(panoptic_dir), path)
        if record is None:
            todo.append((path, str(panoptic_dir), str(work_dir), use_train_id))
        else:
            records[path] = record
    log.info("%s: %d images (%d already converted) -> %s", split, len(files), len(records), json_path)

    from tqdm import tqdm

    results = _map_jobs(todo, min(workers, max(len(todo), 1)))
    with contextlib.closing(results), tqdm(total=len(files), initial=len(records), desc=f"convert {split}",
                                           unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for job, record in zip(todo, results):
            records[job[0]] = record
            bar.update(1)

    ordered = [records[path] for path in files]
    document = {"images": [r["image"] for r in ordered], "annotations": [r["annotation"] for r in ordered],
                "categories": categories}
    # The reference writes json.dump(d, f, sort_keys=True, indent=4): same separators, ASCII escapes.
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(document, sort_keys=True, indent=4))
        os.chmod(tmp, FILE_MODE)
    for record_file in work_dir.glob("*.json"):
        record_file.unlink()
    with contextlib.suppress(OSError):
        work_dir.rmdir()
    return json_path

