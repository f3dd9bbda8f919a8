"""DETR panoptic model, its parts, outputs and post-processing."""
from detr_panoptic.models.config import DETRConfig
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.outputs import DETROutput, PanopticResult
from detr_panoptic.models.postprocess import PanopticPostProcessor, PostprocessSettings, panoptic_postprocess

__all__ = ["DETRConfig", "DETROutput", "PanopticDETR", "PanopticPostProcessor", "PanopticResult", "PostprocessSettings",
           "panoptic_postprocess"]
