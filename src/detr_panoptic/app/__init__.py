"""``detr-panoptic app``: an interactive web page to look at a model (``pip install 'detr-panoptic[app]'``).

``session`` holds what the page shows (one forward per image, post-processing on the cached output,
the segment table, overlays, attention figures, downloads) and needs no Gradio; ``page`` is the Gradio
page (``build_app``, ``launch``); ``serve`` picks the checkpoints and starts it.
"""
from __future__ import annotations

import os
from typing import Any

from detr_panoptic.utils.errors import UserInputError

INSTALL_HINT = "pip install 'detr-panoptic[app]'"


def require_gradio() -> Any:
    """The ``gradio`` module, or ``UserInputError`` with the install hint when the ``app`` extra is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a model viewer
    try:
        import gradio
    except ImportError as exc:
        raise UserInputError(f"the app needs Gradio, which is not installed ({exc}): {INSTALL_HINT}") from None
    return gradio
