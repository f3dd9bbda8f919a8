"""A tiny model the app tests serve, odd image files, and the page served on 127.0.0.1 (always stopped)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 32, "num_queries": 12, "dropout": 0.0}
SIZE = {"min_size": 64, "max_size": 128}
LOWEST = 0.05  # the page's lowest threshold in these tests: every query of the toy is above it


def toy_model(num_classes: int) -> torch.nn.Module:
    """A tiny random PanopticDETR whose queries differ enough (large query embeddings) that their class scores
    spread over the threshold slider's range (about 0.5 .. 1.0) with several classes."""
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(num_classes, **TINY).eval()
    with torch.no_grad():
        model.detr.query_embed.weight.normal_(0.0, 30.0, generator=torch.Generator().manual_seed(2))
        head = model.detr.class_embed
        head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        head.bias.zero_()
    return model


class ForwardCounter:
    """Counts forward passes of a model (a forward hook), for 'no second forward' checks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    from detr_panoptic.app.serve import default_checkpoint
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.data.categories import CategoryMap

    sidecar = Path(default_checkpoint(tmp_path_factory.mktemp("no-run"))).with_suffix(".json")
    category_map = CategoryMap.from_json(json.loads(sidecar.read_text())["category_map"])  # the demo's 13 classes
    model = toy_model(category_map.num_classes)
    path = tmp_path_factory.mktemp("app-ckpt") / "toy.pth"
    return save_checkpoint(path, model, category_map=category_map, input_size=SIZE,
                           model_config=dict(TINY, num_classes=category_map.num_classes),
                           postprocess={"threshold": 0.3, "merge_stuff": "reference", "min_area": 4})


@pytest.fixture(scope="session")
def street(tmp_path_factory) -> Path:
    """A synthetic street scene, 96x192."""
    from detr_panoptic.app.serve import example_scenes

    return example_scenes(tmp_path_factory.mktemp("streets"), count=1, size=(96, 192))[0]


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory, street) -> dict[str, Path]:
    """Files a user may upload: not an image, truncated, 16-bit, CMYK, RGBA, EXIF-rotated."""
    folder = tmp_path_factory.mktemp("odd")
    rgb = Image.open(street).convert("RGB")
    files = {}
    files["text"] = folder / "notes.png"
    files["text"].write_text("this is not an image\n")
    whole = folder / "whole.png"
    rgb.save(whole)
    files["truncated"] = folder / "truncated.png"
    files["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    files["16-bit"] = folder / "grey16.png"
    Image.fromarray(grey16).save(files["16-bit"])
    files["cmyk"] = folder / "cmyk.jpg"
    rgb.convert("CMYK").save(files["cmyk"])
    files["rgba"] = folder / "rgba.png"
    rgb.convert("RGBA").save(files["rgba"])
    files["exif"] = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    rgb.save(files["exif"], exif=exif)
    return files


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A page served on 127.0.0.1 for the tests of one module, with a forward counter on its model."""

    def __init__(self, url: str, page, predictor, counter: ForwardCounter, work_dir: Path) -> None:
        self.url, self.page, self.predictor, self.counter, self.work_dir = url, page, predictor, counter, work_dir


@pytest.fixture(scope="module")
def served(toy_checkpoint, street, tmp_path_factory):
    """The app on 127.0.0.1 with the toy model (one torch thread), stopped after the module's tests."""
    pytest.importorskip("gradio")
    import os

    from detr_panoptic.app.page import build_app, launch
    from detr_panoptic.inference import PanopticPredictor

    work = tmp_path_factory.mktemp("app")
    previous = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR",)}
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")  # uploads and results under the test's folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    predictor = PanopticPredictor.from_pretrained(toy_checkpoint, device="cpu")
    counter = ForwardCounter(predictor.model)
    strict = predictor.with_settings(threshold=0.7, merge_stuff="merge", min_area=10, min_visible=0.5)  # same weights
    page = build_app({"toy": predictor, "toy-strict": strict}, examples=[street], lowest=LOWEST, queue_size=4,
                     max_pixels=200 * 400, work_dir=work / "results")
    try:
        _, url, _ = launch(page, host="127.0.0.1", port=free_port(), block=False)
        yield Served(url, page, predictor, counter, work)
    finally:
        page.close()
        torch.set_num_threads(threads)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
