"""What ``run_inference`` iterates over: ``InferenceSample``s, built from image files or a dataset.

* ``preprocess(image, min_size, max_size)``: the one preprocessing function (PIL image or ``[3, H, W]``
  uint8 / float-in-0..1 tensor -> normalised float ``[3, h, w]``); the dataset's evaluation transform runs
  the same kernels (``data.transforms.preprocess_image``).
* ``ImageFiles``: a ``torch.utils.data.Dataset`` of image paths (``predict``); an unreadable file
  raises, or with ``skip_bad`` becomes a ``Skipped`` item that ``run_inference`` reports.
* ``DatasetSamples``: a ``CocoPanopticDataset`` (or a ``Subset`` of one) as samples with their
  ground truth at the original size (``evaluate``, training validation, the demo).
* ``expand_inputs``: files, folders and globs -> image paths.
"""
from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from detr_panoptic.data.transforms import preprocess_image
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class InferenceSample:
    """One image on its way through the predictor.

    image: normalised float [3, h, w] (``preprocess``); orig_size: (H, W) of the result's id map.
    image_info: the COCO ``images`` entry (``id``, ``file_name``, ``height``, ``width``).
    file_name: name of the prediction PNG. path: the image file, when there is one; original: the RGB
    picture for overlays (kept by ``ImageFiles``, else loaded from ``path`` when needed).
    target: ground truth, when known: ``gt_id_map`` (Long [H, W], 0 = void) and ``gt_segments``
    (COCO ``segments_info``).
    """

    image: torch.Tensor
    orig_size: tuple[int, int]
    image_info: dict[str, Any]
    file_name: str
    path: Path | None = None
    original: Image.Image | None = None
    target: dict[str, Any] | None = None

    @property
    def image_id(self) -> int | str:
        return self.image_info["id"]


