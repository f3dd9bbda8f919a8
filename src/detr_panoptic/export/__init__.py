"""Deployment: a checkpoint as ONNX graphs, a Hugging Face folder, or safetensors.

* ``export_onnx`` (``export.onnx``): ``trunk.onnx`` + ``masks.onnx`` + ``metadata.json``, run by
  ``OnnxPredictor`` (``export.onnx_predictor``) with the PyTorch predictor's pre- and post-processing;
* ``export_hugging_face`` (``export.hugging_face``): a ``DetrForSegmentation`` folder;
* ``export_checkpoint(source, format, out)``: any of them (or safetensors) from a checkpoint, what
  ``detr-panoptic export`` runs.

Nothing in the library imports this package (it imports models, checkpoints and inference); the command
and the top-level lazy exports do. onnx/onnxruntime are optional (the ``onnx`` extra).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detr_panoptic.utils.errors import UserInputError

if TYPE_CHECKING:
    from detr_panoptic.export.onnx_predictor import OnnxPredictor

FORMATS = ("onnx", "hf", "safetensors")
SAFETENSORS_FILE = "model.safetensors"

__all__ = ["FORMATS", "OnnxPredictor", "export_checkpoint", "export_hugging_face", "export_onnx"]


def __getattr__(name: str) -> Any:
    # lazily, so that ``export_checkpoint(..., "hf")`` never imports onnx
    if name == "export_onnx":
        from detr_panoptic.export.onnx import export_onnx

        return export_onnx
    if name == "export_hugging_face":
        from detr_panoptic.export.hugging_face import export_hugging_face

        return export_hugging_face
    if name == "OnnxPredictor":
        from detr_panoptic.export.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'detr_panoptic.export' has no attribute {name!r}")


def check_output_folder(out: str | os.PathLike) -> Path:
    """Create ``out`` (a folder) if needed and check that files can be written in it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"--out {path}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserInputError(f"--out {path}: the folder is not writable")
    return path


def export_checkpoint(source: str | os.PathLike, format: str, out: str | os.PathLike) -> list[Path]:
    """Export the checkpoint ``source`` (anything ``checkpoints.load_checkpoint`` reads) as ``format``
    (``onnx``, ``hf`` or ``safetensors``) into the folder ``out``; returns the files written.

    The checkpoint's categories, input size and post-processing settings travel with every format.
    """
    if format not in FORMATS:
        raise UserInputError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    folder = check_output_folder(out)
    if format == "onnx":  # fail on the missing extra before loading anything
        from detr_panoptic.export.onnx import require

        for module in ("onnx", "onnxscript"):
            require(module)
    from detr_panoptic.checkpoints import load_checkpoint

    pretrained = load_checkpoint(source)
    model = pretrained.model.eval()
    common = {"category_map": pretrained.category_map, "postprocess": pretrained.postprocess}
    if format == "safetensors":
        from detr_panoptic.checkpoints import export_safetensors, sidecar_path

        input_size = None if pretrained.input_size is None else \
            {"min_size": pretrained.input_size[0], "max_size": pretrained.input_size[1]}
        weights = export_safetensors(model, folder / SAFETENSORS_FILE, input_size=input_size, **common)
        return [weights, sidecar_path(weights)]
    if format == "hf":
        from detr_panoptic.export.hugging_face import export_hugging_face

        export_hugging_face(model, folder, input_size=pretrained.input_size, **common)
        return [folder / name for name in ("config.json", "model.safetensors", "preprocessor_config.json")]
    from detr_panoptic.export.onnx import MASKS_FILE, METADATA_FILE, TRUNK_FILE, export_onnx

    export_onnx(model, folder, input_size=pretrained.input_size, **common)
    return [folder / name for name in (TRUNK_FILE, MASKS_FILE, METADATA_FILE)]
