"""bbox attention (joint softmax over heads and pixels) and the FPN mask head."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from detr_panoptic.models.mask_head import MaskHeadSmallConv, MHAttentionMap, group_count


def test_attention_map_softmax_is_joint_over_heads_and_pixels_and_skips_padding():
    attention = MHAttentionMap(16, 16, 4)
    queries, memory = torch.randn(5, 16), torch.randn(2, 16, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    image_index = torch.tensor([0, 0, 1, 1, 1])
    weights = attention(queries, memory, mask, image_index)
    assert weights.shape == (5, 4, 3, 4)
    torch.testing.assert_close(weights.sum(dim=(1, 2, 3)), torch.ones(5))
    assert not torch.allclose(weights.sum(dim=(2, 3)), torch.full((5, 4), 0.25))  # not per head
    assert (weights[2:, :, :, 3:] == 0).all()
    # same numbers as the reference formulation: per-head dot products scaled by (D/heads)^-0.5
    q = attention.q_linear(queries[0]).view(4, 4)
    k = F.conv2d(memory[:1], attention.k_linear.weight[..., None, None], attention.k_linear.bias).view(4, 4, 12)
    logits = torch.einsum("nc,nchw->nhw", q, k.view(4, 4, 3, 4)) * 0.5
    torch.testing.assert_close(weights[0], logits.flatten().softmax(0).view(4, 3, 4))


def reference_mask_head(head: MaskHeadSmallConv, projected, attention, fpns):
    """The reference computation: expand the feature map per query, concatenate, convolve."""
    n = attention.shape[0]
    x = torch.cat([projected.expand(n, -1, -1, -1), attention], 1)
    x = F.relu(head.gn1(head.lay1(x)))
    x = F.relu(head.gn2(head.lay2(x)))
    for i, fpn in enumerate(fpns, start=1):
        lateral = getattr(head, f"adapter{i}")(fpn).expand(n, -1, -1, -1)
        x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
        x = F.relu(getattr(head, f"gn{i + 2}")(getattr(head, f"lay{i + 2}")(x)))
    return head.out_lay(x)[:, 0]


def test_mask_head_equals_reference_formulation_and_widths():
    head = MaskHeadSmallConv(32, 8, [256, 128, 64])
    assert [getattr(head, f"lay{i}").out_channels for i in range(1, 6)] == [40, 16, 8, 4, 2]
    assert [getattr(head, f"gn{i}").num_groups for i in range(1, 6)] == [8, 8, 8, 4, 2]
    projected = torch.randn(1, 32, 2, 3)
    fpns = [torch.randn(1, 256, 4, 6), torch.randn(1, 128, 8, 12), torch.randn(1, 64, 16, 24)]
    attention = torch.rand(3, 8, 2, 3)
    out = head(projected, attention, fpns, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 16, 24)
    torch.testing.assert_close(out, reference_mask_head(head, projected, attention, fpns), rtol=1e-4, atol=1e-5)


def test_group_count():
    assert group_count(264) == 8 and group_count(16) == 8 and group_count(20) == 4 and group_count(2) == 2
