"""Charts of evaluation results: per-class PQ/SQ/RQ bars; PQ against the keep threshold (``calibrate``).

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display needed).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detr_panoptic.utils.io import atomic_path

_COLORS = {"pq": "#4c72b0", "sq": "#55a868", "rq": "#c44e52"}


def _per_class_percentages(metrics: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """Per category id, PQ/SQ/RQ in percent, from ``pq_compute``'s dict (fractions, ``All``/...) or
    the metrics-file form (percentages, flat)."""
    per_class = metrics.get("per_class", {})
    scale = 100.0 if isinstance(metrics.get("All"), Mapping) else 1.0
    return {int(k): {m: scale * float(v[m]) for m in ("pq", "sq", "rq")} for k, v in per_class.items()}


def _category_names(categories: Any) -> dict[int, tuple[str, bool]]:
    if categories is None:
        return {}
    if hasattr(categories, "categories") and not isinstance(categories, Mapping):
        categories = categories.categories
    if isinstance(categories, Mapping):
        categories = list(categories.values())
    names = {}
    for c in categories:
        if isinstance(c, Mapping):
            names[int(c["id"])] = (str(c.get("name", c["id"])), bool(c.get("isthing", 0)))
        else:
            names[int(c.id)] = (str(c.name), bool(c.isthing))
    return names


def per_class_bar_chart_figure(metrics: Mapping[str, Any], categories: Any = None, *,
                               title: str | None = None) -> Figure:
    """Grouped bars (PQ, SQ, RQ in %) per category, things first then stuff, each sorted by id.

    ``metrics``: ``pq_compute``'s result or a ``metrics.json``; ``categories``: COCO category dicts,
    ``Category`` objects or a ``CategoryMap`` (names and thing/stuff), optional.
    """
    values = _per_class_percentages(metrics)
    names = _category_names(categories)
    ids = sorted(values, key=lambda cid: (not names.get(cid, ("", False))[1], cid))
    width = max(6.0, 0.45 * len(ids) + 2.0)
    fig = Figure(figsize=(width, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(ids))
    for offset, metric in zip((-0.27, 0.0, 0.27), ("pq", "sq", "rq")):
        ax.bar(positions + offset, [values[c][metric] for c in ids], width=0.27, label=metric.upper(),
               color=_COLORS[metric])
    labels = [names.get(c, (str(c), False))[0] for c in ids]
    ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    for tick, cid in zip(ax.get_xticklabels(), ids):
        if names.get(cid, ("", False))[1]:
            tick.set_fontweight("bold")  # things in bold
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_xlim(-0.6, len(ids) - 0.4 if ids else 0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=3, fontsize=8)
    if title is None and isinstance(metrics.get("All"), Mapping):
        title = f"PQ {100 * metrics['All']['pq']:.1f}  SQ {100 * metrics['All']['sq']:.1f}  " \
                f"RQ {100 * metrics['All']['rq']:.1f}  (things in bold)"
    elif title is None and "pq" in metrics:
        title = f"PQ {metrics['pq']:.1f}  SQ {metrics['sq']:.1f}  RQ {metrics['rq']:.1f}  (things in bold)"
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_bar_chart(metrics: Mapping[str, Any], categories: Any, path: str | os.PathLike, *,
                        title: str | None = None, dpi: int = 100) -> Path:
    """Draw ``per_class_bar_chart_figure`` and write it as PNG to ``path`` (atomically)."""
    fig = per_class_bar_chart_figure(metrics, categories, title=title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def plot_calibration(table: Any, path: str | os.PathLike) -> Path:
    """``calibrate``'s chart (``table``: an ``inference.calibrate.CalibrationTable``): PQ against the threshold:
    All, things and stuff for the best row's merge mode, minimum area and minimum visible fraction, the other
    combinations' PQ thin and dashed, the chosen setting marked."""
    best = table.best
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    def key(setting: Any) -> tuple[str, int, float]:
        return setting.merge_stuff, setting.min_area, setting.min_visible

    def name(pair: tuple[str, int, float]) -> str:
        return f"PQ ({pair[0]}, min area {pair[1]}" + (f", visible {pair[2]:.2f})" if pair[2] else ")")

    pairs = list(dict.fromkeys(key(r.setting) for r in table.rows))
    chosen = key(best.setting)
    for pair in pairs:
        rows = sorted((r for r in table.rows if key(r.setting) == pair), key=lambda r: r.setting.threshold)
        x = [r.setting.threshold for r in rows]
        if pair == chosen:
            ax.plot(x, [r.pq for r in rows], "-o", color="#1f3b5a", lw=2.2, ms=4, label=name(pair))
            ax.plot(x, [r.pq_things for r in rows], "-s", color="#e8a33d", lw=1.6, ms=3, label="PQ things")
            ax.plot(x, [r.pq_stuff for r in rows], "-^", color="#3a8f5c", lw=1.6, ms=3, label="PQ stuff")
        else:
            ax.plot(x, [r.pq for r in rows], "--", lw=0.9, alpha=0.7, label=name(pair))
    ax.plot([best.setting.threshold], [best.pq], "*", color="#c0392b", ms=16, zorder=5,
            label=f"chosen: {best.setting.threshold:.2f} / {best.setting.merge_stuff} / {best.setting.min_area} / "
                  f"{best.setting.min_visible:.2f}")
    ax.annotate(f"PQ {best.pq:.2f}", (best.setting.threshold, best.pq), textcoords="offset points", xytext=(8, 8))
    ax.set_xlabel("keep threshold")
    ax.set_ylabel("PQ (%)")
    ax.set_title(f"post-processing calibration over {table.num_images} image(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
