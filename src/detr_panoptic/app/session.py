"""What the app shows, without the web page (testable without Gradio).

An image is ``analyse``d once: one forward pass of the predictor's network, with the masks of every query
kept at the app's lowest threshold, held in an ``Analysis``. Every post-processing setting the page offers
(a higher threshold, either stuff merge mode, any minimum area) keeps a subset of those queries, so
``Analysis.result(...)`` re-runs only post-processing on the cached output, as ``calibrate`` does. Picking
a segment shows its query's decoder attention, from one more forward (with attention weights) run on the
first pick and kept for the image. The pictures, the segment
table, the legend and the COCO panoptic downloads are built from a ``PanopticResult`` here as well.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detr_panoptic.inference.predictor import PanopticPredictor, attention_maps
from detr_panoptic.inference.samples import load_image
from detr_panoptic.models.outputs import DETROutput, PanopticResult
from detr_panoptic.models.pixel_winner import PixelWinner
from detr_panoptic.models.postprocess import nearest_resize_ids
from detr_panoptic.utils.errors import UserInputError

LOWEST_THRESHOLD = 0.25  # masks are computed once for every query above this; the threshold slider starts here
MAX_PIXELS = 4096 * 4096  # larger uploads are downscaled (aspect kept) before anything else
DISPLAY_SIDE = 1280  # the overlay is drawn with its longer side at most this (downloads keep the full size)
TABLE_HEADERS = ("segment", "label", "kind", "score", "area", "box (x, y, w, h)", "query")


def open_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """An uploaded file as ``predict`` reads it (``inference.samples.load_image``: EXIF orientation applied,
    any mode converted to RGB; ``UserInputError`` naming the file when it cannot be decoded), downscaled when it
    has more than ``max_pixels`` pixels. Returns the picture and notes for the page."""
    picture = load_image(path)
    notes = []
    width, height = picture.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
        notes.append(f"the image ({width}x{height}) is over the app's limit of {max_pixels / 1e6:.1f} megapixels: "
                     f"downscaled to {size[0]}x{size[1]}")
    return picture, notes


@dataclass(frozen=True)
class Setting:
    """The page's post-processing controls (a checkpoint's ``detr_panoptic.postprocess`` keys)."""

    threshold: float
    merge_stuff: str
    min_area: int
    min_visible: float = 0.0

    @classmethod
    def of(cls, predictor: PanopticPredictor) -> Setting:
        s = predictor.settings
        return cls(float(s.threshold), s.merge_stuff, int(s.min_area), float(s.min_visible))


@dataclass
class Analysis:
    """One image's network output, kept so that post-processing can change without a new forward pass.

    output: the network's ``DETROutput`` for the one image (on the predictor's device) with ``attentions``
    and the masks (packed, ``mask_queries``) of the queries kept at ``lowest``. seconds: ``preprocess`` and
    ``network`` times; ``postprocess`` is measured per ``result`` call.
    """

    predictor: PanopticPredictor
    picture: Image.Image
    tensor: torch.Tensor
    output: DETROutput
    lowest: float
    seconds: dict[str, float] = field(default_factory=dict)
    attention_output: DETROutput | None = None
    _winners: list[PixelWinner | None] = field(default_factory=lambda: [None], repr=False)

    def result(self, setting: Setting) -> tuple[PanopticResult, float]:
        """The panoptic result at ``setting`` from the cached output, and the seconds it took.

        Equal to ``PanopticPostProcessor`` at that setting (the predictor's results, bit for bit): the masks
        of every query with a mask are upsampled once per image and one ``PixelWinner`` answers every
        setting (``PanopticPostProcessor(..., winners=)``), so a new setting costs only the pixel assignment."""
        if setting.threshold < self.lowest - 1e-9:
            raise UserInputError(f"threshold {setting.threshold:.2f} is below {self.lowest:.2f}, the lowest this page "
                                 f"computed masks for")
        processor = self.predictor.postprocessor.replace(threshold=setting.threshold, merge_stuff=setting.merge_stuff,
                                                         min_area=setting.min_area,
                                                         min_visible=setting.min_visible)  # checks the values
        tick = time.perf_counter()
        with torch.inference_mode():
            result = processor(self.output, [(self.picture.height, self.picture.width)], winners=self._winners)[0]
        return result.cpu(), time.perf_counter() - tick

    def attention(self, result: PanopticResult, segment_id: int) -> Any:
        """``predictor.AttentionMaps`` of the query that made segment ``segment_id`` of ``result``.

        Asking the network for its attention weights takes another kernel path (rounding differs by ~1e-6),
        so the results above come from a forward without them, bit for bit those of ``predict``; the first
        segment picked runs one forward with attention (as ``PanopticPredictor.attention`` does), kept for
        the other segments."""
        segment = next((s for s in result.segments_info if int(s["id"]) == int(segment_id)), None)
        if segment is None or result.kept is None:
            raise UserInputError(f"no segment {segment_id} in the shown result")
        kept = result.kept
        row = int((kept.indices == int(segment["query"])).nonzero()[0, 0])
        one = dataclasses.replace(kept, **{k: getattr(kept, k)[row:row + 1]
                                          for k in ("indices", "labels", "category_ids", "scores", "boxes")})
        if self.attention_output is None:
            self.attention_output = _forward(self.predictor, self.tensor, self.lowest, attention=True)
        output = self.attention_output
        position = int((output.mask_queries[0].cpu() == int(segment["query"])).nonzero()[0, 0])
        view = dataclasses.replace(output, pred_masks=output.pred_masks[position:position + 1],
                                   mask_queries=[output.mask_queries[0][position:position + 1]])
        return attention_maps(view, self.picture, self.tensor, PanopticResult(result.id_map, [segment], one))


def analyse(predictor: PanopticPredictor, picture: Image.Image, *, lowest: float = LOWEST_THRESHOLD) -> Analysis:
    """One forward pass for ``picture`` (see the module docstring)."""
    lowest = min(lowest, float(predictor.settings.threshold))
    tick = time.perf_counter()
    tensor = predictor.preprocess(picture)
    preprocess_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    output = _forward(predictor, tensor, lowest)
    network_seconds = time.perf_counter() - tick
    return Analysis(predictor, picture, tensor, output, lowest,
                    seconds={"preprocess": preprocess_seconds, "network": network_seconds})


def _forward(predictor: PanopticPredictor, tensor: torch.Tensor, lowest: float, *, attention: bool = False
             ) -> DETROutput:
    """The network's output for one preprocessed image, with the masks of the queries kept at ``lowest``."""
    output = predictor.forward([tensor], mask_threshold=lowest, return_attention=attention)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)  # the network's time, not the launch's
    return output


