"""The demo's start points: the pre-training's random initialisation made trainable (frozen batch norms
calibrated on the data, the mask head's attention weights amplified) and the exports of the pre-trained
source model (official format; the packaged fp16 ``.safetensors`` start point)."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.config import Config
from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def export_source_model(checkpoint: Path, path: Path) -> Path:
    """The pre-trained model as the official format (``{"model": state_dict}`` with official keys) plus our
    metadata (model config, source category map), without the training state."""
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.models.config import DETRConfig
    from detr_panoptic.models.detr import PanopticDETR

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = saved["detr_panoptic"]
    model = PanopticDETR.from_config(DETRConfig.from_dict(meta["model_config"], source=str(path)))
    model.load_state_dict(saved["model"])
    return save_checkpoint(path, model, category_map=meta["category_map"], model_config=meta["model_config"],
                           input_size=meta.get("input_size"))


def export_start_point(checkpoint: Path, path: Path, *, about: Mapping[str, Any] | None = None) -> Path:
    """The source model (``export_source_model``'s file) as fp16 ``.safetensors`` + JSON sidecar: the
    format of the start point packaged with the demo (half the bytes; loading casts back to fp32).
    ``about`` (how it was made, its source val PQ) goes into the sidecar under ``demo``."""
    from detr_panoptic.checkpoints import export_safetensors, load_checkpoint, sidecar_path

    loaded = load_checkpoint(checkpoint)
    model = loaded.model.half()
    size = None if loaded.input_size is None else dict(zip(("min_size", "max_size"), loaded.input_size))
    weights = export_safetensors(model, path, category_map=loaded.category_map, model_config=model.config,
                                 input_size=size)
    if about:
        meta = json.loads(sidecar_path(weights).read_text())
        atomic_write_json(sidecar_path(weights), {**meta, "demo": dict(about)})
    return weights


def random_calibrated_init(path: Path, config: Config, category_map: CategoryMap,
                           images: Sequence[torch.Tensor], *, mask_attention_gain: float = 1.0) -> Path:
    """A randomly initialised model for ``config`` with calibrated frozen norms (and the mask head's
    attention weights amplified by ``mask_attention_gain``), saved to ``path``."""
    from detr_panoptic.checkpoints import save_checkpoint
    from detr_panoptic.engine.training import build_model

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, category_map)
    count = calibrate_frozen_batchnorm(model, images)
    log.info("demo: random backbone, %d frozen batch norms calibrated on %d images", count, len(images))
    if mask_attention_gain != 1.0:
        amplify_mask_attention(model, mask_attention_gain)
    return save_checkpoint(path, model, category_map=category_map, model_config=model.config)


@torch.no_grad()
def amplify_mask_attention(model: torch.nn.Module, gain: float) -> None:
    """Multiply the mask head's first-layer weights on the per-query attention maps by ``gain``.

    The mask head sees, per query, the image's projected features (shared by every query) and the query's
    attention maps, whose values are softmax outputs over heads x pixels (about 1 / (heads * h * w) each).
    With PyTorch's initialisation the attention term is thousands of times smaller than the shared one,
    so every query starts with the same mask, and from scratch the weights take far longer to grow than
    a CPU demo runs (a pre-trained detector, as in the reference, hides this). Amplifying them lets the
    query-specific signal through from the first step.
    """
    heads = model.bbox_attention.num_heads  # type: ignore[attr-defined]
    model.mask_head.lay1.weight[:, -heads:] *= gain  # type: ignore[attr-defined]


@torch.no_grad()
def calibrate_frozen_batchnorm(model: torch.nn.Module, images: Sequence[torch.Tensor]) -> int:
    """Data-dependent initialisation of a *random* backbone's frozen batch norms; returns how many.

    A ResNet built for fine-tuning has ``FrozenBatchNorm2d`` layers; with random weights they are the
    identity, so nothing normalises the activations and training from scratch is slow and unstable. One
    forward pass over ``images`` (normalised [3, H, W], same size) sets each frozen BN's running mean and
    variance to the statistics of its input *as it arrives*, earlier layers already calibrated, so every
    block starts with unit-variance activations (as a trained BN network does). The statistics are then
    frozen like any pre-trained backbone's.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    def calibrate(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(calibrate) for m in layers]
    was_training = model.training
    try:
        model.eval()
        # The torchvision modules one by one (the backbone's own forward folds the norms into the convs).
        body = model.detr.backbone[0].body  # type: ignore[attr-defined, index]
        body(torch.stack(list(images)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return len(layers)
