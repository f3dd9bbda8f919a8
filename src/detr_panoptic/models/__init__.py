"""DETR panoptic model, its parts, outputs and post-processing.

Import the parts from their modules; ``PanopticDETR`` and ``panoptic_postprocess`` are re-exported here.
"""
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.outputs import DETROutput, PanopticResult

__all__ = ["DETROutput", "PanopticDETR", "PanopticResult", "panoptic_postprocess"]


def __getattr__(name: str):  # lazy: postprocess imports nothing heavy, but keep import order simple
    if name == "panoptic_postprocess":
        from detr_panoptic.models.postprocess import panoptic_postprocess
        return panoptic_postprocess
    raise AttributeError(name)