@dataclass(frozen=True)
class Skipped:
    """An input that could not be read (``skip_bad``)."""

    path: Path
    reason: str


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file as RGB in display orientation (EXIF); ``UserInputError`` naming it if unreadable."""
    try:
        with Image.open(path) as image:
            # Camera photos store their rotation in EXIF: predict on the picture as people see it.
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"input not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"cannot read image {path}: {exc}") from None


def image_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W]; a [3, H, W] tensor (uint8, or float in 0..1) is returned as it is."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UserInputError(f"expected a PIL image or an RGB tensor [3, H, W], got {shape}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise UserInputError(f"an image tensor must be uint8 or float in 0..1, got {image.dtype}")
    return image


def preprocess(image: Image.Image | torch.Tensor, min_size: int, max_size: int | None) -> torch.Tensor:
    """The model input for ``image``: resized as the model was trained, ImageNet-normalised, float [3, h, w]."""
    return preprocess_image(image_tensor(image), min_size, max_size)


# -- image files ------------------------------------------------------------------------------------
def _problem(message: str, skip_bad: bool, error: type[Exception] = UserInputError) -> None:
    if not skip_bad:
        raise error(message)
    log.warning("skipping: %s", message)


def expand_inputs(inputs: Sequence[str | Path], *, skip_bad: bool = False) -> list[Path]:
    """Image paths from files, folders (their image files, not recursive) and globs (``**`` recursive).

    A missing path, a glob matching nothing or a folder without images raises (``FileNotFoundError``
    / ``UserInputError`` naming it), or is skipped with a warning when ``skip_bad``. Files given
    explicitly are kept whatever their suffix: decoding decides. Order is kept; duplicates dropped.
    Raises ``UserInputError`` when no path at all remains.
    """
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            found = _images_in(path)
            if not found:
                _problem(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})", skip_bad)
            paths.extend(found)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            found = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            for folder in (m for m in matches if m.is_dir()):
                found.extend(_images_in(folder))
            if not found:
                _problem(f"pattern {raw!r} matches no image files", skip_bad, FileNotFoundError)
            paths.extend(found)
        else:
            _problem(f"input not found: {path}", skip_bad, FileNotFoundError)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    if not unique:
        raise UserInputError(f"no input images in {' '.join(map(str, inputs)) or '(nothing given)'}")
    return unique


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output stems for ``paths``: the file stem, with ``-2``, ``-3``... appended when a stem is taken."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, counter = path.stem, 1
        while name in taken:
            counter += 1
            name = f"{path.stem}-{counter}"
        taken.add(name)
        names.append(name)
    return names


def image_ids_for(names: Sequence[str]) -> list[int | str]:
    """COCO-style image ids: an int for all-digit names (``000000139`` -> 139, so predictions on COCO images
    compare with COCO ground truth), else the name; a second ``139`` (from ``0139``) keeps its name."""
    ids: list[int | str] = []
    used: set[int | str] = set()
    for name in names:
        image_id: int | str = int(name) if name.isdigit() else name
        if image_id in used:
            image_id = name
        used.add(image_id)
        ids.append(image_id)
    return ids


class ImageFiles(torch.utils.data.Dataset):
    """Image files as ``InferenceSample``s (``predict``); a ``DataLoader`` decodes them in its workers.

    ``names``: output stems (default ``unique_names(paths)``); the prediction PNG is ``<name>.png``.
    An unreadable file raises ``UserInputError`` naming it, or (``skip_bad``) gives a ``Skipped``.
    """

    def __init__(self, paths: Sequence[Path], *, min_size: int, max_size: int | None, skip_bad: bool = False,
                 names: Sequence[str] | None = None, keep_original: bool = True) -> None:
        self.paths = [Path(p) for p in paths]
        self.names = list(names) if names is not None else unique_names(self.paths)
        self.image_ids = image_ids_for(self.names)
        self.min_size, self.max_size = min_size, max_size
        self.skip_bad, self.keep_original = skip_bad, keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> InferenceSample | Skipped:
        path = self.paths[index]
        try:
            image = load_image(path)
        except (UserInputError, FileNotFoundError) as exc:
            if not self.skip_bad:
                raise
            return Skipped(path, str(exc))
        info = {"id": self.image_ids[index], "file_name": path.name, "height": image.height, "width": image.width}
        return InferenceSample(image=preprocess(image, self.min_size, self.max_size),
                               orig_size=(image.height, image.width), image_info=info,
                               file_name=f"{self.names[index]}.png", path=path,
                               original=image if self.keep_original else None)


# -- datasets with ground truth ---------------------------------------------------------------------------
class DatasetSamples(torch.utils.data.Dataset):
    """A ``CocoPanopticDataset`` (or a ``torch.utils.data.Subset`` of one) as ``InferenceSample``s.

    Each sample holds the original image preprocessed by ``preprocess`` and its ground truth at the
    original size (the panoptic PNG, never a resized cache): PQ is measured where the official figure
    is. The prediction PNG is named like the ground-truth PNG.
    """

    def __init__(self, dataset: Any, *, min_size: int, max_size: int | None) -> None:
        self.dataset, self.indices = _unwrap(dataset)
        self.min_size, self.max_size = min_size, max_size

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def category_map(self) -> Any:
        return self.dataset.category_map

    def annotation(self, position: int) -> dict[str, Any]:
        return self.dataset.annotations[self.indices[position]]

    def __getitem__(self, position: int) -> InferenceSample:
        index = self.indices[position]
        annotation = self.dataset.annotations[index]
        record = self.dataset.image_record(index)
        image, id_map = self.dataset.load_raw(index, use_cache=False)
        height, width = (int(v) for v in image.shape[-2:])
        info = {"id": annotation["image_id"], "file_name": record.get("file_name", annotation["file_name"]),
                "height": height, "width": width}
        return InferenceSample(image=preprocess(image, self.min_size, self.max_size), orig_size=(height, width),
                               image_info=info, file_name=annotation["file_name"],
                               path=Path(self.dataset.image_path(record)),
                               target={"gt_id_map": id_map.to(torch.int64),
                                       "gt_segments": annotation.get("segments_info", [])})


def _unwrap(dataset: Any) -> tuple[Any, list[int]]:
    """(COCO panoptic dataset, indices) for a ``CocoPanopticDataset`` or a ``Subset`` of one."""
    from detr_panoptic.data.coco_panoptic import CocoPanopticDataset

    if isinstance(dataset, torch.utils.data.Subset):
        base, inner = _unwrap(dataset.dataset)
        return base, [inner[i] for i in dataset.indices]
    if not isinstance(dataset, CocoPanopticDataset):
        raise UserInputError(f"evaluation needs a CocoPanopticDataset (or a Subset of one), got "
                             f"{type(dataset).__name__}")
    return dataset, list(range(len(dataset.annotations)))
