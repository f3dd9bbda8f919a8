"""A dataset for any COCO-panoptic annotation set (JSON + PNG folder + image folder), Cityscapes included.

Each item is ``(image, target)``: ``image`` a float ``[3, H, W]`` tensor (normalised by the default
transforms) and ``target`` the dict of docs/DEVELOPING.md "Targets":

* ``labels`` Long [N] class indices (``category_map.class_index`` of the category ids),
* ``boxes`` Float [N, 4] normalised cxcywh of the transformed image, computed from the masks after
  the transforms (pixel extent, DETR's ``masks_to_boxes`` convention),
* ``masks`` Bool [N, H, W] at the transformed size, ``area`` Float [N] (mask pixels after transforms),
* ``iscrowd`` Long [N], ``segment_ids`` Long [N], ``category_ids`` Long [N] from the annotation,
* ``image_id`` as given in the JSON (Cityscapes: a string), ``orig_size`` / ``size`` Long [2] (h, w).

Like the reference DETR loader (``CocoPanoptic`` + its ``ConvertCocoPanoptic``), every segment of the
annotation is kept, crowd segments included (``iscrowd`` = 1); the criterion decides what to do with
them. Segments with no pixel left (e.g. cut away by a crop) are dropped.

``collate`` returns ``(list of images, list of targets)``: the model and ``utils.batching.pad_images``
do the padding, so no padded batch is built here.

Optional cache (``cache_dir=``, filled as items are read, or all at once by ``prepare_cache``): the
image resized by the default fast path (uint8 ``.npy``) and the id map at the same size (``.npz``:
uint8 indices into the annotation's segment ids), about 5 MB per 800x1600 image, so that later epochs skip PNG/JPEG decoding and resizing. ``cache.json``
records ``min_size``/``max_size``; a cache made for other sizes is refused. With augmentation, the
random transforms then run on the cached (already resized) image.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.data.cityscapes import cityscapes_image_path, find_gtfine, panoptic_output_name
from detr_panoptic.data.transforms import compact_id_map, make_transforms, targets_from_id_map
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.png import read_id_png

ImagePathFn = Callable[[Mapping[str, Any]], "str | os.PathLike"]


def _decode(path: Path, what: str) -> torch.Tensor:
    """uint8 ``[3, H, W]``: torchvision's libpng/libjpeg decoders (faster than Pillow), else Pillow."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are still the fastest here.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file

            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (ImportError, RuntimeError):
            pass
    try:  # formats torchvision cannot decode (e.g. 16-bit or palette PNGs): Pillow
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:  # noqa: BLE001 - the file is broken in some way; name it
        raise UserInputError(f"{path}: cannot decode the {what} (corrupt or truncated?): {exc}") from None


