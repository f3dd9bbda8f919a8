"""Post-norm encoder-decoder transformer with the reference parameter layout.

Tensors are batch-first here ([B, L, D]); the parameters are laid out as ``nn.MultiheadAttention``'s
(``in_proj_weight`` [3D, D], ``in_proj_bias`` [3D], ``out_proj``) so the official weights load as-is.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadAttention(nn.Module):
    """Multi-head attention computed with ``F.scaled_dot_product_attention``.

    Weights are returned only when asked (per head, [B, heads, L_q, L_k]), through an explicit softmax.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"hidden_dim {embed_dim} is not divisible by nheads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [B, Lq, D], key/value [B, Lk, D], key_padding_mask [B, Lk] (True = ignore), attn_mask
        Bool [Lq, Lk] (True = may attend; the training-only query groups of ``Transformer``)."""
        b, lq, d = query.shape
        lk = key.shape[1]
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(b, lq, h, d // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(b, lk, h, d // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, lk, h, d // h).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            weights = logits.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            if attn_mask is not None:
                allowed = attn_mask if allowed is None else allowed & attn_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, d))
        return out, weights


def _with_position(x: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
    return x if position is None else x + position


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor | None, position: torch.Tensor | None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk = _with_position(src, position)
        attended, weights = self.self_attn(qk, qk, src, padding_mask, need_weights)
        src = self.norm1(src + self.dropout(attended))
        src = self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))
        return src, weights


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, target: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor | None,
                position: torch.Tensor | None, query_position: torch.Tensor,
                need_weights: bool = False, self_attn_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk = target + query_position
        attended, _ = self.self_attn(qk, qk, target, attn_mask=self_attn_mask)
        target = self.norm1(target + self.dropout(attended))
        attended, weights = self.multihead_attn(target + query_position, _with_position(memory, position), memory,
                                                padding_mask, need_weights)
        target = self.norm2(target + self.dropout(attended))
        target = self.norm3(target + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(target))))))
        return target, weights


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor | None, position: torch.Tensor | None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the memory and, with ``need_weights``, the last layer's self-attention."""
        weights = None
        for i, layer in enumerate(self.layers):
            src, weights = layer(src, padding_mask, position, need_weights and i == len(self.layers) - 1)
        return src, weights


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, target: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor | None,
                position: torch.Tensor | None, query_position: torch.Tensor,
                need_weights: bool = False, self_attn_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns every layer's output through the shared final norm, [L, B, Q, D], and the
        cross-attention weights per layer (empty unless ``need_weights``)."""
        outputs, weights = [], []
        for layer in self.layers:
            target, w = layer(target, memory, padding_mask, position, query_position, need_weights, self_attn_mask)
            outputs.append(self.norm(target))
            if w is not None:
                weights.append(w)
        return torch.stack(outputs), weights


class Transformer(nn.Module):
    """DETR's transformer: post-norm encoder over the flattened feature map, decoder over the queries."""

    def __init__(self, d_model: int = 256, nheads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nheads, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, nheads, dim_feedforward, dropout), num_decoder_layers, d_model)
        self.d_model = d_model
        self.nheads = nheads
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor, query_embed: torch.Tensor,
                position: torch.Tensor, need_weights: bool = False, query_groups: int = 1, *,
                query_content: torch.Tensor | None = None, self_attn_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
        """src [B, D, h, w], padding_mask [B, h, w], query_embed [Q, D] (or per image [B, Q, D]), position
        [B, D, h, w]. ``query_content`` [B, Q, D]: the decoder's input (zeros, DETR's, when None);
        ``self_attn_mask`` Bool [Q, Q] (True: may attend) replaces the query groups' mask (both are for the
        training-only queries: ``models.query_branches``).

        ``query_groups`` K > 1 (training only, Group-DETR): ``query_embed`` holds K groups of Q / K queries
        one after the other, and the decoder's self-attention stays within each group (the groups then
        never see each other; cross-attention and every weight are shared).

        Returns (decoder outputs [L, B, Q, D], memory [B, D, h, w], attentions dict: with
        ``need_weights``, ``decoder_cross`` list of [B, heads, Q, h*w] and ``encoder_self`` [B, heads, hw, hw]).
        """
        b, d, h, w = src.shape
        src_seq = src.flatten(2).transpose(1, 2)
        pos_seq = position.flatten(2).transpose(1, 2)
        mask_seq = padding_mask.flatten(1)
        query_position = query_embed.unsqueeze(0).expand(b, -1, -1) if query_embed.dim() == 2 else query_embed
        memory, encoder_weights = self.encoder(src_seq, mask_seq, pos_seq, need_weights)
        target = torch.zeros_like(query_position) if query_content is None else query_content
        if self_attn_mask is None and query_groups > 1:
            self_attn_mask = group_attention_mask(query_position.shape[1], query_groups, query_embed.device)
        outputs, decoder_weights = self.decoder(target, memory, mask_seq, pos_seq, query_position, need_weights,
                                                self_attn_mask)
        attentions: dict[str, object] = {}
        if need_weights:
            attentions = {"decoder_cross": decoder_weights, "encoder_self": encoder_weights}
        return outputs, memory.transpose(1, 2).reshape(b, d, h, w), attentions


def group_attention_mask(num_queries: int, groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [Q, Q], True where query i may attend to query j: both in the same of ``groups`` equal,
    consecutive groups (block diagonal)."""
    if groups < 1 or num_queries % groups:
        raise ValueError(f"{num_queries} queries cannot form {groups} equal groups")
    group = torch.arange(num_queries, device=device) // (num_queries // groups)
    return group[:, None] == group[None, :]
