"""The Hugging Face folder: DetrForSegmentation loads it and gives our outputs; load_checkpoint reads it back
bit-exactly (weights, categories, input size, post-processing settings)."""
from __future__ import annotations

import json

import pytest
import torch

from detr_panoptic.checkpoints import load_checkpoint
from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.export.hugging_face import export_hugging_face, official_to_hugging_face_state
from detr_panoptic.utils.errors import UserInputError
from tests.conftest import SHARED
from tests.export.models import r50_model, small_category_map, small_model

transformers = pytest.importorskip("transformers", reason="the equivalence test needs `pip install transformers`")
OFFICIAL_SCHEMA = SHARED / "reference" / "detr_r50_panoptic_state_dict.tsv"


@pytest.fixture(scope="module")
def r50():
    return r50_model()


@pytest.fixture(scope="module")
def r50_aux():
    return r50_model(aux_loss=True)


def _images():
    pixels = torch.randn(2, 3, 64, 96)
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, 40:, :] = True
    padding[1, :, 72:] = True
    pixels[padding[:, None].expand_as(pixels)] = 0
    return pixels, padding


def _export_and_load_in_transformers(model, category_map, folder):
    export_hugging_face(model, folder, category_map=category_map, input_size=(640, 1066),
                        postprocess={"threshold": 0.7, "merge_stuff": "merge", "min_area": 9})
    hf, info = transformers.DetrForSegmentation.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.mark.parametrize("aux_loss", [False, True], ids=["aux_off", "aux_on"])
@pytest.mark.parametrize("which", ["small", pytest.param("r50", marks=pytest.mark.slow)])  # R50: 1-3 min on 2 busy cores
def test_transformers_gives_our_outputs(tmp_path, which, aux_loss, request):
    """Every model we train has aux loss on: its export must give our outputs too (transformers 5.x would
    layer-normalise the decoder's state between layers if config.json said ``auxiliary_loss: true``)."""
    if which == "small":
        model = small_model(aux_loss=aux_loss)
    else:
        model = request.getfixturevalue("r50_aux" if aux_loss else "r50")
    assert model.aux_loss is aux_loss
    category_map = small_category_map() if which == "small" else coco_category_map(250)
    hf = _export_and_load_in_transformers(model, category_map, tmp_path)
    assert hf.config.num_labels == model.num_classes
    assert hf.config.id2label[2] == category_map.category_of_class(2).name
    pixels, padding = _images()
    with torch.no_grad():
        expected = model(pixels, padding)
        actual = hf(pixel_values=pixels, pixel_mask=(~padding).long())
    torch.testing.assert_close(actual.logits, expected.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-4)
    # This model's mask logits reach about +-140 (median |x| 29): the two implementations sum in other orders,
    # and float32 rounding then leaves a few 1e-4 near zero, so the absolute tolerance scales with the largest
    # logit (a wrong weight mapping differs by units or tens)
    scale = float(expected.pred_masks.abs().max())
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=1e-4, atol=max(1e-4, 1e-5 * scale))


def test_r50_is_the_official_layout(r50):
    if not OFFICIAL_SCHEMA.is_file():
        pytest.skip(f"{OFFICIAL_SCHEMA} is not there")
    rows = [line.split("\t") for line in OFFICIAL_SCHEMA.read_text().splitlines() if line.strip()]
    official = {name: tuple(json.loads(shape.replace("(", "[").replace(",)", ")").replace(")", "]")))
                for name, shape, _ in rows}
    assert {k: tuple(v.shape) for k, v in r50.state_dict().items()} == official


@pytest.mark.parametrize("which", ["small", "r50"])
def test_round_trip_is_bit_exact(tmp_path, which, request):
    model = small_model() if which == "small" else request.getfixturevalue("r50")
    category_map = small_category_map() if which == "small" else coco_category_map(250)
    export_hugging_face(model, tmp_path, category_map=category_map, input_size=(640, 1066),
                        postprocess={"threshold": 0.7, "merge_stuff": "merge", "min_area": 9})
    loaded = load_checkpoint(tmp_path)
    assert loaded.model.config == model.config
    expected, actual = model.state_dict(), loaded.model.state_dict()
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    assert loaded.category_map == category_map
    assert loaded.input_size == (640, 1066)
    assert loaded.postprocess == {"threshold": 0.7, "merge_stuff": "merge", "min_area": 9}


