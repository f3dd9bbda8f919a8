"""PanopticDETR: the official state-dict schema, output shapes, packed masks, aux outputs, attention."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.utils.batching import pad_images

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
TSV = SHARED / "reference" / "detr_r50_panoptic_state_dict.tsv"
TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 8, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 64,
            "num_queries": 10}


def official_schema() -> dict[str, tuple[int, ...]]:
    if not TSV.is_file():
        pytest.skip(f"reference schema not found at {TSV}")
    rows = [line.split("\t") for line in TSV.read_text().splitlines() if line.strip()]
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape, _ in rows}


def test_r50_state_dict_matches_official_schema_and_loads_strict():
    schema = official_schema()
    model = PanopticDETR(250)
    state = model.state_dict()
    assert set(state) == set(schema)
    assert {k: tuple(v.shape) for k, v in state.items()} == schema
    random_state = {k: torch.randn(shape) for k, shape in schema.items()}
    model.load_state_dict(random_state, strict=True)
    key = "mask_head.lay3.weight"
    assert torch.equal(model.state_dict()[key], random_state[key])


@pytest.fixture
def tiny_model() -> PanopticDETR:
    return PanopticDETR(5, **TINY).eval()


def test_list_input_of_different_sizes_gives_documented_shapes(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    out = tiny_model(images)
    assert isinstance(out, DETROutput)
    assert out.pred_logits.shape == (2, 10, 6)
    assert out.pred_boxes.shape == (2, 10, 4)
    assert out.pred_masks.shape == (2, 10, 16, 24)
    assert out.mask_queries is None and out.aux_outputs == [] and out.attentions is None
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()


def test_list_input_equals_padded_batch_with_mask(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    batch, mask = pad_images(images)
    a, b = tiny_model(images), tiny_model(batch, mask)
    torch.testing.assert_close(a.pred_logits, b.pred_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=0)


def test_mask_queries_computes_packed_masks_equal_to_full(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    full = tiny_model(images)
    seen = []

    def pick(partial: DETROutput) -> list[torch.Tensor]:
        seen.append(partial)
        assert partial.pred_masks is None
        return [torch.tensor([7, 2]), torch.tensor([], dtype=torch.long)]

    packed = tiny_model(images, mask_queries=pick)
    assert len(seen) == 1
    assert packed.pred_masks.shape == (2, 16, 24)
    assert [q.tolist() for q in packed.mask_queries] == [[7, 2], []]
    torch.testing.assert_close(packed.pred_masks, full.pred_masks[0, [7, 2]], rtol=1e-5, atol=1e-5)


def test_mask_queries_gradients_reach_the_mask_head():
    model = PanopticDETR(5, **TINY).train()
    out = model([torch.randn(3, 64, 96)], mask_queries=lambda o: [torch.tensor([1, 3])])
    out.pred_masks.sum().backward()
    assert model.mask_head.lay5.weight.grad is not None and model.mask_head.lay5.weight.grad.abs().sum() > 0
    assert model.bbox_attention.q_linear.weight.grad is not None


def test_aux_outputs_for_all_but_last_decoder_layer():
    model = PanopticDETR(5, **dict(TINY, dec_layers=3), aux_loss=True).eval()
    out = model([torch.randn(3, 64, 96)])
    assert len(out.aux_outputs) == 2
    assert all(a.pred_logits.shape == (1, 10, 6) and a.pred_boxes.shape == (1, 10, 4) for a in out.aux_outputs)
    assert not torch.equal(out.aux_outputs[-1].pred_logits, out.pred_logits)


def test_return_attention_shapes_and_normalisation(tiny_model):
    out = tiny_model([torch.randn(3, 64, 96)], return_attention=True)
    h, w = out.attentions["feature_size"]
    assert (h, w) == (2, 3)
    cross = out.attentions["decoder_cross"]
    assert len(cross) == 2 and cross[0].shape == (1, 8, 10, h * w)
    torch.testing.assert_close(cross[0].sum(-1), torch.ones(1, 8, 10))
    assert out.attentions["encoder_self"].shape == (1, 8, h * w, h * w)


def test_attention_weights_path_gives_same_predictions(tiny_model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    a = tiny_model(images)
    b = tiny_model(images, return_attention=True)
    torch.testing.assert_close(a.pred_logits, b.pred_logits, rtol=1e-5, atol=1e-5)


def test_parts_are_exposed_under_official_names(tiny_model):
    detr = tiny_model.detr
    for part in (detr.backbone, detr.class_embed, detr.bbox_embed, detr.query_embed, detr.input_proj,
                 tiny_model.bbox_attention, tiny_model.mask_head,
                 detr.transformer.encoder.layers[0].self_attn, detr.transformer.decoder.layers[1].multihead_attn):
        assert isinstance(part, torch.nn.Module)


def test_small_widths_and_bad_config():
    model = PanopticDETR(3, **dict(TINY, hidden_dim=16, nheads=4))
    assert model.mask_head.lay5.out_channels == 1
    assert model.mask_head.gn1.num_groups == 4  # gcd(8, 16 + 4)
    with pytest.raises(ValueError):
        PanopticDETR(3, **dict(TINY, hidden_dim=24, nheads=5))


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18"])
def test_dilation_keeps_layer4_at_stride_16(backbone):
    model = PanopticDETR(3, **dict(TINY, backbone=backbone), dilation=True).eval()
    out = model([torch.randn(3, 64, 96)], return_attention=True)
    assert out.attentions["feature_size"] == (4, 6)
    assert out.pred_masks.shape == (1, 10, 16, 24)
    plain = PanopticDETR(3, **dict(TINY, backbone=backbone))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_dilated_basic_blocks_follow_torchvisions_scheme():
    """resnet18 DC5: layer4's first block without stride, the second dilated; our folded-norm forward equals
    the modules' own forward (torchvision's BasicBlock.forward on the changed convolutions)."""
    from detr_panoptic.models.backbone import ResNetBackbone

    backbone = ResNetBackbone("resnet18", dilation=True).eval()
    layer4 = backbone.body.layer4
    assert layer4[0].conv1.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert layer4[0].conv2.dilation == (1, 1)
    assert layer4[1].conv1.dilation == layer4[1].conv2.dilation == (2, 2)
    images = torch.randn(2, 3, 64, 96)
    features = backbone.features(images)
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (4, 6)]
    expected = backbone.body(images)["3"]
    torch.testing.assert_close(features[3], expected, rtol=1e-4, atol=1e-4)