def _read_panoptic_png(path: Path) -> torch.Tensor:
    """int32 ``[H, W]`` segment ids (``R + 256 G + 256^2 B``) of a panoptic PNG (``utils.png``: ~4 ms
    for a 2048x1024 PNG, against ~20 ms for torchvision's decoder plus packing)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: panoptic PNG not found")
    return torch.from_numpy(read_id_png(path).view(np.int32))


def load_coco_json(json_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO panoptic JSON not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserInputError(f"{path}: expected a COCO panoptic JSON with a {key!r} list")
    return data


class CocoPanopticDataset(torch.utils.data.Dataset):
    """COCO panoptic annotations as ``(image [3, H, W] float, target dict)`` items (see the module doc).

    Args:
        json_path: the COCO panoptic JSON (``images``, ``annotations``, ``categories``).
        panoptic_dir: folder of the panoptic PNGs named by each annotation's ``file_name``.
        image_dir: folder of the images named by each image record's ``file_name``.
        image_path_fn: instead of ``image_dir``: image record -> image path (Cityscapes needs this).
        category_map: category id <-> class index (default: contiguous over the JSON's categories).
        transforms: a callable ``(image, id_map, boxes) -> (image, id_map, boxes)`` on tv_tensors
            (default: ``make_transforms(min_size=min_size, max_size=max_size)``).
        validate: check at construction that there are annotations and that every annotation's image
            record, image file, PNG file and category exist (file existence only; ``check_dataset``
            also decodes the PNGs).
        cache_dir: a cache folder (optional; created and filled on first use, see the module doc).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        panoptic_dir: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        *,
        image_path_fn: ImagePathFn | None = None,
        category_map: CategoryMap | None = None,
        transforms: Callable[..., Any] | None = None,
        min_size: int = 800,
        max_size: int | None = 1333,
        validate: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        self.panoptic_dir = Path(panoptic_dir)
        if image_dir is None and image_path_fn is None:
            raise UserInputError("CocoPanopticDataset needs image_dir or image_path_fn")
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.image_path_fn = image_path_fn
        data = load_coco_json(self.json_path)
        self.category_map = category_map or CategoryMap.from_coco_json(data["categories"], source=str(self.json_path))
        self.images = {image["id"]: image for image in data["images"]}
        self.annotations: list[dict[str, Any]] = list(data["annotations"])
        self.min_size, self.max_size = min_size, max_size
        self.transforms = transforms if transforms is not None else make_transforms(min_size=min_size, max_size=max_size)
        self._class_of = {cid: i for i, cid in enumerate(self.category_map.class_ids) if cid >= 0}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            _open_cache(self.cache_dir, min_size, max_size)
        if validate:
            if not self.annotations:
                raise UserInputError(f"{self.json_path}: no images to train or evaluate on (its 'annotations' "
                                     "list is empty)")
            problems = self.validate()
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise UserInputError(f"{self.json_path}: {len(problems)} problem(s): " + "; ".join(problems[:5]) + more)

    # -- paths ----------------------------------------------------------------------------------
    def image_path(self, image_record: Mapping[str, Any]) -> Path:
        if self.image_path_fn is not None:
            return Path(self.image_path_fn(image_record))
        assert self.image_dir is not None
        return self.image_dir / image_record["file_name"]

    def panoptic_path(self, annotation: Mapping[str, Any]) -> Path:
        return self.panoptic_dir / annotation["file_name"]

    def image_record(self, index: int) -> dict[str, Any]:
        return self.images[self.annotations[index]["image_id"]]

    def validate(self) -> list[str]:
        """Cheap checks (no decoding): image records, image files, PNG files, category ids."""
        problems = []
        for ann in self.annotations:
            image_id = ann.get("image_id")
            if image_id not in self.images:
                problems.append(f"annotation {ann.get('file_name')!r} refers to image id {image_id!r}, not in 'images'")
                continue
            image_path = self.image_path(self.images[image_id])
            if not image_path.is_file():
                problems.append(f"image {image_path} of image id {image_id!r} is missing")
            if not self.panoptic_path(ann).is_file():
                problems.append(f"panoptic PNG {self.panoptic_path(ann)} is missing")
            for seg in ann.get("segments_info", []):
                if seg.get("category_id") not in self._class_of:
                    problems.append(f"{ann.get('file_name')}: segment {seg.get('id')} has category id "
                                    f"{seg.get('category_id')}, not one of the known categories")
        return problems

    # -- items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.annotations)

    def load_raw(self, index: int, *, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 [3, H, W], id map int32 [H, W]) at the cached (resized) or the original size.

        ``use_cache=False``: always the original files (evaluation compares at the original size).
        """
        ann = self.annotations[index]
        if self.cache_dir is not None and use_cache:
            image_file, ids_file = _cache_files(self.cache_dir, ann)
            if image_file.is_file() and ids_file.is_file():
                with np.load(ids_file) as stored:
                    id_map = stored["table"][stored["compact"]]
                return torch.from_numpy(np.load(image_file)), torch.from_numpy(id_map)
        image = _decode(self.image_path(self.image_record(index)), "image")
        id_map = _read_panoptic_png(self.panoptic_path(ann))
        if id_map.shape != image.shape[-2:]:
            raise UserInputError(f"{self.panoptic_path(ann)}: size {tuple(id_map.shape)} differs from the image's "
                                 f"{tuple(image.shape[-2:])} ({self.image_path(self.image_record(index))})")
        if self.cache_dir is not None and use_cache:
            image, id_map = _write_cache_entry(self.cache_dir, ann, image, id_map, self.min_size, self.max_size)
        return image, id_map

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        ann = self.annotations[index]
        record = self.image_record(index)
        image, id_map = self.load_raw(index)
        segments = ann.get("segments_info", [])
        orig_size = (int(record.get("height", image.shape[-2])), int(record.get("width", image.shape[-1])))
        if self.cache_dir is None:
            orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        # JSON boxes ([x, y, w, h]) ride along so that box-aware user transforms see them.
        xywh = torch.tensor([s.get("bbox", [0, 0, 0, 0]) for s in segments], dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([image.shape[-1] / orig_size[1], image.shape[-2] / orig_size[0]] * 2)
        boxes = tv_tensors.BoundingBoxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * scale,
                                         format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, id_map, _ = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(id_map.unsqueeze(0)), boxes)
        segment_ids = torch.tensor([int(s["id"]) for s in segments], dtype=torch.int64)
        parts = targets_from_id_map(id_map, segment_ids)
        keep = parts["keep"]
        category_ids = torch.tensor([int(s["category_id"]) for s in segments], dtype=torch.int64)
        try:
            labels = torch.tensor([self._class_of[int(c)] for c in category_ids.tolist()], dtype=torch.int64)
        except KeyError as exc:
            raise UserInputError(f"{self.panoptic_path(ann)}: category id {exc.args[0]} is not in the category map") from None
        iscrowd = torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64)
        image = image.as_subclass(torch.Tensor)
        target = {
            "labels": labels[keep],
            "boxes": parts["boxes"],
            "masks": parts["masks"],
            "iscrowd": iscrowd[keep],
            "area": parts["area"],
            "image_id": ann["image_id"],
            "orig_size": torch.tensor(orig_size, dtype=torch.int64),
            "size": torch.tensor(tuple(image.shape[-2:]), dtype=torch.int64),
            "segment_ids": segment_ids[keep],
            "category_ids": category_ids[keep],
        }
        return image, target


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``(list of images [3, H_i, W_i], list of targets)``; pad with ``utils.batching.pad_images``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------------
def cityscapes_panoptic_dataset(root: str | os.PathLike, split: str, use_train_id: bool = False,
                                **kwargs: Any) -> CocoPanopticDataset:
    """The converted Cityscapes split: ``<root>/gtFine/cityscapes_panoptic_<split>[_trainId].json``,
    its PNG folder, and images from ``<root>/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``.

    ``root`` is the Cityscapes root (holding ``leftImg8bit/`` and ``gtFine/``); other keyword
    arguments go to ``CocoPanopticDataset``.
    """
    root = Path(root)
    gtfine = find_gtfine(root)
    root = gtfine.parent
    base = panoptic_output_name(split, use_train_id)
    json_path = gtfine / f"{base}.json"
    if not json_path.is_file():
        flag = " --use-train-id" if use_train_id else ""
        raise FileNotFoundError(f"{json_path}: not found; run `detr-panoptic convert-cityscapes {gtfine} "
                                f"--splits {split}{flag}` first")

    return CocoPanopticDataset(json_path, gtfine / base, image_path_fn=CityscapesImagePath(root, split), **kwargs)


@dataclass(frozen=True)
class CityscapesImagePath:
    """Image record -> ``<root>/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` (picklable, for spawned
    DataLoader workers)."""

    root: Path
    split: str

    def __call__(self, record: Mapping[str, Any]) -> Path:
        return cityscapes_image_path(self.root, self.split, record["id"])


# ---------------------------------------------------------------------------------------------------
# Prepared cache
# ---------------------------------------------------------------------------------------------------
CACHE_META = "cache.json"
CACHE_FORMAT = 2


def _cache_files(cache_dir: Path, annotation: Mapping[str, Any]) -> tuple[Path, Path]:
    stem = Path(str(annotation["file_name"])).stem
    return cache_dir / f"{stem}.image.npy", cache_dir / f"{stem}.ids.npz"


def _open_cache(cache_dir: Path, min_size: int, max_size: int | None) -> None:
    """Create the cache folder and its ``cache.json``, or check that an existing one has these sizes."""
    from detr_panoptic.utils.io import atomic_write_json

    meta_path = cache_dir / CACHE_META
    if not meta_path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {"format": CACHE_FORMAT, "min_size": min_size, "max_size": max_size})
        return
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{meta_path}: not valid JSON ({exc}); delete the cache folder") from None
    if meta.get("format") != CACHE_FORMAT:
        raise UserInputError(f"{cache_dir}: a cache of format {meta.get('format')}, this version writes "
                             f"{CACHE_FORMAT}: delete the folder or use another cache_dir")
    if meta.get("min_size") != min_size or meta.get("max_size") != max_size:
        raise UserInputError(f"{cache_dir}: the cache was prepared for min_size={meta.get('min_size')}, "
                             f"max_size={meta.get('max_size')}, not {min_size}, {max_size}: use another cache_dir "
                             "or delete this one")


def _write_cache_entry(cache_dir: Path, annotation: Mapping[str, Any], image: torch.Tensor, id_map: torch.Tensor,
                       min_size: int, max_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize by the fast path, save both arrays atomically (``.npy``), return the resized pair."""
    from detr_panoptic.utils.io import atomic_path

    resize = make_transforms(min_size=min_size, max_size=max_size, normalize=False)
    image, id_map = resize(tv_tensors.Image(image), tv_tensors.Mask(id_map.unsqueeze(0)))
    image, id_map = image.as_subclass(torch.Tensor), id_map.as_subclass(torch.Tensor)[0]
    # The id map is stored as 1 + index into the annotation's segment ids (uint8 below 255 segments)
    # plus that table: a quarter of the int32 size. Ids of no listed segment become 0 (void), which
    # changes no target.
    segment_ids = np.array([int(s["id"]) for s in annotation.get("segments_info", [])], np.int64)
    table = np.concatenate([[0], segment_ids]).astype(np.int32)
    image_file, ids_file = _cache_files(cache_dir, annotation)
    with atomic_path(image_file, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(image.numpy()))
    compact = compact_id_map(id_map.numpy(), segment_ids)
    with atomic_path(ids_file, suffix=".npz") as tmp:
        np.savez(tmp, compact=compact, table=table)
    return image, torch.from_numpy(table[compact])


def prepare_cache(dataset: CocoPanopticDataset, cache_dir: str | os.PathLike | None = None, *,
                  progress: bool = True) -> Path:
    """Fill the cache for every item now (instead of during the first epoch); returns the cache folder.

    ``cache_dir`` defaults to the dataset's own; otherwise the dataset is switched to the given one.
    Existing entries are kept, so an interrupted preparation resumes.
    """
    from tqdm import tqdm

    if cache_dir is not None:
        dataset.cache_dir = Path(cache_dir)
    if dataset.cache_dir is None:
        raise UserInputError("prepare_cache needs a cache_dir (or a dataset made with cache_dir=...)")
    _open_cache(dataset.cache_dir, dataset.min_size, dataset.max_size)
    for index in tqdm(range(len(dataset)), desc="prepare cache", unit="img", disable=not progress):
        if not all(p.is_file() for p in _cache_files(dataset.cache_dir, dataset.annotations[index])):
            dataset.load_raw(index)
    return dataset.cache_dir