# -- what the page draws ----------------------------------------------------------------------------------
def shown_segments(result: PanopticResult, *, things: bool = True, stuff: bool = True) -> PanopticResult:
    """``result`` with only the thing and/or stuff segments (the others become void)."""
    if things and stuff:
        return result
    keep = [s for s in result.segments_info if (things if s["isthing"] else stuff)]
    lookup = torch.zeros(len(result.segments_info) + 1, dtype=torch.long)
    for s in keep:
        lookup[int(s["id"])] = int(s["id"])
    return PanopticResult(lookup[result.id_map], keep, result.kept)


def overlay(picture: Image.Image, result: PanopticResult, categories: Any, *, opacity: float = 0.55,
            things: bool = True, stuff: bool = True, display_side: int = DISPLAY_SIDE) -> np.ndarray:
    """The overlay (``visualize.overlay.draw_panoptic``) as uint8 [H, W, 3], drawn at most ``display_side`` wide."""
    from detr_panoptic.visualize.overlay import draw_panoptic

    shown = shown_segments(result, things=things, stuff=stuff)
    scale = min(1.0, display_side / max(picture.size))
    if scale < 1.0:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
        shown = PanopticResult(nearest_resize_ids(shown.id_map, (size[1], size[0])), shown.segments_info)
    canvas = draw_panoptic(picture, shown, categories, alpha=float(opacity), min_side=0)
    return canvas.permute(1, 2, 0).numpy()


