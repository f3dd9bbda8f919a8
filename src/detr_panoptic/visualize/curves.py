"""Training curves from a run folder's ``metrics.jsonl``: losses, class accuracy, PQ over time, per-class bars.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "epoch", "lr", "loss",
"loss_ce", ..., "class_accuracy", "class_error"}`` per logged step and ``{"kind": "val", "step", "epoch", "pq", "sq", "rq", ...,
"per_class": {...}}`` per validation (PQ in percent).
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

AUX_SUFFIX = re.compile(r"_\d+$")
PQ_KEYS = ("pq", "sq", "rq", "pq_things", "pq_stuff")
# The matched queries' top-1 class accuracy and DETR's class_error (100 - accuracy), percent, last layer.
ACCURACY_KEYS = ("class_accuracy", "class_error")
# Image-dependence of the model's outputs, added to validation records by engine.diagnostics.
DIAG_KEYS = ("diag_memory_image_var", "diag_decoder_image_var", "diag_box_centre_spread")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``<run>/metrics.jsonl`` when given a folder).

    A malformed last line is skipped with a warning (a run may be writing it right now); a malformed
    line elsewhere is an error naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a run folder with metrics.jsonl)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                log.warning("%s:%d: skipping an incomplete last line", path, number)
                continue
            raise UserInputError(f"{path}:{number}: not a JSON object per line ({exc})") from None
        if not isinstance(record, dict):
            raise UserInputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def split_records(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(train records, validation records), each sorted by step."""
    def by_step(kind: str) -> list[dict]:
        chosen = [dict(r) for r in records if r.get("kind") == kind]
        return sorted(chosen, key=lambda r: (r.get("step", 0) or 0))
    return by_step("train"), by_step("val")


def loss_keys(records: Sequence[Mapping[str, Any]], *, include_aux: bool = False) -> list[str]:
    """``loss`` first, then the ``loss_*`` components in first-seen order (auxiliary ``_0``.. only if asked)."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            is_loss = (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float))
            if is_loss and (include_aux or not AUX_SUFFIX.search(key)):
                keys[key] = None
    return sorted(keys, key=lambda k: (k != "loss",))


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r.get("step", i), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing); the default weight
    grows with the number of points (0.6 for short runs, up to 0.95), so short runs are not flattened."""
    if weight is None:
        weight = min(0.95, max(0.6, 1.0 - 10.0 / max(len(values), 1)))
    out = np.empty_like(values)
    average = 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def plot_losses(train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]] = (), *,
                include_aux: bool = False, columns: int = 3) -> Figure:
    """One panel per loss (total, then each component): raw train values faint, smoothed solid,
    validation as markers where the validation records carry the same key."""
    keys = loss_keys(list(train) + list(val), include_aux=include_aux)
    if not keys:
        fig = Figure(figsize=(5, 3), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    columns = min(columns, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _draw_panel(ax, train, val, key)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    fig.suptitle("losses")
    return fig


def _draw_panel(ax: Any, train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]], key: str) -> None:
    """``key`` against the step: raw train values faint, smoothed solid, validation values as markers."""
    steps, values = _series(train, key)
    if len(values):
        ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values), color="C0", label="train")
    steps, values = _series(val, key)
    if len(values):
        ax.plot(steps, values, "o-", color="C1", label="validation")
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def has_accuracy(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(key in record for record in records for key in ACCURACY_KEYS)


def plot_accuracy(train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]] = ()) -> Figure:
    """The last decoder layer's matched-query class accuracy and DETR's ``class_error`` (100 minus it),
    percent, one panel each, drawn like the losses."""
    fig = Figure(figsize=(8.4, 3.0), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(ACCURACY_KEYS), squeeze=False).flat, ACCURACY_KEYS):
        _draw_panel(ax, train, val, key)
        ax.set_ylim(-2, 102)
        ax.set_ylabel("%")
    fig.suptitle("classification of the matched queries (top-1)")
    return fig


