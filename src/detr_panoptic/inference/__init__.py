"""Inference: one way from an image to a panoptic result, shared by every command.

::

    checkpoint --load_checkpoint--> model + PredictorSettings --> PanopticPredictor
    image files / dataset --ImageFiles / DatasetSamples--> InferenceSample --make_loader (DataLoader)-->
        run_inference(predictor, loader, evaluators) --> PQEvaluator | PanopticWriter | OverlayWriter

``predict`` is ``predict_to_folder``, ``evaluate`` (and the demo) ``evaluate_dataset``, training
validation ``run_inference`` with a ``PQEvaluator`` from a hook, ``attention`` ``PanopticPredictor.attention``.
"""
from detr_panoptic.inference.evaluators import (
    DetectionEvaluator,
    Evaluator,
    OverlayWriter,
    PanopticWriter,
    PQEvaluator,
    detection_metrics,
)
from detr_panoptic.inference.predictor import AttentionMaps, PanopticPredictor
from detr_panoptic.inference.runner import InferenceRun, make_loader, run_inference
from detr_panoptic.inference.samples import (
    DatasetSamples,
    ImageFiles,
    InferenceSample,
    Skipped,
    expand_inputs,
    load_image,
    preprocess,
)
from detr_panoptic.inference.settings import PredictorSettings
from detr_panoptic.inference.tasks import (
    EvalData,
    LoadOptions,
    evaluate_checkpoint,
    evaluate_dataset,
    predict_to_folder,
)

__all__ = [
    "AttentionMaps",
    "DatasetSamples",
    "DetectionEvaluator",
    "EvalData",
    "Evaluator",
    "ImageFiles",
    "InferenceRun",
    "InferenceSample",
    "LoadOptions",
    "OverlayWriter",
    "PQEvaluator",
    "PanopticPredictor",
    "PanopticWriter",
    "PredictorSettings",
    "Skipped",
    "detection_metrics",
    "evaluate_checkpoint",
    "evaluate_dataset",
    "expand_inputs",
    "load_image",
    "make_loader",
    "predict_to_folder",
    "preprocess",
    "run_inference",
]
