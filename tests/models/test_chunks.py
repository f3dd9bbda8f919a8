"""The accelerator paths, forced on the CPU: masks decoded in chunks of queries and mask losses in chunks of
masks equal the one-at-a-time CPU paths (to float rounding)."""
from __future__ import annotations

import torch

from detr_panoptic.models import criterion as criterion_module
from detr_panoptic.models import detr as detr_module
from detr_panoptic.models.criterion import sigmoid_mask_losses
from detr_panoptic.models.detr import PanopticDETR

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 7, "dropout": 0.0}


def test_masks_decoded_in_chunks_equal_one_by_one(monkeypatch):
    torch.manual_seed(0)
    model = PanopticDETR(3, **TINY).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    selection = [torch.tensor([0, 3, 6]), torch.tensor([1, 2, 4, 5])]
    with torch.no_grad():
        one_by_one = model(images, mask_queries=lambda out: selection).pred_masks
        monkeypatch.setattr(detr_module, "decode_in_chunks", lambda device: True)
        monkeypatch.setattr(detr_module, "MASK_CHUNK", 3)  # chunks that cross the images' boundary
        chunked = model(images, mask_queries=lambda out: selection).pred_masks
    assert chunked.shape == one_by_one.shape == (7, 16, 24)
    torch.testing.assert_close(chunked, one_by_one, rtol=1e-5, atol=1e-5)


def test_mask_losses_in_chunks_equal_one_mask_at_a_time(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 300, generator=g) * 3).requires_grad_()
    targets = torch.rand(7, 300, generator=g) > 0.5
    focal, dice = sigmoid_mask_losses(logits, targets)
    grad, = torch.autograd.grad(focal.sum() + 2 * dice.sum(), logits)
    monkeypatch.setattr(criterion_module, "masks_per_chunk", lambda device, num_pixels: 3)
    chunked_focal, chunked_dice = sigmoid_mask_losses(logits, targets)
    chunked_grad, = torch.autograd.grad(chunked_focal.sum() + 2 * chunked_dice.sum(), logits)
    torch.testing.assert_close(chunked_focal, focal)
    torch.testing.assert_close(chunked_dice, dice)
    torch.testing.assert_close(chunked_grad, grad)
