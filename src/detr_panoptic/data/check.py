"""``check_dataset``: find what would break training or ``pq_compute`` in a COCO panoptic dataset.

Reports, each with the file names involved: an annotation whose image record or image file is
missing, a missing or undecodable panoptic PNG, a PNG whose size differs from its image record, a
segment id of the JSON absent from the PNG, a PNG id (other than 0 = void) absent from the JSON,
duplicate segment ids, and a category id that is not in ``categories``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.data.cityscapes import available_cores, find_gtfine, panoptic_output_name
from detr_panoptic.data.coco_panoptic import CityscapesImagePath, load_coco_json
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.parallel import map_in_processes
from detr_panoptic.utils.png import read_id_png


def _png_ids(path: Path) -> tuple[np.ndarray | None, tuple[int, int] | None, str | None]:
    """(ids present, (h, w), error message) of a panoptic PNG."""
    try:
        ids = read_id_png(path)
    except FileNotFoundError:
        return None, None, f"panoptic PNG {path} is missing"
    except UserInputError as exc:  # names the file and what is wrong with it
        return None, None, f"panoptic PNG {exc}"
    # Every id present starts some horizontal run: np.unique over run starts only (few) is much
    # cheaper than over all pixels.
    starts = np.ones(ids.shape, bool)
    np.not_equal(ids[:, 1:], ids[:, :-1], out=starts[:, 1:])
    return np.unique(ids[starts]), (int(ids.shape[0]), int(ids.shape[1])), None


def _check_png(job: tuple[str, list[Any], tuple[Any, Any] | None, str]) -> list[str]:
    """Problems of one panoptic PNG against its JSON segment ids (and image record size)."""
    png_name, json_ids, record_size, json_name = job
    png = Path(png_name)
    present, size, error = _png_ids(png)
    if error:
        return [error]
    problems = []
    if record_size is not None and record_size != size:
        problems.append(f"{png}: size {size[0]}x{size[1]} differs from the image record's "
                        f"{record_size[0]}x{record_size[1]}")
    present_set = set(present.tolist()) - {0}
    missing = sorted(set(json_ids) - present_set, key=str)
    extra = sorted(present_set - set(json_ids))
    if missing:
        problems.append(f"{png}: segment id(s) {missing[:10]} of {json_name} are absent from the PNG")
    if extra:
        problems.append(f"{png}: PNG id(s) {extra[:10]} are absent from {json_name}'s segments_info")
    return problems


def check_dataset(
    json_path: str | os.PathLike,
    panoptic_dir: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    image_path_fn: Callable[[Mapping[str, Any]], str | os.PathLike] | None = None,
    check_images: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Problems found in a COCO panoptic dataset, one readable line each (empty list: all good).

    Images are only checked for existence (``check_images``; needs ``image_dir`` or ``image_path_fn``).
    Every panoptic PNG is decoded, by ``workers`` processes (default: all cores).
    """
    from tqdm import tqdm

    json_path = Path(json_path)
    panoptic_dir = Path(panoptic_dir)
    data = load_coco_json(json_path)
    problems: list[str] = []
    category_ids = {c.get("id") for c in data["categories"]}
    images = {image.get("id"): image for image in data["images"]}
    if check_images and image_dir is None and image_path_fn is None:
        check_images = False
    jobs = []
    for ann in data["annotations"]:
        png = panoptic_dir / str(ann.get("file_name"))
        image_id = ann.get("image_id")
        record = images.get(image_id)
        if record is None:
            problems.append(f"{json_path}: annotation {ann.get('file_name')!r} refers to image id {image_id!r}, "
                            "which is not in 'images'")
        elif check_images:
            image_path = Path(image_path_fn(record)) if image_path_fn is not None else Path(image_dir) / record["file_name"]
            if not image_path.is_file():
                problems.append(f"image {image_path} (image id {image_id!r}) is missing")
        segments = ann.get("segments_info", [])
        json_ids = [s.get("id") for s in segments]
        if len(set(json_ids)) != len(json_ids):
            duplicates = sorted({i for i in json_ids if json_ids.count(i) > 1})
            problems.append(f"{json_path}: annotation {png.name} lists segment id(s) {duplicates} twice")
        for segment in segments:
            if segment.get("category_id") not in category_ids:
                problems.append(f"{json_path}: segment {segment.get('id')} of {png.name} has category id "
                                f"{segment.get('category_id')}, which is not in 'categories'")
        record_size = None if record is None else (record.get("height"), record.get("width"))
        jobs.append((str(png), json_ids, record_size, json_path.name))

    workers = available_cores() if workers is None else max(1, int(workers))
    # The pool starts before the progress bar's monitor thread, so that it may fork (utils.parallel).
    found = (map_in_processes(_check_png, jobs, workers) if workers > 1 and len(jobs) > 1
             else (_check_png(job) for job in jobs))
    with contextlib.closing(found), tqdm(total=len(jobs), desc="check", unit="img", disable=not progress) as bar:
        for problems_of_png in found:
            problems += problems_of_png
            bar.update(1)
    return problems


def check_cityscapes(root: str | os.PathLike, split: str, use_train_id: bool = False, **kwargs: Any) -> list[str]:
    """``check_dataset`` on a converted Cityscapes split (``root`` holds ``gtFine/`` and ``leftImg8bit/``)."""
    gtfine = find_gtfine(root)
    base = panoptic_output_name(split, use_train_id)
    json_path = gtfine / f"{base}.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: not found; run `detr-panoptic convert-cityscapes {gtfine}` first")
    return check_dataset(json_path, gtfine / base, image_path_fn=CityscapesImagePath(gtfine.parent, split), **kwargs)