def plot_pq(val: Sequence[Mapping[str, Any]]) -> Figure:
    """PQ, SQ, RQ (and PQ of things / stuff; mIoU and AP when validation measured them) of each validation
    against the step, in percent."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    plotted = False
    for key, style in zip(PQ_KEYS, ("o-", "s--", "^--", "v:", "d:")):
        steps, values = _series(val, key)
        if len(values):
            ax.plot(steps, values, style, label=key.replace("_", " ").upper().replace("THINGS", "things")
                    .replace("STUFF", "stuff"))
            plotted = True
    for key, style, label in (("miou", "P-", "mIoU"), ("ap", "X-", "AP")):  # train.val_metrics: miou, ap
        steps, values = _series(val, key)
        if len(values):
            ax.plot(steps, values, style, label=label)
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("%")
    ax.set_title("panoptic quality over training")
    ax.grid(alpha=0.3)
    return fig


def has_diagnostics(val: Sequence[Mapping[str, Any]]) -> bool:
    return any(key in record for record in val for key in DIAG_KEYS)


def plot_diagnostics(val: Sequence[Mapping[str, Any]]) -> Figure:
    """The ``diag_*`` image-dependence values of each validation (``engine.diagnostics``) against the
    step, on a log scale: a curve falling by decades is the encoder collapsing onto an image-independent
    output (every thing query then predicts the same box in every image)."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    plotted = False
    for key, style in zip(DIAG_KEYS, ("o-", "s--", "^:")):
        steps, values = _series(val, key)
        keep = values > 0
        if keep.any():
            ax.plot(steps[keep], values[keep], style, label=key.removeprefix("diag_").replace("_", " "))
            plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no diagnostics logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_title("image-dependence (variance across images / total)")
    ax.grid(alpha=0.3)
    return fig


def last_per_class(val: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``per_class`` of the last validation that has one."""
    for record in reversed(val):
        if record.get("per_class"):
            return record["per_class"]
    return None


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *, dpi: int = 100) -> list[Path]:
    """Write ``losses.png``, ``accuracy.png`` (when train records carry ``class_accuracy``), ``pq.png``, ``diagnostics.png`` (when validations carry ``diag_*`` keys) and (after a validation with per-class results)
    ``per_class.png`` into ``out_dir`` (default ``<run_dir>/plots``); return the paths written."""
    from detr_panoptic.visualize.attention import save_figure

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    train, val = split_records(read_metrics(run_dir))
    written = []
    figures = [("losses", plot_losses(train, val))]
    if has_accuracy(train):
        figures.append(("accuracy", plot_accuracy(train, val)))
    figures.append(("pq", plot_pq(val)))
    if has_diagnostics(val):
        figures.append(("diagnostics", plot_diagnostics(val)))
    for name, fig in figures:
        save_figure(fig, out_dir / f"{name}.png", dpi=dpi)
        written.append(out_dir / f"{name}.png")
    last = next((r for r in reversed(val) if r.get("per_class")), None)
    if last is not None:
        fig = per_class_figure(last, categories=run_categories(run_dir))
        save_figure(fig, out_dir / "per_class.png", dpi=dpi)
        written.append(out_dir / "per_class.png")
    return written


def run_categories(folder: str | Path) -> list[dict[str, Any]] | None:
    """COCO category records (``id``, ``name``, ``isthing``) found in a run or evaluation folder:
    ``categories.json`` or the ``categories`` of a ``predictions.json`` (``eval/`` or one level down)."""
    folder = Path(folder)
    candidates = [folder / "categories.json", folder / "predictions.json", folder / "eval" / "predictions.json"]
    candidates += sorted(folder.glob("*/predictions.json"))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            records = data["categories"] if isinstance(data, dict) else data
            return [{"id": int(r["id"]), "name": str(r["name"]), "isthing": int(bool(r.get("isthing", 0)))}
                    for r in records]
        except (ValueError, KeyError, TypeError):
            continue
    return None


def per_class_figure(metrics: Mapping[str, Any], *, categories: Any = None) -> Figure:
    """Per-class PQ/SQ/RQ bars of a validation record (or any metrics dict with ``per_class``),
    drawn by the evaluation's chart (``visualize.charts``), so both commands show the same picture."""
    from detr_panoptic.visualize.charts import per_class_bar_chart_figure

    return per_class_bar_chart_figure(metrics, categories)
