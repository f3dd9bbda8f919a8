"""Freeze policies on a stand-in module that uses the official DETR parameter names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_panoptic.engine.freezing import apply_freeze, parameter_part


class _Layer(nn.Module):
    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(8, 2)
        if cross:
            self.multihead_attn = nn.MultiheadAttention(8, 2)
        self.linear1 = nn.Linear(8, 8)
        self.norm1 = nn.LayerNorm(8)


class _Stack(nn.Module):
    def __init__(self, n: int, cross: bool, norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cross) for _ in range(n))
        if norm:
            self.norm = nn.LayerNorm(8)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Stack(2, cross=False, norm=False)
        self.decoder = _Stack(2, cross=True, norm=True)


class _Detr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))
        self.input_proj = nn.Conv2d(4, 8, 1)
        self.query_embed = nn.Embedding(5, 8)
        self.transformer = _Transformer()
        self.class_embed = nn.Linear(8, 3)
        self.bbox_embed = nn.Linear(8, 4)


class StandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detr = _Detr()
        self.bbox_attention = nn.Linear(8, 8)
        self.mask_head = nn.Conv2d(8, 1, 3)


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_parts_are_recognised_with_and_without_prefixes():
    assert parameter_part("detr.backbone.0.body.conv1.weight") == "backbone"
    assert parameter_part("module.detr.transformer.decoder.norm.weight") == "decoder"
    assert parameter_part("transformer.encoder.layers.3.linear1.weight") == "encoder"
    assert parameter_part("mask_head.lay1.weight") == "mask_head"
    assert parameter_part("bbox_attention.q_linear.weight") == "bbox_attention"


def test_default_freezes_only_the_backbone():
    model = StandIn()
    report = apply_freeze(model)
    assert not any(n.startswith("detr.backbone") for n in _trainable(model))
    assert report.parts["backbone"][0] == 0
    assert report.parts["encoder"][0] == report.parts["encoder"][1] > 0
    assert report.total == sum(p.numel() for p in model.parameters())


def test_transformer_policy_leaves_only_heads_and_bbox_attention():
    model = StandIn()
    apply_freeze(model, backbone=True, transformer=True)
    parts = {parameter_part(n) for n in _trainable(model)}
    assert parts == {"class_embed", "bbox_embed", "bbox_attention", "mask_head"}


def test_attention_policy_freezes_every_transformer_attention_layer():
    model = StandIn()
    apply_freeze(model, attention=True)
    trainable = _trainable(model)
    assert not any("self_attn" in n or "multihead_attn" in n for n in trainable)
    assert "detr.transformer.encoder.layers.0.linear1.weight" in trainable
    assert "detr.transformer.decoder.norm.weight" in trainable
    assert "bbox_attention.weight" in trainable and "detr.query_embed.weight" in trainable


def test_first_layers_and_composition():
    model = StandIn()
    report = apply_freeze(model, backbone=False, first_layers=1, attention=True)
    trainable = _trainable(model)
    assert "detr.backbone.0.weight" in trainable
    assert not any(".layers.0." in n for n in trainable)
    assert "detr.transformer.decoder.layers.1.linear1.weight" in trainable
    assert "detr.transformer.decoder.layers.1.self_attn.in_proj_weight" not in trainable
    assert 0 < report.parts["decoder"][0] < report.parts["decoder"][1]
    assert "partly frozen" in report.format()


def test_reapplying_unfreezes_what_the_new_policy_leaves_trainable():
    model = StandIn()
    apply_freeze(model, transformer=True)
    apply_freeze(model, transformer=False, attention=True)
    assert "detr.transformer.encoder.layers.1.linear1.weight" in _trainable(model)


def test_frozen_prefix_builds_no_graph():
    model = StandIn()
    apply_freeze(model, backbone=True)
    features = model.detr.backbone(torch.randn(1, 3, 8, 8))
    assert features.grad_fn is None
    assert model.detr.input_proj(features).requires_grad


def test_negative_first_layers_rejected():
    with pytest.raises(ValueError, match="first_layers"):
        apply_freeze(StandIn(), first_layers=-1)


def _tiny_detr():
    from detr_panoptic.models.detr import PanopticDETR

    return PanopticDETR(3, backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2,
                        dim_feedforward=64, num_queries=5)


def test_policies_on_panoptic_detr_and_no_graph_through_frozen_parts():
    model = _tiny_detr()
    report = apply_freeze(model, backbone=True, transformer=True)
    assert set(report.parts) >= {"backbone", "encoder", "decoder", "class_embed", "mask_head", "bbox_attention"}
    trainable_parts = {p for p, (t, _) in report.parts.items() if t}
    assert trainable_parts == {"class_embed", "bbox_embed", "bbox_attention", "mask_head"}
    seen = {}

    def keep(name, pick):
        def hook(module, inputs, output):
            seen[name] = pick(output)  # returns None: the output is left alone
        return hook

    model.detr.backbone.register_forward_hook(keep("backbone", lambda o: o[0][-1][0]))
    model.detr.transformer.register_forward_hook(keep("transformer", lambda o: o[0]))
    out = model(torch.randn(1, 3, 64, 64))
    assert not seen["backbone"].requires_grad and not seen["transformer"].requires_grad
    assert out.pred_logits.requires_grad and out.pred_masks.requires_grad

    report = apply_freeze(model, attention=True, first_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "detr.transformer.decoder.layers.1.multihead_attn.in_proj_weight" in frozen
    assert "detr.transformer.encoder.layers.0.linear1.weight" in frozen
    assert "detr.transformer.encoder.layers.1.linear1.weight" not in frozen
    assert "bbox_attention.q_linear.weight" not in frozen


def test_a_training_backbone_keeps_its_stem_frozen_as_the_reference_does():
    from detr_panoptic.engine.training import build_model
    from tests.engine.toys import TOY_CATEGORIES, tiny_config

    model = build_model(tiny_config("unused").model, TOY_CATEGORIES)
    apply_freeze(model, backbone=False)
    trainable = _trainable(model)
    backbone = {n for n, _ in model.named_parameters() if n.startswith("detr.backbone")}
    stem = {n for n in backbone if any(f".body.{s}." in n for s in ("conv1", "bn1", "layer1"))}
    assert stem and not stem & trainable
    assert backbone - stem <= trainable and any(".layer2." in n for n in trainable)
    apply_freeze(model, backbone=False, backbone_stem=False)
    assert backbone <= _trainable(model)
