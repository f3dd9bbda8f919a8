"""Collapse diagnostics: how much the model's intermediate outputs depend on the image.

A DETR whose encoder stops looking at the image still learns stuff (road, sky are in every image, and the
mask head gets image detail from the backbone), while every thing query predicts the same class and box in
every image (issue 15). ``image_dependence(model, images)`` measures it on a fixed handful of images:

* ``diag_memory_image_var``: the encoder memory [B, D, h, w]: the variance across images at each
  (channel, cell), averaged over (channel, cell), divided by the variance of all its values. 1 would
  mean everything that varies varies between images; a model that ignores its input gives 0. (A random
  DETR starts near 0.3; the collapsed demo pre-training reached 1.7e-4.)
* ``diag_decoder_image_var``: the same ratio for the last decoder layer's output [B, Q, D] (per query and
  channel, across images).
* ``diag_box_centre_spread``: the variance across images of each query's predicted box centre
  (normalised image units), averaged over queries and the two coordinates; ``diag_box_size_mean``: the
  mean predicted box width x height (normalised), for context.

Only cells that are not padding in any of the images count (use images of one size).
``DiagnosedValidation`` wraps a validation callable (``evaluate(model) -> metrics``, the
``engine.training.train_stage`` extension point) so that each validation record in ``metrics.jsonl``
carries these keys, and a collapse shows on the curve while it happens.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from detr_panoptic.utils.batching import pad_images

DIAGNOSTIC_KEYS = ("diag_memory_image_var", "diag_decoder_image_var", "diag_box_centre_spread",
                   "diag_box_size_mean")


def image_variance_ratio(values: torch.Tensor) -> float:
    """Mean over the other dimensions of the variance across dimension 0 (the images), divided by the
    variance of all values (both population variances). ``values`` [B, ...] with B >= 2; 0 when every
    value is the same."""
    if values.shape[0] < 2:
        raise ValueError(f"the image-dependence needs at least 2 images, got {values.shape[0]}")
    values = values.double().flatten(1)
    total = values.var(unbiased=False)
    if float(total) == 0.0:
        return 0.0
    return float(values.var(dim=0, unbiased=False).mean() / total)


@torch.no_grad()
def image_dependence(model: nn.Module, images: Sequence[torch.Tensor] | torch.Tensor) -> dict[str, float]:
    """The ``diag_*`` measurements of ``model`` (a ``PanopticDETR``, possibly DDP-wrapped) on ``images``
    (normalised [3, H, W], at least 2; ideally one size). Runs in eval mode and restores the mode; no
    masks are computed."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    images = list(images)
    if len(images) < 2:
        raise ValueError(f"image_dependence needs at least 2 images, got {len(images)}")
    device = next(model.parameters()).device
    batch, pad_mask = pad_images([img.to(device) for img in images])
    captured: dict[str, Any] = {}

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["hs"], captured["memory"] = output[0], output[1]

    handle = model.detr.transformer.register_forward_hook(keep)  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    try:
        output = model(batch, pad_mask, mask_queries=lambda out: [torch.empty(0, dtype=torch.long)] * len(images))
    finally:
        handle.remove()
        model.train(was_training)
    memory = captured["memory"].float()  # [B, D, h, w]
    cell_pad = nn.functional.interpolate(pad_mask[:, None].float(), size=memory.shape[-2:])[:, 0] > 0.5
    valid = ~cell_pad.any(0)  # cells that are image in every picture
    if not bool(valid.any()):
        raise ValueError("image_dependence: no feature cell is inside every image (use images of one size)")
    memory_cells = memory[:, :, valid]  # [B, D, cells]
    hs = captured["hs"][-1].float()  # [B, Q, D]
    boxes = output.pred_boxes.float()  # [B, Q, 4] cxcywh
    centre_spread = boxes[..., :2].var(dim=0, unbiased=False).mean()
    return {
        "diag_memory_image_var": image_variance_ratio(memory_cells),
        "diag_decoder_image_var": image_variance_ratio(hs),
        "diag_box_centre_spread": float(centre_spread),
        "diag_box_size_mean": float((boxes[..., 2] * boxes[..., 3]).mean()),
    }


def diagnostic_images(dataset: Any, count: int = 8) -> list[torch.Tensor]:
    """The first ``count`` images of ``dataset`` (items ``(image, target)``, as the datasets give them)."""
    count = min(count, len(dataset))
    return [dataset[i][0] for i in range(count)]


class DiagnosedValidation:
    """``evaluate(model) -> metrics`` with the ``diag_*`` keys of ``image_dependence`` on ``images`` added
    (for ``train_stage(..., evaluate=...)`` / ``EvalHook``): each validation record then carries them.
    With ``evaluate`` None only the diagnostics are returned."""

    def __init__(self, evaluate: Callable[[nn.Module], Mapping[str, Any]] | None,
                 images: Sequence[torch.Tensor]) -> None:
        if len(images) < 2:
            raise ValueError(f"DiagnosedValidation needs at least 2 images, got {len(images)}")
        self.evaluate = evaluate
        self.images = list(images)

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        metrics = dict(self.evaluate(model)) if self.evaluate is not None else {}
        metrics.update(image_dependence(model, self.images))
        return metrics
