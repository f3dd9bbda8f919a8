"""ONNX export: the model as two graphs, split where the kept-query decision happens.

* ``trunk.onnx``: backbone, position embedding, transformer, class and box heads, and the per-image parts
  of the mask branch. Inputs ``images`` float32 [B, 3, H, W] (normalised, padded) and ``padding_mask``
  bool [B, H, W] (True on padding); B, H and W are dynamic. Outputs: ``logits`` [B, Q, C+1],
  ``boxes`` [B, Q, 4] (normalised cxcywh), ``mask_queries`` [B, Q, heads, D/heads] (every query's
  projected attention query), ``mask_keys`` [B, heads, D/heads, h*w], ``memory_padding`` bool [B, h*w]
  (h, w = H/32, W/32), ``context`` [B, D+heads, h, w] (the mask head's first convolution on the encoder
  features, shared by all queries of an image) and ``lateral1..3`` (the FPN adapters on layer3, layer2,
  layer1: [B, D/2, H/16, W/16], [B, D/4, H/8, W/8], [B, D/8, H/4, W/4]).
* ``masks.onnx``: the mask branch of N queries of ONE image. Inputs: ``mask_queries`` [N, heads, D/heads]
  (rows of the trunk's output for the kept queries), ``mask_keys`` [1, ...], ``memory_padding`` [1, h*w],
  ``context`` [1, ...], ``lateral1..3`` [1, ...] (image b's slices); N, h, w (and the lateral sizes) are
  dynamic. Output ``masks`` [N, H/4, W/4] mask logits.

Between the two the caller decides which queries are kept (``models.postprocess.kept_queries``, the same
rule as in PyTorch) and runs the mask graph only for those (none kept: it is not run). Preprocessing
(resize, normalisation, padding) and post-processing (mask resizing, segment merging) stay outside the
graphs: ``export.onnx_predictor.OnnxPredictor`` runs the same Python code as the PyTorch predictor.

``metadata.json`` beside the graphs holds the model config, category map, input size and
post-processing settings (the checkpoint's metadata), plus the graphs' opset and input/output names.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detr_panoptic.checkpoints import FORMAT_VERSION
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

OPSET = 18
TRUNK_FILE = "trunk.onnx"
MASKS_FILE = "masks.onnx"
METADATA_FILE = "metadata.json"
ONNX_FORMAT = "detr-panoptic-onnx"
ONNX_FORMAT_VERSION = 1
TRUNK_INPUTS = ("images", "padding_mask")
TRUNK_OUTPUTS = ("logits", "boxes", "mask_queries", "mask_keys", "memory_padding", "context",
                 "lateral1", "lateral2", "lateral3")
MASK_INPUTS = ("mask_queries", "mask_keys", "memory_padding", "context", "lateral1", "lateral2", "lateral3")
MASK_OUTPUTS = ("masks",)
INSTALL_HINT = "pip install 'detr-panoptic[onnx]' (or: pip install onnx onnxruntime onnxscript)"


def require(module: str) -> Any:
    """Import an optional dependency of the ONNX export, or fail with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserInputError(f"ONNX export and inference need the '{module}' package ({exc}): {INSTALL_HINT}"
                             ) from None


