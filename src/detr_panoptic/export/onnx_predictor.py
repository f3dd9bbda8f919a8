"""``OnnxPredictor``: the PyTorch predictor with the network run by onnxruntime.

Same settings object (``inference.PredictorSettings``, restored from ``metadata.json``), same
preprocessing (``inference.preprocess``, padding with ``utils.batching.pad_images``), same kept-query
rule and post-processing (``models.postprocess.PanopticPostProcessor``)
as ``inference.PanopticPredictor``; only the network differs: ``trunk.onnx`` for the batch, then
``masks.onnx`` for the kept queries of each image (see ``export.onnx``). Results are on the CPU.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.export.onnx import (
    MASK_INPUTS,
    MASKS_FILE,
    METADATA_FILE,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    TRUNK_FILE,
    TRUNK_OUTPUTS,
    require,
)
from detr_panoptic.inference.predictor import PanopticPredictor
from detr_panoptic.inference.settings import PredictorSettings
from detr_panoptic.models.detr import image_sizes
from detr_panoptic.models.outputs import DETROutput, PanopticResult
from detr_panoptic.utils.batching import pad_images
from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def read_onnx_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of an ONNX export folder, checked (the graphs must be there too)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected an ONNX export: {TRUNK_FILE}, {MASKS_FILE}, "
                                f"{METADATA_FILE})")
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: not an ONNX export of detr-panoptic (no {METADATA_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: expected a JSON file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise UserInputError(f"{path}: not the metadata of a detr-panoptic ONNX export (format is not "
                             f"{ONNX_FORMAT!r})")
    if int(meta.get("format_version", 0)) > ONNX_FORMAT_VERSION:
        raise UserInputError(f"{path}: format version {meta['format_version']} is newer than this detr-panoptic "
                             f"reads ({ONNX_FORMAT_VERSION}); upgrade detr-panoptic")
    for name in (TRUNK_FILE, MASKS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: {name} is missing")
    return meta


def _providers(device: str | torch.device | None, available: Sequence[str]) -> tuple[list[str], torch.device]:
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    kind = name.split(":")[0]
    if kind not in PROVIDERS:
        raise UserInputError(f"unknown device {name!r} for onnxruntime: expected cpu, cuda, cuda:N or auto")
    if PROVIDERS[kind] not in available:
        raise UserInputError(f"device {name!r}: this onnxruntime has no {PROVIDERS[kind]} (available: "
                             f"{', '.join(available)}); install onnxruntime-gpu, or use --device cpu")
    if kind == "cpu":
        return [PROVIDERS["cpu"]], torch.device("cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    return [(PROVIDERS["cuda"], {"device_id": index}), PROVIDERS["cpu"]], torch.device(f"cuda:{index}")


class OnnxPredictor(PanopticPredictor):
    """A predictor over an ONNX export folder (``detr-panoptic export --format onnx``).

    ``OnnxPredictor.from_pretrained(folder)`` restores the settings from ``metadata.json``; calling it
    (``predictor(images)``, ``predict_batch(samples)``, ``predict_tensors``) is as for ``PanopticPredictor``
    and returns the same ``PanopticResult``s (on the CPU). ``device``: ``cpu``, ``cuda[:N]`` (needs
    onnxruntime-gpu) or ``auto``. ``threads``: onnxruntime's intra-op threads (default: its own).
    ``mask_batch``: at most this many queries per run of the mask graph (bounds the memory of the
    1/4-resolution activations; results do not depend on it beyond float rounding).
    """

    def __init__(self, folder: str | os.PathLike, settings: PredictorSettings, *,
                 device: str | torch.device | None = "auto", threads: int | None = None,
                 mask_batch: int = 16) -> None:
        ort = require("onnxruntime")
        metadata = read_onnx_metadata(folder)
        num_classes = int(metadata.get("model_config", {}).get("num_classes", settings.category_map.num_classes))
        if settings.category_map.num_classes != num_classes:
            raise ValueError(f"the settings' category map has {settings.category_map.num_classes} classes, "
                             f"the model {num_classes}")
        if mask_batch < 1:
            raise UserInputError(f"mask_batch must be >= 1, got {mask_batch}")
        self.folder = Path(folder)
        self.metadata = metadata
        self.settings = settings
        self.dtype = None
        self.mask_batch = int(mask_batch)
        self.threads = threads
        providers, self.device = _providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.trunk = ort.InferenceSession(str(self.folder / TRUNK_FILE), options, providers=providers)
        self.masks = ort.InferenceSession(str(self.folder / MASKS_FILE), options, providers=providers)
        self.postprocessor = settings.postprocessor()

    @property
    def model(self) -> None:  # type: ignore[override]
        """No PyTorch module: the network is the ONNX graphs (``trunk``, ``masks``)."""
        return None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *,  # type: ignore[override]
                        device: str | torch.device | None = "auto", threads: int | None = None,
                        mask_batch: int = 16, threshold: float | None = None, size: int | None = None,
                        max_size: int | None = None, merge_stuff: str | None = None,
                        min_area: int | None = None, min_visible: float | None = None,
                        dtype: Any = None) -> OnnxPredictor:
        """The export folder ``source`` with its settings; explicit arguments win over ``metadata.json``'s."""
        if dtype not in (None, "fp32", "float32", torch.float32):
            raise UserInputError(f"the ONNX graphs are float32; dtype {dtype!r} is not available")
        require("onnxruntime")  # the install hint before anything else
        meta = read_onnx_metadata(source)
        category_map = None
        if meta.get("category_map"):
            category_map = CategoryMap.from_json(meta["category_map"], source=str(Path(source) / METADATA_FILE))
        saved_size = meta.get("input_size")
        input_size = None
        if isinstance(saved_size, dict) and saved_size.get("min_size"):
            input_size = (int(saved_size["min_size"]), saved_size.get("max_size"))
        settings = PredictorSettings.from_checkpoint(
            category_map=category_map, input_size=input_size, postprocess=meta.get("postprocess"),
            source=str(source), threshold=threshold, min_size=size, max_size=max_size, merge_stuff=merge_stuff,
            min_area=min_area, min_visible=min_visible)
        return cls(source, settings, device=device, threads=threads, mask_batch=mask_batch)

    def weights_fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the two graphs: which weights a restartable output folder holds."""
        from detr_panoptic.utils.io import file_digest

        return file_digest(self.folder / TRUNK_FILE, self.folder / MASKS_FILE)

    def with_settings(self, **changes: Any) -> OnnxPredictor:
        """The same graphs (new sessions over the same files) with some settings changed."""
        return OnnxPredictor(self.folder, self.settings.replace(**changes), device=self.device,
                             threads=self.threads, mask_batch=self.mask_batch)

    def attention(self, image: Any) -> Any:
        raise NotImplementedError("attention maps are not in the ONNX graphs: use the PyTorch PanopticPredictor")

    # -- running ----------------------------------------------------------------------------------------
    def run_trunk(self, batch: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """``trunk.onnx`` on a padded batch -> its outputs by name (see ``export.onnx``)."""
        outputs = self.trunk.run(None, {"images": batch.float().cpu().numpy(),
                                        "padding_mask": padding_mask.cpu().numpy()})
        return dict(zip(TRUNK_OUTPUTS, outputs))

    def run_masks(self, trunk: dict[str, np.ndarray], image: int, queries: np.ndarray) -> np.ndarray:
        """Mask logits [K, H/4, W/4] of ``queries`` (indices) of image ``image`` of the batch, in chunks of
        ``mask_batch``."""
        per_image = {name: trunk[name][image:image + 1] for name in MASK_INPUTS[1:]}
        chunks = []
        for start in range(0, len(queries), self.mask_batch):
            rows = queries[start:start + self.mask_batch]
            feeds = {"mask_queries": np.ascontiguousarray(trunk["mask_queries"][image, rows]), **per_image}
            chunks.append(self.masks.run(None, feeds)[0])
        return np.concatenate(chunks)

    def predict_tensors(self, images: Sequence[torch.Tensor], orig_sizes: Sequence[tuple[int, int]]
                        ) -> list[PanopticResult]:
        """Results for preprocessed images (``preprocess``), each resized to its ``orig_sizes`` entry."""
        if not images:
            return []
        return self.postprocessor(self.forward(images), list(orig_sizes))

    def forward(self, images: Sequence[torch.Tensor], *, mask_threshold: float | None = None) -> DETROutput:
        """The graphs' raw outputs for preprocessed images, with the masks of the queries kept at
        ``mask_threshold`` (default: the settings') only (as ``PanopticPredictor.forward``)."""
        keep = self.postprocessor if mask_threshold is None else self.postprocessor.replace(threshold=mask_threshold)
        batch, padding_mask = pad_images([image.cpu() for image in images])
        trunk = self.run_trunk(batch, padding_mask)
        output = DETROutput(pred_logits=torch.from_numpy(trunk["logits"]), pred_boxes=torch.from_numpy(trunk["boxes"]),
                            input_size=tuple(batch.shape[-2:]), image_sizes=image_sizes(padding_mask))
        selected = keep.kept_queries(output)
        lateral = trunk["lateral3"]  # the masks' grid: 1/4 of the padded batch
        masks = [torch.from_numpy(self.run_masks(trunk, b, q.numpy())) for b, q in enumerate(selected) if len(q)]
        output.pred_masks = torch.cat(masks) if masks else torch.zeros(0, *lateral.shape[-2:])
        output.mask_queries = selected
        return output
