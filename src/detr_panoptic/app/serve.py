"""Which checkpoints ``detr-panoptic app`` opens, the example scenes it offers, and starting it."""
from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detr_panoptic.utils.io import atomic_path

log = logging.getLogger(__name__)

DEMO_RUN = Path("runs/demo")
START_POINT = "demo_start_point.safetensors"
EXAMPLE_SEEDS = (101, 202, 303)


def default_checkpoint(demo_run: str | os.PathLike = DEMO_RUN) -> str:
    """The demo's final model when ``demo_run`` holds one (the calibrated checkpoint, else stage 2's best),
    else the packaged start point: the app always starts with something to show."""
    run = Path(demo_run)
    for candidate in (run / "calibration" / "calibrated.pth", run / "stage2" / "checkpoints" / "best.pth"):
        if candidate.is_file():
            return str(candidate)
    return str(importlib.resources.files("detr_panoptic.resources").joinpath(START_POINT))


def example_scenes(folder: str | os.PathLike, *, count: int = len(EXAMPLE_SEEDS), size: tuple[int, int] = (512, 1024)
                   ) -> list[Path]:
    """Synthetic street scenes (``data.synthetic``, the demo's domain) written to ``folder`` as PNGs."""
    from detr_panoptic.data.synthetic import synthetic_sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in EXAMPLE_SEEDS[:count]:
        path = folder / f"street-{seed}-{size[1]}x{size[0]}.png"
        if not path.is_file():
            rgb, _, _ = synthetic_sample(seed, *size)
            with atomic_path(path, suffix=".png") as tmp:
                Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
        paths.append(path)
    return paths


def serve(checkpoints: Sequence[str] = (), *, host: str = "127.0.0.1", port: int | None = None,
          device: str = "auto", dtype: str | None = None, queue_size: int | None = None,
          block: bool = True) -> Any:
    """Load ``checkpoints`` (default: ``default_checkpoint()``) and serve the page; blocks unless ``block=False``."""
    from detr_panoptic.app import require_gradio

    require_gradio()
    import tempfile

    from detr_panoptic.app.page import QUEUE_SIZE, build_app, launch
    from detr_panoptic.inference import PanopticPredictor

    sources = list(dict.fromkeys(checkpoints)) or [default_checkpoint()]
    predictors = {}
    for source in sources:
        log.info("loading %s", source)
        predictors[source] = PanopticPredictor.from_pretrained(source, device=device, dtype=dtype)
    work = Path(tempfile.mkdtemp(prefix="detr-panoptic-app-"))
    page = build_app(predictors, examples=example_scenes(work / "examples"), work_dir=work,
                     queue_size=QUEUE_SIZE if queue_size is None else queue_size)
    return launch(page, host=host, port=port, block=block)