class TrunkGraph(nn.Module):
    """What ``trunk.onnx`` computes (see the module docstring)."""

    def __init__(self, model: PanopticDETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        trunk = model._trunk(images, padding_mask)
        memory = trunk["memory"]
        queries = model.bbox_attention.project_queries(trunk["hs"][-1])
        keys = model.bbox_attention.project_keys(memory)
        fpns = [trunk["levels"][i][0] for i in (2, 1, 0)]
        context, laterals = model.mask_head.prepare(trunk["projected"], fpns)
        return (trunk["logits"][-1], trunk["boxes"][-1], queries, keys, trunk["mask"].flatten(1), context,
                *laterals)


class MaskGraph(nn.Module):
    """What ``masks.onnx`` computes: ``PanopticDETR._masks`` for N queries of one image."""

    def __init__(self, model: PanopticDETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, memory_padding: torch.Tensor,
                context: torch.Tensor, lateral1: torch.Tensor, lateral2: torch.Tensor, lateral3: torch.Tensor
                ) -> torch.Tensor:
        model = self.model
        size = (context.shape[-2], context.shape[-1])
        # [N, heads, dh] @ [1, heads, dh, hw] broadcasts over the queries: no per-query copy of the keys
        attention = model.bbox_attention.attend(queries, keys, memory_padding, size)
        image_index = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        return model.mask_head.decode(context, attention, [lateral1, lateral2, lateral3], image_index)


def _example_inputs(model: PanopticDETR, height: int, width: int, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    padding = torch.zeros(batch, height, width, dtype=torch.bool)
    if batch > 1:  # a padded second image, so that the example exercises the mask
        padding[1, height // 2:, :] = True
        padding[1, :, width * 3 // 4:] = True
    return images, padding


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter and its graph optimiser log every folded constant at INFO: keep WARNING and above."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...],
            output_names: tuple[str, ...], dynamic_shapes: Any) -> None:
    require("onnx")
    require("onnxscript")
    with atomic_path(path) as tmp, _quiet_exporter():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                    external_data=False, verbose=False, report=False, optimize=True)
        program.save(str(tmp))


def export_onnx(model: PanopticDETR, out_dir: str | os.PathLike, *, category_map: CategoryMap | None = None,
                input_size: tuple[int, int | None] | None = None,
                postprocess: Mapping[str, Any] | None = None) -> Path:
    """Write ``trunk.onnx``, ``masks.onnx`` and ``metadata.json`` into ``out_dir``; returns the folder.

    Opset 18 (``torch.onnx.export`` with the dynamo exporter), float32. Dynamic axes: the trunk's batch,
    height and width; the mask graph's number of queries and every spatial size.
    """
    require("onnx")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: exists and is not a folder")
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    # H, W >= 64: the stride-32 features keep >= 2 cells a side (min 1 makes torch.export specialise)
    height = torch.export.Dim("height", min=64, max=8192)
    width = torch.export.Dim("width", min=64, max=8192)
    images, padding = _example_inputs(model, 96, 128, 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            _export(TrunkGraph(model).eval(), (images, padding), out / TRUNK_FILE, TRUNK_INPUTS, TRUNK_OUTPUTS,
                    {"images": {0: batch, 2: height, 3: width}, "padding_mask": {0: batch, 1: height, 2: width}})
            trunk = TrunkGraph(model)(images, padding)
            n = torch.export.Dim("queries", min=1, max=4096)
            mask_args = (trunk[2][0, :3], *(t[:1] for t in trunk[3:]))
            hw, h, w = (torch.export.Dim(name, min=2, max=1 << 20) for name in ("hw", "h", "w"))
            spatial = [{2: torch.export.Dim(f"h{i}", min=2, max=4096), 3: torch.export.Dim(f"w{i}", min=2, max=4096)}
                       for i in (1, 2, 3)]
            _export(MaskGraph(model).eval(), mask_args, out / MASKS_FILE, MASK_INPUTS, MASK_OUTPUTS,
                    {"queries": {0: n}, "keys": {3: hw}, "memory_padding": {1: hw}, "context": {2: h, 3: w},
                     "lateral1": spatial[0], "lateral2": spatial[1], "lateral3": spatial[2]})
    except OSError as exc:
        raise UserInputError(f"{out}: cannot write the ONNX graphs ({exc})") from None
    atomic_write_json(out / METADATA_FILE, onnx_metadata(model, category_map, input_size, postprocess))
    return out


def onnx_metadata(model: PanopticDETR, category_map: CategoryMap | None, input_size: tuple[int, int | None] | None,
                  postprocess: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``metadata.json`` holds: the checkpoint metadata plus a description of the graphs."""
    meta: dict[str, Any] = {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "checkpoint_format_version": FORMAT_VERSION,
        "opset": OPSET, "model_config": model.config.to_dict(),
        "category_map": category_map.to_json() if category_map is not None else None,
        "graphs": {"trunk": {"file": TRUNK_FILE, "inputs": list(TRUNK_INPUTS), "outputs": list(TRUNK_OUTPUTS)},
                   "masks": {"file": MASKS_FILE, "inputs": list(MASK_INPUTS), "outputs": list(MASK_OUTPUTS)}},
    }
    if input_size is not None:
        meta["input_size"] = {"min_size": int(input_size[0]),
                              "max_size": None if input_size[1] is None else int(input_size[1])}
    if postprocess is not None:
        meta["postprocess"] = dict(postprocess)
    return meta
