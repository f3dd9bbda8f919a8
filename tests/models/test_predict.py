"""Masks for the kept queries only (``model(images, mask_queries=processor.kept_queries)``) + the
``PanopticPostProcessor`` == full forward + ``panoptic_postprocess``; settings re-run on cached outputs."""
from __future__ import annotations

import pytest
import torch

from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.models.detr import PanopticDETR, image_sizes
from detr_panoptic.models.postprocess import (
    PanopticPostProcessor,
    PostprocessSettings,
    kept_queries,
    panoptic_postprocess,
)
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


def kept_forward(model, images, processor, mask=None):
    """The model's forward with masks for the processor's kept queries only (what the predictor runs)."""
    with torch.inference_mode():
        return model(images, mask, mask_queries=processor.kept_queries)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.85, 0.95, 1.0])
def test_kept_query_masks_equal_forward_and_postprocess(setup, threshold):
    model, images, full = setup
    sizes = [tuple(i.shape[-2:]) for i in images]
    expected = panoptic_postprocess(full, sizes, is_thing=IS_THING, threshold=threshold)
    processor = PanopticPostProcessor(IS_THING, settings=PostprocessSettings(threshold=threshold))
    actual = processor(kept_forward(model, images, processor))
    assert_same_results(expected, actual)
    kept = kept_queries(full.pred_logits, threshold).sum().item()
    assert sum(len(r.segments_info) for r in actual) <= kept
    if threshold == 1.0:  # nothing can pass: no segments, all void
        assert kept == 0
        assert all(r.segments_info == [] and not r.id_map.any() for r in actual)
    if threshold == 0.5:  # the steered head makes this case non-trivial
        assert kept >= 10 and sum(len(r.segments_info) for r in actual) >= 4


def test_kept_query_masks_with_target_sizes_padded_batch_and_categories(setup):
    model, images, full = setup
    batch, mask = pad_images(images)
    targets = [(100, 150), (40, 60)]
    to_category = torch.tensor([11, 12, 13, 14, 15])
    expected = panoptic_postprocess(full, image_sizes(mask), targets, is_thing=IS_THING, threshold=0.5,
                                    class_to_category=to_category)
    processor = PanopticPostProcessor(IS_THING, to_category, PostprocessSettings(threshold=0.5))
    output = kept_forward(model, batch, processor, mask)
    assert output.image_sizes == [tuple(i.shape[-2:]) for i in images]  # measured on the given mask
    actual = processor(output, targets)
    assert_same_results(expected, actual)
    assert actual[0].id_map.shape == (100, 150)
    assert {s["category_id"] for r in actual for s in r.segments_info} <= {11, 12, 13, 14, 15}


def test_the_processor_uses_the_category_tensors_given():
    model = PanopticDETR(250, backbone="resnet18", hidden_dim=32, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=4).eval()
    categories = coco_category_map()
    with torch.no_grad():
        model.detr.class_embed.weight.zero_()
        model.detr.class_embed.bias.zero_()
        model.detr.class_embed.bias[1] = 20.0  # COCO id 1, "person": a thing
    processor = PanopticPostProcessor.for_categories(categories, PostprocessSettings(threshold=0.5))
    results = processor(kept_forward(model, [torch.randn(3, 64, 64)], processor))
    assert results[0].segments_info and all(s["category_id"] == 1 and s["isthing"] for s in results[0].segments_info)


def test_cached_outputs_post_processed_again_with_other_settings(setup):
    """Masks computed once at a low threshold serve every higher threshold and any merge mode / min area."""
    model, images, full = setup
    low = PanopticPostProcessor(IS_THING, settings=PostprocessSettings(threshold=0.6))
    cached = kept_forward(model, images, low)
    for settings in (PostprocessSettings(0.6), PostprocessSettings(0.7, "merge"), PostprocessSettings(0.9, min_area=0)):
        again = low.replace(**settings.as_dict())
        assert again.settings == settings and low.settings.threshold == 0.6
        assert_same_results(again(full), again(cached))
    assert kept_queries(full.pred_logits, 0.3).sum() > kept_queries(full.pred_logits, 0.6).sum()
    with pytest.raises(ValueError, match="not computed"):  # a lower threshold needs masks that were not computed
        low.replace(threshold=0.3)(cached)


def test_sweep_equals_one_run_per_setting(setup):
    model, images, full = setup
    grid = [PostprocessSettings(t, mode, area) for t in (0.3, 0.5, 0.9) for mode in ("reference", "merge")
            for area in (0, 4)]
    processor = PanopticPostProcessor(IS_THING)
    cached = kept_forward(model, images, processor.replace(threshold=0.3))
    targets = [(70, 100), (50, 78)]
    swept = list(processor.sweep(cached, grid, targets))
    assert len(swept) == len(images)
    for b, groups in enumerate(swept):
        assert sorted(s for group, _ in groups for s in group) == sorted(grid)  # every setting answered once
        for group, result in groups:
            for setting in group:
                alone = processor.replace(**setting.as_dict())(full, targets)[b]
                assert torch.equal(alone.id_map, result.id_map) and alone.segments_info == result.segments_info


def test_settings_are_checked():
    with pytest.raises(ValueError, match="merge_stuff"):
        PostprocessSettings(0.5, "nope")
    with pytest.raises(ValueError, match="min_area"):
        PostprocessSettings(0.5, min_area=-1)
    with pytest.raises(ValueError, match="threshold"):
        PostprocessSettings(1.5)
    assert PostprocessSettings.from_dict({"threshold": "0.7"}) == PostprocessSettings(0.7)


def test_forward_with_kept_queries_runs_under_inference_mode(setup):
    model, images, _ = setup
    processor = PanopticPostProcessor(IS_THING, settings=PostprocessSettings(threshold=0.5))
    output = kept_forward(model, images, processor)
    assert output.pred_masks.is_inference() and output.pred_logits.is_inference()


def test_winners_kept_between_calls_give_the_same_results(setup):
    """A caller re-running settings on one output keeps the upsampled masks (``winners``): same results."""
    model, images, _ = setup
    low = PanopticPostProcessor(IS_THING, settings=PostprocessSettings(threshold=0.5))
    cached = kept_forward(model, images, low)
    winners = [None] * len(images)
    for settings in (PostprocessSettings(0.5), PostprocessSettings(0.8, "merge", 0), PostprocessSettings(0.6)):
        processor = low.replace(**settings.as_dict())
        assert_same_results(processor(cached), processor(cached, winners=winners))
    assert all(w is not None for w in winners)
    with pytest.raises(ValueError, match="not computed"):
        low.replace(threshold=0.3)(cached, winners=winners)
