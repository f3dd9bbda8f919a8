"""Channels-last for the conv parts (``PanopticDETR.set_channels_last``): the memory format changes,
the outputs do not (to float32 rounding)."""
from __future__ import annotations

import pytest
import torch

from detr_panoptic.models.detr import PanopticDETR

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 6, "dropout": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (tests/conftest.py): the machine is shared."""


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = PanopticDETR(5, **TINY).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 40, 64)]
    return model, images


def _forward(model, images, backbone: bool, mask_head: bool):
    model.set_channels_last(backbone=backbone, mask_head=mask_head)
    with torch.no_grad():
        out = model(images)
    return out.pred_logits, out.pred_boxes, out.pred_masks


@pytest.mark.parametrize("backbone, mask_head", [(False, False), (True, False), (False, True)])
def test_outputs_equal_whatever_the_memory_format(model_and_images, backbone, mask_head):
    model, images = model_and_images
    reference = _forward(model, images, True, True)  # the default
    other = _forward(model, images, backbone, mask_head)
    for a, b in zip(reference, other):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    model.set_channels_last()


def test_the_flag_sets_the_memory_format(model_and_images):
    model, images = model_and_images
    batch, _ = model._batch(images, None)
    backbone = model.detr.backbone[0]
    for flag in (True, False):
        model.set_channels_last(backbone=flag)
        with torch.no_grad():
            feature = backbone.features(batch)[0]
        assert feature.is_contiguous(memory_format=torch.channels_last) == flag
    model.set_channels_last()
    seen = []
    handle = model.mask_head.gn2.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        for flag in (True, False):
            model.set_channels_last(mask_head=flag)
            with torch.no_grad():
                model(images)
            assert seen and set(seen) == {flag}
            seen.clear()
    finally:
        handle.remove()
        model.set_channels_last()


def test_training_gradients_agree(model_and_images):
    model, images = model_and_images
    model.set_channels_last(backbone=False, mask_head=False)
    grads = []
    for backbone, mask_head in ((False, False), (True, True)):
        model.set_channels_last(backbone=backbone, mask_head=mask_head)
        model.zero_grad()
        out = model(images)
        (out.pred_masks.square().mean() + out.pred_logits.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6, msg=name)
    model.set_channels_last()
