"""Inference on image files: find inputs, stream and batch them, run ``predict``, write outputs.

The ``predict`` and ``attention`` commands are thin wrappers over these functions:

* ``expand_inputs`` turns files, folders and globs into a list of paths (cheap; nothing is decoded);
* ``iter_predictions`` decodes images in a background thread with a bounded queue (at most
  ``prefetch`` batches waiting), batches them, runs ``model.predict`` and yields one ``Prediction``
  per image with its ``PanopticResult`` at the original image size;
* ``predict_to_folder`` writes COCO panoptic PNGs, overlays and one ``predictions.json``;
* ``compute_attention`` runs one image with attention weights, for the attention figures.
"""
from __future__ import annotations

import glob
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.data.transforms import detr_resize_size
from detr_panoptic.engine.distributed import resolve_device
from detr_panoptic.models.outputs import PanopticResult
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
T = TypeVar("T")


# -- inputs -------------------------------------------------------------------------------------
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


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file as RGB; ``UserInputError`` naming the file if it is not a readable image."""
    try:
        with Image.open(path) as image:
            # Camera photos store their rotation in EXIF: predict on the picture as people see it.
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"input not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"cannot read image {path}: {exc}") from None


def preprocess(image: Image.Image, size: int | None = 800, max_size: int | None = 1333) -> torch.Tensor:
    """PIL image -> normalised ``[3, h, w]`` float tensor, resized as the model was trained (None: keep size)."""
    tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
    if size is not None:
        tensor = TF.resize(tensor, list(detr_resize_size(image.height, image.width, size, max_size)), antialias=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class LoadedImage:
    path: Path
    image: Image.Image      # original, RGB
    tensor: torch.Tensor    # normalised, resized [3, h, w]


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead of the consumer.

    An exception raised while producing an item is re-raised in the consumer at that item. Closing
    the generator early stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer and raised there
            put(("error", exc))
            return
        put(("done", done))

    thread = threading.Thread(target=produce, name="image-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def iter_loaded(paths: Iterable[Path], *, size: int | None, max_size: int | None, skip_bad: bool,
                skipped: list[tuple[Path, str]] | None = None) -> Iterator[LoadedImage]:
    """Decode and preprocess ``paths`` one by one; bad files raise or (``skip_bad``) are logged and skipped."""
    for path in paths:
        try:
            image = load_image(path)
        except (UserInputError, FileNotFoundError) as exc:
            if not skip_bad:
                raise
            log.warning("skipping: %s", exc)
            if skipped is not None:
                skipped.append((Path(path), str(exc)))
            continue
        yield LoadedImage(Path(path), image, preprocess(image, size, max_size))


def batched(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- running the model ----------------------------------------------------------------------------
@dataclass
class Prediction:
    path: Path
    image: Image.Image          # original RGB image
    result: PanopticResult      # id map at the original size, on the CPU


def model_input_size(model: torch.nn.Module, size: int | None = None,
                     max_size: int | None = None) -> tuple[int, int]:
    """The resize for ``model``'s input images, ``(shorter side, longer side at most)``: the values
    given, else the ones its checkpoint was trained with (``model.input_size``, set by
    ``checkpoints.load_pretrained``), else DETR's 800 / 1333. A model trained on small images sees
    nonsense when its inputs are resized to 800."""
    recorded = getattr(model, "input_size", None) or (800, 1333)
    chosen = (size if size is not None else recorded[0], max_size if max_size is not None else recorded[1])
    if chosen != (size, max_size):
        log.info("input images resized to a shorter side of %d, longer at most %d (%s)", *chosen,
                 "the checkpoint's training size" if getattr(model, "input_size", None) else "DETR's default")
    return chosen


def model_category_map(model: torch.nn.Module) -> CategoryMap:
    category_map = getattr(model, "category_map", None)
    if category_map is None:
        raise UserInputError("the checkpoint carries no categories (model.category_map is missing)")
    return category_map


def iter_predictions(
    model: torch.nn.Module,
    paths: Sequence[Path],
    *,
    category_map: CategoryMap,
    threshold: float = 0.85,
    size: int | None = 800,
    max_size: int | None = 1333,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    skip_bad: bool = False,
    prefetch_batches: int = 2,
    skipped: list[tuple[Path, str]] | None = None,
) -> Iterator[Prediction]:
    """Stream ``paths`` through ``model.predict``; one ``Prediction`` per readable image, in order.

    Images are decoded in a background thread, at most ``prefetch_batches * batch_size`` ahead.
    Unreadable files raise ``UserInputError`` naming the file, or are appended to ``skipped`` and
    logged when ``skip_bad``.
    """
    device = resolve_device(device)
    model.eval().to(device)
    is_thing = category_map.is_thing().to(device)
    class_to_category = category_map.class_to_category_tensor().to(device)
    loaded = iter_loaded(paths, size=size, max_size=max_size, skip_bad=skip_bad, skipped=skipped)
    for batch in prefetch(batched(loaded, batch_size), depth=prefetch_batches):
        with torch.inference_mode():
            results = model.predict(
                [item.tensor.to(device) for item in batch], threshold=threshold, is_thing=is_thing,
                target_sizes=[(item.image.height, item.image.width) for item in batch],
                class_to_category=class_to_category,
            )
        for item, result in zip(batch, results):
            yield Prediction(item.path, item.image, PanopticResult(result.id_map.cpu(), result.segments_info))


# -- writing outputs ------------------------------------------------------------------------------
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


def image_id_for(name: str) -> int | str:
    """COCO-style image id for an output name: an int for all-digit names (``000000139`` -> 139), else the name.

    So predictions on COCO images are directly comparable with COCO ground truth.
    """
    return int(name) if name.isdigit() else name


def check_options(*, threshold: float, size: int | None, max_size: int | None, batch_size: int = 1) -> None:
    """``UserInputError`` for option values that cannot work, before any file is touched."""
    if not 0.0 <= threshold < 1.0:
        raise UserInputError(f"threshold must be in [0, 1), got {threshold}")
    if size is not None and size < 1:
        raise UserInputError(f"size must be a positive number of pixels, got {size}")
    if max_size is not None and size is not None and max_size < size:
        raise UserInputError(f"max size {max_size} is smaller than size {size}")
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class PredictSummary:
    out_dir: Path
    predictions_json: Path | None
    processed: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def predict_to_folder(
    model: torch.nn.Module,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    category_map: CategoryMap | None = None,
    threshold: float = 0.85,
    size: int | None = 800,
    max_size: int | None = 1333,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    skip_bad: bool = False,
    overlays: bool = True,
    progress: bool = True,
    draw: Callable[..., torch.Tensor] | None = None,
) -> PredictSummary:
    """Predict every input image and write, under ``out_dir``:

    * ``predictions/<name>.png``: COCO panoptic PNG at the original image size (id = R + 256 G + 256^2 B);
    * ``overlays/<name>.png``: the prediction drawn over the image (``visualize.draw_panoptic``);
    * ``predictions.json``: COCO panoptic ``images``, ``annotations`` (``image_id``, ``file_name``,
      ``segments_info``) and ``categories``, written atomically once all images are done.

    ``<name>`` is the input's stem (made unique). Raises ``UserInputError`` if no image could be
    processed (every input bad, under ``skip_bad``).
    """
    from tqdm import tqdm

    from detr_panoptic.evaluation import PanopticPredictionWriter
    from detr_panoptic.visualize.overlay import draw_panoptic, save_image

    check_options(threshold=threshold, size=size, max_size=max_size, batch_size=batch_size)
    draw = draw or draw_panoptic
    category_map = category_map or model_category_map(model)
    paths = expand_inputs(inputs, skip_bad=skip_bad)
    names = dict(zip(paths, unique_names(paths)))
    out_dir = Path(out_dir)
    overlay_dir = out_dir / "overlays"
    summary = PredictSummary(out_dir=out_dir, predictions_json=None)
    # The writer checks ids (PNG ids == JSON ids, no stray pixels), counts areas and boxes on the
    # id map and drops segments with no pixel; we add the ``images`` list to its JSON.
    writer = PanopticPredictionWriter(out_dir / "predictions.json", out_dir / "predictions", category_map)
    images: list[dict[str, Any]] = []
    used_ids: set[int | str] = set()
    stream = iter_predictions(model, paths, category_map=category_map, threshold=threshold, size=size,
                              max_size=max_size, batch_size=batch_size, device=device, skip_bad=skip_bad,
                              skipped=summary.skipped)
    for prediction in tqdm(stream, total=len(paths), unit="image", disable=not progress, desc="predict"):
        name = names[prediction.path]
        image_id = image_id_for(name)
        if image_id in used_ids:  # "0139" and "139": the second keeps its name as id
            image_id = name
        used_ids.add(image_id)
        writer.add(image_id, prediction.result.id_map, prediction.result.segments_info, file_name=f"{name}.png")
        if overlays:
            save_image(draw(prediction.image, prediction.result, category_map), overlay_dir / f"{name}.png")
        images.append({"id": image_id, "file_name": prediction.path.name,
                       "height": prediction.image.height, "width": prediction.image.width})
        summary.processed.append(prediction.path)
    if not summary.processed:
        raise UserInputError(f"no image could be processed ({len(summary.skipped)} skipped)")
    summary.predictions_json = writer.json_path
    atomic_write_json(writer.json_path, {"images": images, "annotations": writer.annotations,
                                         "categories": writer.categories})
    return summary


# -- attention --------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """What the attention figures need for one image; everything on the CPU.

    queries: LongTensor [K] indices of the kept queries (best class not "no object", score > threshold).
    scores: [K]; category_ids: [K]; boxes: [K, 4] xyxy in original-image pixels.
    masks: [K, H, W] mask probabilities at the original image size.
    decoder: [K, heads, h, w] last-layer decoder cross-attention of the kept queries.
    encoder: [h, w, h, w] last-layer encoder self-attention (mean over heads), or None.
    feature_size: (h, w) of the encoder feature map; ``scale``: input pixels per feature cell
    (processed image size / feature size, as (sy, sx)), before resizing to the original image.
    """

    image: Image.Image
    queries: torch.Tensor
    scores: torch.Tensor
    category_ids: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    decoder: torch.Tensor
    encoder: torch.Tensor | None
    feature_size: tuple[int, int]
    result: PanopticResult | None = None


def compute_attention(
    model: torch.nn.Module,
    image: Image.Image,
    *,
    category_map: CategoryMap,
    threshold: float = 0.85,
    size: int | None = 800,
    max_size: int | None = 1333,
    device: str | torch.device | None = None,
) -> AttentionMaps:
    """Run one image with ``return_attention=True`` and gather the kept queries' maps.

    Uses ``output.attentions``: ``"decoder_cross"`` (list per layer of [B, heads, Q, h*w]),
    ``"encoder_self"`` (last layer, [B, heads, h*w, h*w] or [B, h*w, h*w]; a list per layer also
    works) and ``"feature_size"`` ((h, w); derived from the stride-32 input size when absent).
    """
    check_options(threshold=threshold, size=size, max_size=max_size)
    device = resolve_device(device)
    model.eval().to(device)
    tensor = preprocess(image, size, max_size).to(device)
    with torch.inference_mode():
        output = model([tensor], return_attention=True)
        # One forward: its masks for every query also give the panoptic result (no second trunk run).
        from detr_panoptic.models.postprocess import panoptic_postprocess

        results = panoptic_postprocess(output, [tuple(tensor.shape[-2:])], [(image.height, image.width)],
                                       is_thing=category_map.is_thing().to(device), threshold=threshold,
                                       class_to_category=category_map.class_to_category_tensor().to(device))
    attentions = output.attentions or {}
    decoder_maps = _first_present(attentions, "decoder_cross", "decoder")
    if decoder_maps is None:
        raise RuntimeError(f"the model returned no decoder attention (keys: {sorted(attentions)})")
    feature_size = _first_present(attentions, "feature_size", "feature_shape")
    if feature_size is None:  # stride-32 backbone on one unpadded image
        feature_size = (-(-tensor.shape[-2] // 32), -(-tensor.shape[-1] // 32))
    feat_h, feat_w = (int(v) for v in feature_size)
    probs = output.pred_logits[0].float().softmax(-1).cpu()
    best_prob, best_class = probs.max(-1)
    no_object = probs.shape[-1] - 1
    class_to_category = category_map.class_to_category_tensor()
    keep = (best_class != no_object) & (best_prob > threshold)
    keep &= class_to_category[best_class.clamp(max=no_object - 1)] >= 0
    queries = torch.nonzero(keep).flatten()
    decoder = _last(decoder_maps)[0].float().cpu()  # [heads, Q, h*w]
    decoder = decoder[:, queries].reshape(decoder.shape[0], len(queries), feat_h, feat_w).transpose(0, 1)
    encoder = _first_present(attentions, "encoder_self", "encoder")
    if encoder is not None:
        encoder = _last(encoder)[0].float().cpu()
        if encoder.dim() == 3:  # per head
            encoder = encoder.mean(0)
        encoder = encoder.reshape(feat_h, feat_w, feat_h, feat_w)
    height, width = image.height, image.width
    boxes = output.pred_boxes[0, queries].float().cpu()
    cx, cy, bw, bh = boxes.unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor(
        [width, height, width, height], dtype=torch.float)
    masks = torch.zeros((0, height, width))
    if output.pred_masks is not None and len(queries):
        # Masks come at 1/4 of the (single, unpadded) input: resize straight to the original size.
        logits = output.pred_masks[0, queries.to(output.pred_masks.device)].float()[None]
        masks = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                align_corners=False)[0].sigmoid().cpu()
    result = PanopticResult(results[0].id_map.cpu(), results[0].segments_info) if results else None
    return AttentionMaps(image=image, queries=queries, scores=best_prob[queries],
                         category_ids=class_to_category[best_class[queries]], boxes=boxes, masks=masks,
                         decoder=decoder, encoder=encoder, feature_size=(feat_h, feat_w), result=result)


def _first_present(mapping: dict, *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def _last(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The last layer's tensor, whether given as a list per layer or stacked [L, ...]."""
    if isinstance(value, torch.Tensor):
        return value
    return value[-1]
