"""Attention figures, as in DETR's attention notebook: where each kept query looks, beside its box
and mask; encoder self-attention at reference points; a grid of the kept queries' masks.

Pure drawing: every function takes tensors and returns a matplotlib ``Figure`` (Agg canvas, no
pyplot state), so it runs headless and in threads. ``inference.PanopticPredictor.attention`` gathers
the tensors from a model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from detr_panoptic.visualize.overlay import as_image_tensor

ATTENTION_CMAP = "inferno"


DISPLAY_WIDTH = 480  # pixels: panels are ~300 px wide, so larger pictures only cost drawing time


def _hwc(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    return as_image_tensor(image).permute(1, 2, 0).numpy()


def _small(picture: np.ndarray) -> np.ndarray:
    """``picture`` shrunk to ``DISPLAY_WIDTH`` (shown with ``extent`` so coordinates stay in original pixels)."""
    height, width = picture.shape[:2]
    if width <= DISPLAY_WIDTH:
        return picture
    size = (DISPLAY_WIDTH, max(1, round(height * DISPLAY_WIDTH / width)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))


def _small_map(values: torch.Tensor) -> np.ndarray:
    height, width = values.shape[-2:]
    if width > DISPLAY_WIDTH:
        size = (max(1, round(height * DISPLAY_WIDTH / width)), DISPLAY_WIDTH)
        values = torch.nn.functional.interpolate(values[None, None].float(), size=size, mode="bilinear",
                                                 align_corners=False)[0, 0]
    return values.float().numpy()


def _imshow(ax, picture: np.ndarray, extent_of: np.ndarray, **kwargs) -> None:
    """Show ``picture`` (maybe shrunk) over the pixel coordinates of ``extent_of`` (the full picture)."""
    height, width = extent_of.shape[:2]
    ax.imshow(picture, extent=(0, width, height, 0), **kwargs)


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show_map(ax, image: np.ndarray, heat: torch.Tensor, *, alpha: float = 0.65) -> None:
    """``heat`` [h, w] stretched over the whole image, semi-transparent, bilinear."""
    height, width = image.shape[:2]
    _imshow(ax, _small(image), image)
    ax.imshow(heat.float().numpy(), cmap=ATTENTION_CMAP, alpha=alpha, extent=(0, width, height, 0),
              interpolation="bilinear")
    _clean(ax)


def plot_query_attention(
    image: Image.Image | np.ndarray | torch.Tensor,
    decoder: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    titles: Sequence[str],
    *,
    per_head: bool = False,
    panel_size: float = 3.0,
) -> Figure:
    """One row per kept query: its decoder cross-attention (mean over heads, or every head when
    ``per_head``), the image with its box, and its mask.

    decoder: [K, heads, h, w] attention weights; boxes: [K, 4] xyxy pixels; masks: [K, H, W] in 0..1.
    With no kept query the figure says so instead of being empty.
    """
    picture = _hwc(image)
    count, heads = int(decoder.shape[0]), int(decoder.shape[1]) if decoder.dim() == 4 else 1
    maps = heads if per_head else 1
    columns = maps + 2
    aspect = picture.shape[0] / picture.shape[1]
    # A fixed grid with manual spacing: constrained layout costs seconds with many panels (per head).
    row_height = panel_size * aspect + 0.35
    fig = Figure(figsize=(panel_size * columns, row_height * max(count, 1) + 0.1))
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.35 / (row_height * max(count, 1) + 0.1),
                        wspace=0.04, hspace=0.35 / (panel_size * aspect))
    if count == 0:
        ax = fig.add_subplot()
        ax.imshow(picture)
        ax.set_title("no query above the threshold")
        _clean(ax)
        return fig
    axes = fig.subplots(count, columns, squeeze=False)
    small = _small(picture)
    for row, title in enumerate(titles):
        heat = decoder[row] if per_head else decoder[row].mean(0, keepdim=True)
        for column in range(maps):
            _show_map(axes[row, column], picture, heat[column])
            label = f"head {column}" if per_head else "cross-attention (mean of heads)"
            axes[row, column].set_title(label if row == 0 else "", fontsize=9)
        ax_box = axes[row, maps]
        _imshow(ax_box, small, picture)
        x0, y0, x1, y1 = (float(v) for v in boxes[row])
        ax_box.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=2))
        ax_box.set_title(title, fontsize=9)
        _clean(ax_box)
        ax_mask = axes[row, maps + 1]
        _imshow(ax_mask, _small_map(masks[row]) if len(masks) else np.zeros(small.shape[:2]), picture,
                cmap="gray", vmin=0, vmax=1)
        ax_mask.set_title("mask" if row == 0 else "", fontsize=9)
        _clean(ax_mask)
    return fig


def plot_encoder_attention(
    image: Image.Image | np.ndarray | torch.Tensor,
    encoder: torch.Tensor,
    points: Sequence[tuple[float, float]],
    *,
    panel_size: float = 3.0,
) -> Figure:
    """Encoder self-attention at reference ``points`` ((x, y) image pixels): the image with the points
    on top, one attention map per point below (the map of the feature cell under the point).

    encoder: [h, w, h, w] attention of each feature cell (first two dims) over all cells.
    """
    picture = _hwc(image)
    height, width = picture.shape[:2]
    feat_h, feat_w = int(encoder.shape[0]), int(encoder.shape[1])
    count = max(len(points), 1)
    aspect = height / width
    fig = Figure(figsize=(panel_size * count, panel_size * aspect * 2 + 0.6), layout="constrained")
    grid = fig.add_gridspec(2, count)
    ax_image = fig.add_subplot(grid[0, :])
    _imshow(ax_image, _small(picture), picture)
    ax_image.set_title("encoder self-attention: reference points", fontsize=10)
    _clean(ax_image)
    colors = [f"C{i % 10}" for i in range(len(points))]
    for i, ((x, y), color) in enumerate(zip(points, colors)):
        ax_image.plot([x], [y], "o", color=color, markersize=9, markeredgecolor="white")
        ax_image.annotate(str(i + 1), (x, y), xytext=(6, -6), textcoords="offset points", color="white", fontsize=10)
        row = min(feat_h - 1, int(y / height * feat_h))
        column = min(feat_w - 1, int(x / width * feat_w))
        ax = fig.add_subplot(grid[1, i])
        _show_map(ax, picture, encoder[row, column], alpha=0.75)
        ax.plot([x], [y], "o", color=color, markersize=6, markeredgecolor="white")
        ax.set_title(f"point {i + 1}", fontsize=9)
    return fig


def reference_points(id_map: torch.Tensor | None, height: int, width: int, count: int = 4) -> list[tuple[float, float]]:
    """``count`` (x, y) points: inside the largest segments of ``id_map`` when given, else spread on a grid."""
    from detr_panoptic.visualize.overlay import label_anchor

    points: list[tuple[float, float]] = []
    if id_map is not None and count > 0:
        ids, areas = torch.unique(id_map[id_map > 0], return_counts=True)
        for segment in ids[torch.argsort(areas, descending=True)][:count]:
            x, y = label_anchor(id_map == segment)
            points.append((float(x), float(y)))
    grid = math.ceil(math.sqrt(count))
    cells = [((c + 0.5) * width / grid, (r + 0.5) * height / grid) for r in range(grid) for c in range(grid)]
    for cell in cells:
        if len(points) >= count:
            break
        points.append(cell)
    return points[:count]


def plot_mask_grid(
    masks: torch.Tensor,
    titles: Sequence[str],
    *,
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    columns: int = 5,
    panel_size: float = 2.6,
) -> Figure:
    """The kept queries' masks ([K, H, W] in 0..1) in a grid, over the dimmed image when given."""
    count = int(masks.shape[0])
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    height, width = (int(masks.shape[1]), int(masks.shape[2])) if count else (1, 1)
    fig = Figure(figsize=(panel_size * columns, panel_size * height / width * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    picture = _hwc(image) if image is not None else None
    for index, ax in enumerate(axes.flat):
        _clean(ax)
        if index >= count:
            ax.set_axis_off()
            continue
        full = picture if picture is not None else np.zeros((height, width))
        if picture is not None:
            _imshow(ax, _small(picture), full, alpha=0.35)
        _imshow(ax, _small_map(masks[index]), full, cmap="viridis", alpha=0.65 if picture is not None else 1.0,
                vmin=0, vmax=1)
        ax.set_title(titles[index], fontsize=8)
    if count == 0:
        axes[0, 0].set_axis_on()
        axes[0, 0].set_title("no query above the threshold")
    return fig


def save_figure(fig: Figure, path, *, dpi: int = 100) -> None:
    """Write ``fig`` as PNG atomically."""
    from detr_panoptic.utils.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 3})


