"""detr-panoptic: panoptic segmentation with DETR.

The public API, re-exported lazily (``import detr_panoptic`` stays cheap; the CLI's ``--help`` does
not import torch until a command needs it)::

    from detr_panoptic import PanopticPredictor, load_pretrained, pq_compute, convert_cityscapes

    predictor = PanopticPredictor.from_pretrained("coco-r50-panoptic")
    result = predictor("street.jpg")[0]        # PanopticResult: id_map [H, W], segments_info, kept queries
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # inference: the one way from an image to a panoptic result
    "PanopticPredictor": "detr_panoptic.inference",
    "PredictorSettings": "detr_panoptic.inference",
    "run_inference": "detr_panoptic.inference",
    "make_loader": "detr_panoptic.inference",
    "PQEvaluator": "detr_panoptic.inference",
    "PanopticWriter": "detr_panoptic.inference",
    "OverlayWriter": "detr_panoptic.inference",
    "predict_to_folder": "detr_panoptic.inference",
    "evaluate_dataset": "detr_panoptic.inference",
    "calibrate": "detr_panoptic.inference.calibrate",
    # models
    "PanopticDETR": "detr_panoptic.models.detr",
    "DETRConfig": "detr_panoptic.models.config",
    "DETROutput": "detr_panoptic.models.outputs",
    "PanopticResult": "detr_panoptic.models.outputs",
    "KeptQueries": "detr_panoptic.models.outputs",
    "panoptic_postprocess": "detr_panoptic.models.postprocess",
    "PanopticPostProcessor": "detr_panoptic.models.postprocess",
    "PostprocessSettings": "detr_panoptic.models.postprocess",
    "build_criterion": "detr_panoptic.models.criterion",
    "build_matcher": "detr_panoptic.models.matcher",
    # checkpoints
    "load_pretrained": "detr_panoptic.checkpoints",
    "load_checkpoint": "detr_panoptic.checkpoints",
    "save_checkpoint": "detr_panoptic.checkpoints",
    "export_safetensors": "detr_panoptic.checkpoints",
    # deployment
    "OnnxPredictor": "detr_panoptic.export.onnx_predictor",
    "export_onnx": "detr_panoptic.export.onnx",
    "export_hugging_face": "detr_panoptic.export.hugging_face",
    "export_checkpoint": "detr_panoptic.export",
    # data
    "Category": "detr_panoptic.data.categories",
    "CategoryMap": "detr_panoptic.data.categories",
    "coco_category_map": "detr_panoptic.data.categories",
    "convert_cityscapes": "detr_panoptic.data.cityscapes",
    "CocoPanopticDataset": "detr_panoptic.data.coco_panoptic",
    "cityscapes_panoptic_dataset": "detr_panoptic.data.coco_panoptic",
    "make_synthetic_cityscapes": "detr_panoptic.data.synthetic",
    "check_dataset": "detr_panoptic.data.check",
    "make_transforms": "detr_panoptic.data.transforms",
    # evaluation
    "pq_compute": "detr_panoptic.evaluation.pq",
    "PQAccumulator": "detr_panoptic.evaluation.pq",
    # engine
    "apply_freeze": "detr_panoptic.engine.freezing",
    "train": "detr_panoptic.engine.training",
    # configuration
    "Config": "detr_panoptic.config",
    "load_config": "detr_panoptic.config",
    "save_config": "detr_panoptic.config",
}

__all__ = ["__version__", *_EXPORTS]  # noqa: PLE0604 - the names, lazily imported by __getattr__


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'detr_panoptic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
