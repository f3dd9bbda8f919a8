"""Transformer: our attention equals nn.MultiheadAttention with the same parameters; layer semantics."""
from __future__ import annotations

import torch
from torch import nn

from detr_panoptic.models.transformer import MultiheadAttention, Transformer


def reference_attention(ours: MultiheadAttention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(ours.embed_dim, ours.num_heads).eval()
    mha.load_state_dict(ours.state_dict())
    return mha


def test_state_dict_layout_is_nn_multihead_attention():
    ours = MultiheadAttention(16, 4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in nn.MultiheadAttention(16, 4).state_dict().items()}


def test_attention_equals_nn_multihead_attention_both_paths():
    ours = MultiheadAttention(16, 4).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    mha = reference_attention(ours)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    expected, expected_weights = mha(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                     key_padding_mask=padding, average_attn_weights=False)
    fast, none = ours(q, k, v, padding)
    slow, weights = ours(q, k, v, padding, need_weights=True)
    assert none is None
    torch.testing.assert_close(fast, expected.transpose(0, 1))
    torch.testing.assert_close(slow, expected.transpose(0, 1))
    torch.testing.assert_close(weights, expected_weights)
    assert (weights[1, :, :, 4:] == 0).all()


def test_transformer_shapes_shared_decoder_norm_and_padding_invariance():
    torch.manual_seed(0)
    transformer = Transformer(16, 4, 2, 3, 32, dropout=0.0).eval()
    src, pos = torch.randn(1, 16, 3, 4), torch.randn(1, 16, 3, 4)
    queries = torch.randn(5, 16)
    hs, memory, attn = transformer(src, torch.zeros(1, 3, 4, dtype=torch.bool), queries, pos)
    assert hs.shape == (3, 1, 5, 16) and memory.shape == (1, 16, 3, 4) and attn == {}
    # every decoder output went through the shared final LayerNorm
    torch.testing.assert_close(hs.mean(-1), torch.zeros(3, 1, 5), atol=1e-5, rtol=0)
    # extra padded columns (masked) leave the valid outputs unchanged
    src_padded = torch.cat([src, torch.randn(1, 16, 3, 2)], dim=3)
    pos_padded = torch.cat([pos, torch.randn(1, 16, 3, 2)], dim=3)
    mask = torch.zeros(1, 3, 6, dtype=torch.bool)
    mask[..., 4:] = True
    hs_padded, memory_padded, _ = transformer(src_padded, mask, queries, pos_padded)
    torch.testing.assert_close(hs_padded, hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory_padded[..., :4], memory, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    transformer = Transformer(16, 4, 1, 1, 32, dropout=0.5)
    args = (torch.randn(1, 16, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), torch.randn(3, 16),
            torch.randn(1, 16, 2, 2))
    transformer.eval()
    torch.testing.assert_close(transformer(*args)[0], transformer(*args)[0])
    transformer.train()
    assert not torch.equal(transformer(*args)[0], transformer(*args)[0])
