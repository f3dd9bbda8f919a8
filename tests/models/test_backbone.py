"""Backbone (frozen-BN ResNet, level masks) and the sine position embedding."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from detr_panoptic.models.backbone import ResNetBackbone
from detr_panoptic.models.position import PositionEmbeddingSine


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))])
def test_levels_channels_strides_and_masks(name, channels):
    backbone = ResNetBackbone(name).eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 48:] = True
    levels = backbone(images, mask)
    assert [f.shape[1] for f, _ in levels] == list(channels) == list(backbone.num_channels)
    assert [tuple(f.shape[-2:]) for f, _ in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for feature, level_mask in levels:
        assert level_mask.shape == (2, *feature.shape[-2:]) and not level_mask[0].any()
        width = feature.shape[-1]
        expected = torch.tensor([(j * 96) // width >= 48 for j in range(width)])  # nearest: sample at j * stride
        assert torch.equal(level_mask[1], expected.expand_as(level_mask[1]))


def test_batch_norm_is_frozen_with_reference_eps():
    backbone = ResNetBackbone("resnet18")
    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(n.eps == 1e-5 for n in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    names = {n for n, _ in backbone.named_parameters()}
    assert not any(".bn" in n or "downsample.1" in n for n in names)  # BN statistics/affine are buffers


def test_position_embedding_layout_and_values():
    embed = PositionEmbeddingSine(8)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    pos = embed(mask)
    assert pos.shape == (1, 16, 3, 5)
    # y features first: constant along x; x features second: constant along y
    assert torch.allclose(pos[0, :8], pos[0, :8, :, :1].expand(-1, -1, 5))
    assert torch.allclose(pos[0, 8:], pos[0, 8:, :1, :].expand(-1, 3, -1))
    y_first = 1 / (3 + 1e-6) * 2 * math.pi  # normalised coordinate of the first row
    expected = [math.sin(y_first), math.cos(y_first), math.sin(y_first / 10000 ** (2 / 8)),
                math.cos(y_first / 10000 ** (2 / 8))]
    torch.testing.assert_close(pos[0, :4, 0, 0], torch.tensor(expected))


def test_position_embedding_ignores_padding():
    embed = PositionEmbeddingSine(16)
    alone = embed(torch.zeros(1, 4, 6, dtype=torch.bool))
    mask = torch.ones(1, 7, 9, dtype=torch.bool)
    mask[0, :4, :6] = False
    padded = embed(mask)
    torch.testing.assert_close(padded[..., :4, :6], alone)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_batch_norm_equals_running_the_modules(name):
    backbone = ResNetBackbone(name).eval()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        images = torch.randn(1, 3, 32, 32)
        expected = list(backbone.body(images).values())  # torchvision's own module-by-module forward
        for ours, reference in zip(backbone.features(images), expected):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_thawed_batch_norms_train_and_freeze_back_to_the_same_function():
    from detr_panoptic.models.backbone import freeze_batch_norms, thaw_batch_norms

    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18").eval()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        frozen_out = backbone.features(images)
    keys = set(backbone.state_dict())
    assert thaw_batch_norms(backbone) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert {k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")} == keys
    with torch.no_grad():  # eval mode: running statistics, the same function as the frozen norms
        for ours, reference in zip(backbone.features(images), frozen_out):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    backbone.train()
    backbone.features(images)[-1].sum().backward()  # batch statistics; the affine parameters get gradients
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.weight.grad is not None for m in norms)
    assert int(norms[0].num_batches_tracked) == 1
    trained_stats = norms[0].running_mean.clone()
    assert freeze_batch_norms(backbone) == 20
    assert set(backbone.state_dict()) == keys
    assert torch.equal(backbone.body.bn1.running_mean, trained_stats)
