"""``PanopticPredictor``: the one way an image becomes a panoptic result.

``PanopticPredictor.from_pretrained(source)`` loads any source ``checkpoints.load_checkpoint`` reads
and restores ``PredictorSettings`` from it (categories, training input size, calibrated
post-processing). ``predictor(images)`` takes PIL images, paths or ``[3, H, W]`` tensors and returns
``PanopticResult``s at each image's original size; ``predict_batch(samples)`` is what ``run_inference``
calls for a loader's batches. Both are ``forward`` (the network, masks for the kept queries only) then
``postprocessor`` (``models.postprocess.PanopticPostProcessor``). The network runs in float32, or under
bf16/fp16 autocast (``dtype``); the kept-query decision and post-processing always run in float32.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from detr_panoptic.inference.samples import InferenceSample, load_image, preprocess
from detr_panoptic.inference.settings import PredictorSettings
from detr_panoptic.models.dense_outputs import DenseOutputs, add_dense_outputs
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.outputs import DETROutput, PanopticResult
from detr_panoptic.models.postprocess import PanopticPostProcessor
from detr_panoptic.utils.devices import resolve_device

log = logging.getLogger(__name__)

ImageInput = Image.Image | torch.Tensor | str | os.PathLike


class PanopticPredictor:
    """A model plus its ``PredictorSettings`` on one device (see the module docstring).

    The model is put in eval mode and moved to ``device``; ``dtype`` (``"bf16"``, ``"fp16"``,
    ``torch.bfloat16`` ...; None/"fp32": float32) runs the network under autocast where the hardware
    allows it (``utils.precision.resolve_dtype`` says what happens where it does not).
    """

    def __init__(self, model: PanopticDETR, settings: PredictorSettings, *,
                 device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None) -> None:
        if settings.category_map.num_classes != model.num_classes:
            raise ValueError(f"the settings' category map has {settings.category_map.num_classes} classes, "
                             f"the model {model.num_classes}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.settings = settings
        self.dtype = _resolve_dtype(dtype, self.device)
        self.postprocessor: PanopticPostProcessor = settings.postprocessor()
        self.dense: DenseOutputs | None = None

    def with_dense_outputs(self, dense: DenseOutputs | None) -> PanopticPredictor:
        """The same predictor whose results also carry a semantic map and instances computed from the
        queries (``models.dense_outputs.DenseOutputs``; None or "panoptic" sources: nothing added)."""
        predictor = copy.copy(self)  # the same model, settings and post-processor
        predictor.dense = dense
        return predictor

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, threshold: float | None = None,
                        size: int | None = None, max_size: int | None = None,
                        merge_stuff: str | None = None, min_area: int | None = None,
                        min_visible: float | None = None) -> PanopticPredictor:
        """Load ``source`` (a file, URL, alias or Hugging Face folder: ``checkpoints.load_checkpoint``) with
        its settings; explicit arguments win over the checkpoint's, which win over DETR's defaults."""
        from detr_panoptic.checkpoints import load_checkpoint

        pretrained = load_checkpoint(source)
        settings = PredictorSettings.from_checkpoint(
            category_map=pretrained.category_map, input_size=pretrained.input_size,
            postprocess=pretrained.postprocess, source=pretrained.description, threshold=threshold,
            min_size=size, max_size=max_size, merge_stuff=merge_stuff, min_area=min_area, min_visible=min_visible)
        return cls(pretrained.model, settings, device=device, dtype=dtype)

    def with_settings(self, **changes: Any) -> PanopticPredictor:
        """The same model (shared, not copied) with some settings changed (``threshold=0.5`` ...)."""
        return PanopticPredictor(self.model, self.settings.replace(**changes), device=self.device, dtype=self.dtype)

    def weights_fingerprint(self) -> str:
        """Which weights make this predictor's results (a restartable output folder checks it)."""
        return weights_digest(self.model)

    # -- running ----------------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return preprocess(image, self.settings.min_size, self.settings.max_size)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> list[PanopticResult]:
        """Results for one image or a list (PIL images, paths, or RGB ``[3, H, W]`` uint8 / 0..1 float tensors)."""
        if isinstance(images, (Image.Image, torch.Tensor, str, os.PathLike)):
            images = [images]
        pictures = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        sizes = [(p.height, p.width) if isinstance(p, Image.Image) else tuple(int(v) for v in p.shape[-2:])
                 for p in pictures]
        return self.predict_tensors([self.preprocess(p) for p in pictures], sizes)

    def predict_batch(self, samples: Sequence[InferenceSample]) -> list[PanopticResult]:
        """Results (on the CPU) for a batch of ``InferenceSample``s, at their ``orig_size``."""
        return self.predict_tensors([s.image for s in samples], [s.orig_size for s in samples])

    def predict_tensors(self, images: Sequence[torch.Tensor], orig_sizes: Sequence[tuple[int, int]]
                        ) -> list[PanopticResult]:
        """Results for preprocessed images (``preprocess``), each resized to its ``orig_sizes`` entry."""
        if not images:
            return []
        dense = self.dense
        with torch.inference_mode():
            if dense is None or not dense.uses_queries:
                results = self.postprocessor(self.forward(images), list(orig_sizes))
            else:  # masks of the candidate queries too, from the same forward pass
                lowest = min(dense.candidate_threshold, self.postprocessor.settings.threshold)
                output = self.forward(images, mask_threshold=lowest)
                results = self.postprocessor(output, list(orig_sizes))
                add_dense_outputs(results, output, dense, list(output.image_sizes), list(orig_sizes),
                                  self.postprocessor.is_thing, self.postprocessor.class_to_category)
        return [result.cpu() for result in results]

    def forward(self, images: Sequence[torch.Tensor], *, mask_threshold: float | None = None,
                return_attention: bool = False) -> DETROutput:
        """The network's raw outputs (float32, on the device) for preprocessed images, with the masks of the
        queries kept at ``mask_threshold`` (default: the settings' threshold) only.

        ``self.postprocessor`` turns them into results; so does any ``self.postprocessor.replace(...)``
        whose settings keep a subset of those queries (a threshold >= ``mask_threshold``), without a new
        forward pass: compute once at the lowest threshold you will ask for, post-process many times.
        """
        keep = self.postprocessor if mask_threshold is None else self.postprocessor.replace(threshold=mask_threshold)
        device_type = self.device.type

        def kept(output: DETROutput) -> list[torch.Tensor]:
            with torch.autocast(device_type, enabled=False):  # the decision in float32, as documented
                return keep.kept_queries(output)

        precision = torch.autocast(device_type, dtype=self.dtype) if self.dtype is not None \
            else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            output = self.model([image.to(self.device) for image in images], mask_queries=kept,
                                return_attention=return_attention)
        output.pred_logits = output.pred_logits.float()
        output.pred_boxes = output.pred_boxes.float()
        output.pred_masks = output.pred_masks.float()
        return output

    # -- attention --------------------------------------------------------------------------------------
    def attention(self, image: ImageInput) -> AttentionMaps:
        """One image with the kept queries' attention maps (``AttentionMaps``), from one forward pass.

        The kept queries are those of the panoptic result (the post-processor's rule).
        """
        picture = load_image(image) if isinstance(image, (str, os.PathLike)) else image
        if isinstance(picture, torch.Tensor):
            from torchvision.transforms.v2 import functional as TF

            picture = TF.to_pil_image(picture)
        tensor = self.preprocess(picture)
        with torch.inference_mode():
            output = self.forward([tensor], return_attention=True)
            result = self.postprocessor(output, [(picture.height, picture.width)])[0].cpu()
        return attention_maps(output, picture, tensor, result)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) over every parameter and buffer of ``model``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class AttentionMaps:
    """What the attention figures need for one image; everything on the CPU.

    queries: LongTensor [K] indices of the kept queries (the panoptic result's ``kept``).
    scores: [K]; category_ids: [K]; boxes: [K, 4] xyxy in original-image pixels.
    masks: [K, H, W] mask probabilities at the original image size.
    decoder: [K, heads, h, w] last-layer decoder cross-attention of the kept queries.
    encoder: [h, w, h, w] last-layer encoder self-attention (mean over heads), or None.
    feature_size: (h, w) of the encoder feature map.
    """

    image: Image.Image
    queries: torch.Tensor
    scores: torch.Tensor
    category_ids: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    decoder: torch.Tensor
    encoder: torch.Tensor | None
    feature_size: tuple[int, int]
    result: PanopticResult | None = None