def test_config_and_image_processor_files(tmp_path):
    model = small_model()
    export_hugging_face(model, tmp_path, category_map=small_category_map(), input_size=(512, 900))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_pretrained_backbone"] is False and config["backbone_config"]["layer_type"] == "basic"
    assert config["label2id"] == {"car": 0, "road": 1, "person": 2, "sky": 3, "building": 4}
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size["shortest_edge"] == 512 and processor.size["longest_edge"] == 900
    out = processor(images=torch.zeros(3, 100, 200, dtype=torch.uint8), return_tensors="pt")
    assert tuple(out["pixel_values"].shape[-2:]) == (450, 900)


def test_unused_class_indices_are_not_available_labels(tmp_path, r50):
    config = transformers.DetrConfig.from_pretrained(
        export_hugging_face(r50, tmp_path, category_map=coco_category_map(250)))
    assert config.id2label[1] == "person" and config.id2label[0] == "N/A"
    assert len(config.id2label) == 250 and "N/A" not in config.label2id


def test_hf_names_are_split_qkv_and_map_back():
    model = small_model()
    state = official_to_hugging_face_state(model.state_dict())
    assert "detr.model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert not any("in_proj" in k for k in state)
    assert len(state) == len(model.state_dict()) + 2 * 2 * (2 + 2 + 2)  # 6 fused attentions: +2 tensors each


def test_dc5_is_refused(tmp_path):
    from detr_panoptic.models.detr import PanopticDETR

    model = PanopticDETR(3, backbone="resnet50", dilation=True, hidden_dim=32, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=4)
    with pytest.raises(UserInputError, match="dilation"):
        export_hugging_face(model, tmp_path)


def test_aux_loss_is_off_for_transformers_and_kept_for_us(tmp_path):
    model = small_model(aux_loss=True)
    export_hugging_face(model, tmp_path, category_map=small_category_map())
    assert json.loads((tmp_path / "config.json").read_text())["auxiliary_loss"] is False
    assert load_checkpoint(tmp_path).model.aux_loss is True


@pytest.mark.parametrize("hidden_dim, nheads", [(64, 4), (48, 8)])
def test_a_mask_head_transformers_cannot_build_is_refused(tmp_path, hidden_dim, nheads):
    """transformers cannot build these mask heads: 64 + 4 heads gives a 68-channel input (not a multiple of 8);
    48 gives a 12-channel width (8 groups in transformers, 4 in ours)."""
    from detr_panoptic.models.detr import PanopticDETR

    model = PanopticDETR(3, backbone="resnet18", hidden_dim=hidden_dim, nheads=nheads, enc_layers=1,
                         dec_layers=1, dim_feedforward=32, num_queries=4)
    with pytest.raises(UserInputError, match="mask head"):
        export_hugging_face(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_transformers_gives_our_outputs_for_a_trained_aux_loss_model(tmp_path):
    """The demo's packaged start point: trained (38,000 steps) with aux loss on, the demo's architecture
    (ResNet-18, hidden 128, 8 heads, 2+2 layers, 30 queries), on two generated street scenes of the kind it
    was trained on (one smaller, padded)."""
    import importlib.resources

    from detr_panoptic.data.synthetic import synthetic_sample
    from detr_panoptic.export.hugging_face import IMAGENET_MEAN, IMAGENET_STD
    from detr_panoptic.utils.batching import pad_images

    source = importlib.resources.files("detr_panoptic.resources") / "demo_start_point.safetensors"
    pretrained = load_checkpoint(str(source))
    model = pretrained.model.eval()
    assert model.aux_loss is True
    hf = _export_and_load_in_transformers(model, pretrained.category_map, tmp_path)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images = [(torch.from_numpy(synthetic_sample(seed, h, w)[0]).permute(2, 0, 1) / 255 - mean) / std
              for seed, h, w in [(1, 128, 256), (2, 96, 192)]]
    pixels, padding = pad_images(images)
    with torch.no_grad():
        expected = model(pixels, padding)
        actual = hf(pixel_values=pixels, pixel_mask=(~padding).long())
    torch.testing.assert_close(actual.logits, expected.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-4)
    # This model's mask logits reach about +-140 (median |x| 29): the two implementations sum in other orders,
    # and float32 rounding then leaves a few 1e-4 near zero, so the absolute tolerance scales with the largest
    # logit (a wrong weight mapping differs by units or tens)
    scale = float(expected.pred_masks.abs().max())
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=1e-4, atol=max(1e-4, 1e-5 * scale))
