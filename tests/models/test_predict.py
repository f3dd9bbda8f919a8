"""PanopticDETR.predict (masks for kept queries only) == full forward + panoptic_postprocess."""
from __future__ import annotations

import pytest
import torch

from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.models.detr import PanopticDETR, image_sizes
from detr_panoptic.models.postprocess import kept_queries, panoptic_postprocess
from detr_panoptic.utils.batching import pad_images

NUM_CLASSES = 5
IS_THING = torch.tensor([True, False, True, False, False])


def steer_class_head(model: PanopticDETR, images: list[torch.Tensor]) -> None:
    """Fit the class head (least squares on the decoder output) so that the queries predict a mix of
    classes with confidences from ~0.5 to ~0.999, including several queries of one stuff class."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        batch, mask = pad_images(images)
        hs = model._trunk(batch, mask)["hs"][-1]  # [B, Q, D]
        b, q, d = hs.shape
        labels = torch.randint(0, NUM_CLASSES + 1, (b, q), generator=generator)
        labels[0, :3] = 1  # three queries of stuff class 1 in image 0
        margins = torch.rand(b, q, generator=generator) * 7 + 1
        target = torch.zeros(b, q, NUM_CLASSES + 1)
        target.scatter_(2, labels[..., None], margins[..., None])
        features = torch.cat([hs.reshape(-1, d), torch.ones(b * q, 1)], 1)
        solution = torch.linalg.lstsq(features.double(), target.reshape(-1, NUM_CLASSES + 1).double()).solution
        model.detr.class_embed.weight.copy_(solution[:d].T.float())
        model.detr.class_embed.bias.copy_(solution[d].float())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PanopticDETR(NUM_CLASSES, backbone="resnet18", hidden_dim=32, enc_layers=2, dec_layers=2,
                         dim_feedforward=64, num_queries=12).eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 50, 78)]
    steer_class_head(model, images)
    with torch.no_grad():
        full = model(images)
    return model, images, full


def assert_same_results(expected, actual):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.segments_info == a.segments_info
        assert torch.equal(e.id_map, a.id_map)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.85, 0.95, 1.0])
def test_predict_equals_forward_and_postprocess(setup, threshold):
    model, images, full = setup
    sizes = [tuple(i.shape[-2:]) for i in images]
    expected = panoptic_postprocess(full, sizes, is_thing=IS_THING, threshold=threshold)
    actual = model.predict(images, threshold=threshold, is_thing=IS_THING)
    assert_same_results(expected, actual)
    kept = kept_queries(full.pred_logits, threshold).sum().item()
    assert sum(len(r.segments_info) for r in actual) <= kept
    if threshold == 1.0:  # nothing can pass: no segments, all void
        assert kept == 0
        assert all(r.segments_info == [] and not r.id_map.any() for r in actual)
    if threshold == 0.5:  # the steered head makes this case non-trivial
        assert kept >= 10 and sum(len(r.segments_info) for r in actual) >= 4


def test_predict_with_target_sizes_padded_batch_and_categories(setup):
    model, images, full = setup
    batch, mask = pad_images(images)
    targets = [(100, 150), (40, 60)]
    to_category = torch.tensor([11, 12, 13, 14, 15])
    expected = panoptic_postprocess(full, image_sizes(mask), targets, is_thing=IS_THING, threshold=0.5,
                                    class_to_category=to_category)
    actual = model.predict(batch, mask, threshold=0.5, is_thing=IS_THING, target_sizes=targets,
                           class_to_category=to_category)
    assert_same_results(expected, actual)
    assert actual[0].id_map.shape == (100, 150)
    assert {s["category_id"] for r in actual for s in r.segments_info} <= {11, 12, 13, 14, 15}


def test_predict_uses_the_category_tensors_given():
    model = PanopticDETR(250, backbone="resnet18", hidden_dim=32, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=4).eval()
    categories = coco_category_map()
    with torch.no_grad():
        model.detr.class_embed.weight.zero_()
        model.detr.class_embed.bias.zero_()
        model.detr.class_embed.bias[1] = 20.0  # COCO id 1, "person": a thing
    results = model.predict([torch.randn(3, 64, 64)], threshold=0.5, is_thing=categories.is_thing(),
                            class_to_category=categories.class_to_category_tensor())
    assert results[0].segments_info and all(s["category_id"] == 1 and s["isthing"] for s in results[0].segments_info)


def test_predict_runs_under_inference_mode(setup):
    model, images, _ = setup
    result = model.predict(images, threshold=0.5, is_thing=IS_THING)
    assert result[0].id_map.is_inference()