def write_attention_figures(
    maps,
    out_dir,
    categories,
    *,
    per_head: bool = False,
    points: int = 4,
    queries_per_page: int = 8,
    dpi: int = 100,
) -> list:
    """Write the attention figures of one image into ``out_dir``; return the paths written.

    ``maps`` is an ``inference.AttentionMaps`` (image, queries, scores, category_ids, boxes,
    masks, decoder, encoder, result). Files: ``queries_01.png``... (``queries_per_page`` kept queries
    each, by query index), ``encoder.png`` (when the encoder attention is there) and ``masks.png``.
    """
    from pathlib import Path

    from detr_panoptic.visualize.overlay import categories_by_id

    out_dir = Path(out_dir)
    cats = categories_by_id(categories)
    titles = []
    for query, category_id, score in zip(maps.queries.tolist(), maps.category_ids.tolist(), maps.scores.tolist()):
        name = cats[category_id].name if category_id in cats else f"category {category_id}"
        titles.append(f"query {query}: {name} {score:.2f}")
    written = []
    pages = max(1, math.ceil(len(titles) / queries_per_page))
    for page in range(pages):
        chunk = slice(page * queries_per_page, (page + 1) * queries_per_page)
        fig = plot_query_attention(maps.image, maps.decoder[chunk], maps.boxes[chunk], maps.masks[chunk],
                                   titles[chunk], per_head=per_head)
        path = out_dir / f"queries_{page + 1:02d}.png"
        save_figure(fig, path, dpi=dpi)
        written.append(path)
    if maps.encoder is not None and points > 0:
        id_map = maps.result.id_map if maps.result is not None else None
        chosen = reference_points(id_map, maps.image.height, maps.image.width, count=points)
        path = out_dir / "encoder.png"
        save_figure(plot_encoder_attention(maps.image, maps.encoder, chosen), path, dpi=dpi)
        written.append(path)
    path = out_dir / "masks.png"
    save_figure(plot_mask_grid(maps.masks, titles, image=maps.image), path, dpi=dpi)
    written.append(path)
    return written
