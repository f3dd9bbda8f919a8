"""Pictures: panoptic overlays, attention maps, training curves and the HTML report.

Import the submodules directly (``visualize.overlay``, ``.attention``, ``.curves``, ``.report``);
the most used functions are re-exported here lazily so that importing the package stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "draw_panoptic": "overlay",
    "segment_colors": "overlay",
    "result_from_panoptic_png": "overlay",
    "save_image": "overlay",
    "plot_query_attention": "attention",
    "plot_encoder_attention": "attention",
    "plot_mask_grid": "attention",
    "save_figure": "attention",
    "read_metrics": "curves",
    "plot_losses": "curves",
    "plot_pq": "curves",
    "plot_run": "curves",
    "build_report": "report",
}

__all__ = ["build_report", "draw_panoptic", "plot_encoder_attention", "plot_losses", "plot_mask_grid", "plot_pq",
           "plot_query_attention", "plot_run", "read_metrics", "result_from_panoptic_png", "save_figure",
           "save_image", "segment_colors"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