def attention_maps(output: Any, picture: Image.Image, tensor: torch.Tensor, result: PanopticResult
                   ) -> AttentionMaps:
    """``AttentionMaps`` from a one-image forward with attention weights and masks of ``result.kept``'s queries
    (``output``), the picture, its preprocessed ``tensor`` and the panoptic ``result``."""
    attentions = output.attentions or {}
    if attentions.get("decoder_cross") is None:
        raise RuntimeError(f"the model returned no decoder attention (keys: {sorted(attentions)})")
    feature_size = attentions.get("feature_size") or (-(-tensor.shape[-2] // 32), -(-tensor.shape[-1] // 32))
    feat_h, feat_w = (int(v) for v in feature_size)
    kept = result.kept
    assert kept is not None  # panoptic_postprocess always fills it
    queries = kept.indices
    decoder = _last(attentions["decoder_cross"])[0].float().cpu()  # [heads, Q, h*w]
    decoder = decoder[:, queries].reshape(decoder.shape[0], len(queries), feat_h, feat_w).transpose(0, 1)
    encoder = attentions.get("encoder_self")
    if encoder is not None:
        encoder = _last(encoder)[0].float().cpu()
        if encoder.dim() == 3:  # per head
            encoder = encoder.mean(0)
        encoder = encoder.reshape(feat_h, feat_w, feat_h, feat_w)
    height, width = picture.height, picture.width
    masks = torch.zeros((0, height, width))
    if len(queries):
        # Packed masks of the kept queries, in the order of ``mask_queries`` (= the kept indices), at 1/4 of
        # the single unpadded input: resize straight to the original size.
        logits = output.pred_masks.float()[None]
        masks = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                align_corners=False)[0].sigmoid().cpu()
    return AttentionMaps(image=picture, queries=queries, scores=kept.scores, category_ids=kept.category_ids,
                         boxes=kept.boxes, masks=masks, decoder=decoder, encoder=encoder,
                         feature_size=(feat_h, feat_w), result=result)


def _last(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The last layer's tensor, whether given as a list per layer or stacked [L, ...]."""
    return value if isinstance(value, torch.Tensor) else value[-1]


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None or dtype in ("fp32", "float32", torch.float32):
        return None
    from detr_panoptic.utils.precision import resolve_dtype

    return resolve_dtype(dtype, device)


