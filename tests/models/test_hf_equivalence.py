"""Equal outputs to transformers' DetrForSegmentation with the same (random) weights, via load_pretrained."""
from __future__ import annotations

import pytest
import torch

from detr_panoptic.checkpoints import load_checkpoint
from detr_panoptic.models.weight_names import hugging_face_to_official

transformers = pytest.importorskip("transformers", reason="the equivalence test needs `pip install transformers`")


def build_hf_model(layer_type: str = "basic", depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 256, 512)):
    backbone = transformers.ResNetConfig(depths=list(depths), hidden_sizes=list(hidden_sizes), layer_type=layer_type,
                                         out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, encoder_attention_heads=8, decoder_attention_heads=8,
                                     num_queries=7, num_labels=5)
    torch.manual_seed(0)
    model = transformers.DetrForSegmentation(config).eval()
    # Matrices keep their (random) initialisation; biases, norms and frozen BN statistics are randomised
    # too so that no parameter is trivially 0 or 1.
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point() and tensor.dim() == 1:
                tensor.normal_(0, 0.1)
                if name.endswith(("norm.weight", "normalization.weight", "layer_norm.weight", "layernorm.weight")):
                    tensor.add_(1.0)
    return model


@pytest.mark.parametrize("layer_type, depths, hidden_sizes, backbone",
                         [("basic", (2, 2, 2, 2), (64, 128, 256, 512), "resnet18"),
                          ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048), "resnet50")])
def test_same_outputs_as_transformers(tmp_path, layer_type, depths, hidden_sizes, backbone):
    hf = build_hf_model(layer_type, depths, hidden_sizes)
    hf.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path)
    ours = loaded.model.eval()
    assert ours.config["backbone"] == backbone
    assert (ours.config["hidden_dim"], ours.config["nheads"], ours.config["num_queries"]) == (32, 8, 7)
    assert ours.num_classes == 5 and loaded.category_map is None

    pixels = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 40:, :] = 0
    pixel_mask[1, :, 72:] = 0
    pixels[1, :, 40:, :] = 0
    pixels[1, :, :, 72:] = 0
    with torch.no_grad():
        expected = hf(pixel_values=pixels, pixel_mask=pixel_mask)
        actual = ours(pixels, pixel_mask == 0)
    torch.testing.assert_close(actual.pred_logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=1e-4, atol=1e-4)


def test_in_memory_names_map_too():
    hf = build_hf_model()
    mapped = hugging_face_to_official(hf.state_dict())
    from detr_panoptic.models.detr import PanopticDETR

    ours = PanopticDETR(5, backbone="resnet18", hidden_dim=32, enc_layers=2, dec_layers=2, dim_feedforward=64,
                        num_queries=7)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


def test_official_to_hugging_face_round_trip():
    from detr_panoptic.models.weight_names import official_to_hugging_face

    hf = build_hf_model()
    state = hf.state_dict()
    back = official_to_hugging_face(hugging_face_to_official(state), list(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