def _name(category_id: int, categories: Mapping[int, Any]) -> str:
    category = categories.get(int(category_id))
    return category.name if category is not None else f"category {category_id}"


def segment_rows(result: PanopticResult, categories: Any) -> list[list[Any]]:
    """One row per segment with pixels (``TABLE_HEADERS``): box is the COCO ``[x, y, w, h]`` of its pixels."""
    from detr_panoptic.evaluation.panoptic_format import segment_boxes_and_areas
    from detr_panoptic.visualize.overlay import categories_by_id

    cats = categories_by_id(categories)
    segments = [s for s in result.segments_info if int(s.get("area", 1)) > 0]
    _, boxes = segment_boxes_and_areas(result.id_map.numpy(), [int(s["id"]) for s in segments])
    return [[int(s["id"]), _name(s["category_id"], cats), "thing" if s["isthing"] else "stuff",
             round(float(s.get("score", float("nan"))), 3), int(s["area"]), ", ".join(str(int(v)) for v in box),
             int(s["query"])] for s, box in zip(segments, boxes)]


def legend_html(result: PanopticResult, categories: Any) -> str:
    """Colour swatches of the shown segments' labels (the overlay's colours)."""
    from html import escape

    from detr_panoptic.visualize.overlay import categories_by_id, segment_colors

    cats = categories_by_id(categories)
    segments = [s for s in result.segments_info if int(s.get("area", 1)) > 0]
    if not segments:
        return "<p>no segments</p>"
    colors = segment_colors(segments, cats)
    items = []
    for s in segments:
        r, g, b = colors[int(s["id"])]
        items.append(f'<span class="legend-item" style="display:inline-block;margin:2px 8px 2px 0">'
                     f'<span style="display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b});'
                     f'margin-right:4px;vertical-align:middle"></span>{int(s["id"])}: '
                     f'{escape(_name(s["category_id"], cats))}</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def attention_picture(analysis: Analysis, result: PanopticResult, segment_id: int, categories: Any, *,
                      per_head: bool = False) -> np.ndarray:
    """The seed's attention figure (``visualize.attention.plot_query_attention``) for one segment's query:
    its decoder cross-attention (mean of heads, or each head), its box and its mask, as uint8 [H, W, 3]."""
    from detr_panoptic.visualize.attention import plot_query_attention
    from detr_panoptic.visualize.overlay import categories_by_id

    maps = analysis.attention(result, segment_id)
    cats = categories_by_id(categories)
    title = (f"segment {segment_id}: {_name(int(maps.category_ids[0]), cats)} {float(maps.scores[0]):.2f} "
             f"(query {int(maps.queries[0])})")
    figure = plot_query_attention(maps.image, maps.decoder, maps.boxes, maps.masks, [title], per_head=per_head)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return np.asarray(Image.open(buffer).convert("RGB"))


def write_downloads(result: PanopticResult, categories: Any, folder: str | Path, *, name: str = "image"
                    ) -> list[Path]:
    """The result as COCO panoptic: ``<folder>/<name>.png`` (ids as R + 256 G + 256^2 B) and ``<folder>/<name>.json``."""
    from detr_panoptic.evaluation.panoptic_format import save_panoptic_predictions
    from detr_panoptic.inference.evaluators import with_pixels

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shown = PanopticResult(result.id_map, with_pixels(result))
    json_path = save_panoptic_predictions([shown], [name], folder / f"{name}.json", categories,
                                          file_names=[f"{name}.png"], png_folder=folder)
    return [folder / f"{name}.png", json_path]


def timing_text(seconds: Mapping[str, float], device: Any, notes: Sequence[str] = ()) -> str:
    """One line of timings (milliseconds) and the device, after any notes."""
    parts = [f"{key} {1000 * value:.0f} ms" for key, value in seconds.items()]
    return "\n\n".join([*notes, f"{' · '.join(parts)} · device {device}"])
