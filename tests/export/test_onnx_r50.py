"""ONNX export of an R50-shaped model (the official checkpoint's layout, 250 classes, generated weights):
onnxruntime gives PyTorch's logits and boxes within 1e-4 and masks within 5e-4 at several input sizes through one
graph (the mask logits pass the mask head's five convolutions at up to 1/4 resolution: 1.4e-4 apart was measured on
an Intel Xeon with AMX, under 1e-4 on an AMD EPYC),
and OnnxPredictor the PyTorch predictor's kept queries and segments.

A random R50 decoder gives nearly the same output to every query: the query positions are spread
(``spread_queries``) and a mild class head designed (``design_class_head``, gain 4: a stronger one
magnifies float rounding past 1e-4) so that 8 queries are kept, and the mask head made query-dependent
(``design_mask_head``; a random one gives every query nearly the same mask, and rounding then decides
two thirds of the pixels, measured). Even so a few boundary pixels of an R50's masks are within
rounding of a tie: the same kept queries and segments, and >= 99.9% of the pixels in the same segment;
the exact id-map identity is tested on the small model (test_onnx.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.inference import PanopticPredictor, PredictorSettings, preprocess
from detr_panoptic.utils.batching import pad_images
from tests.export.helpers import assert_same_results
from tests.export.models import (
    design_class_head,
    design_mask_head,
    r50_model,
    spread_queries,
    threshold_keeping_about,
)

pytest.importorskip("onnxruntime", reason="the ONNX tests need `pip install 'detr-panoptic[onnx]'`")
pytest.importorskip("onnxscript", reason="the ONNX tests need `pip install 'detr-panoptic[onnx]'`")

pytestmark = pytest.mark.slow  # the R50 export: ~1.5-2 min on a loaded 2-core machine
INPUT_SIZE = (128, 192)
KEPT = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from detr_panoptic.export import export_onnx

    model = r50_model()
    category_map = coco_category_map(250)
    generator = np.random.default_rng(1)
    pictures = [Image.fromarray(generator.integers(0, 256, (150, 200, 3), dtype=np.uint8)),
                Image.fromarray(generator.integers(0, 256, (160, 120, 3), dtype=np.uint8))]
    tensors = [preprocess(p, *INPUT_SIZE) for p in pictures]
    things = [c.id for c in category_map.categories if c.isthing][:3]
    stuff = [c.id for c in category_map.categories if not c.isthing][:3]
    spread_queries(model)
    design_mask_head(model)
    design_class_head(model, tensors, things + stuff, scale=4.0)  # identity layout: class index == id
    threshold, kept = threshold_keeping_about(model, tensors, KEPT, min_gap=1e-3,
                                                   class_to_category=category_map.class_to_category_tensor())
    settings = PredictorSettings(category_map, *INPUT_SIZE, threshold=threshold)
    out = export_onnx(model, tmp_path_factory.mktemp("onnx_r50"), category_map=category_map,
                      input_size=INPUT_SIZE, postprocess=settings.postprocess_metadata())
    return model, out, pictures, settings, kept


@pytest.fixture(scope="module")
def predictors(exported):
    from detr_panoptic import OnnxPredictor

    model, out, _, settings, _ = exported
    return PanopticPredictor(model, settings, device="cpu"), OnnxPredictor.from_pretrained(out, device="cpu")


@pytest.mark.parametrize("sizes", [[(128, 160)], [(96, 224), (128, 128)]])
def test_graphs_give_pytorch_outputs(exported, predictors, sizes):
    model = exported[0]
    onnx = predictors[1]
    batch, padding = pad_images([torch.randn(3, h, w) for h, w in sizes])
    with torch.no_grad():
        expected = model(batch, padding)
    trunk = onnx.run_trunk(batch, padding)
    torch.testing.assert_close(torch.from_numpy(trunk["logits"]), expected.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(trunk["boxes"]), expected.pred_boxes, rtol=1e-4, atol=1e-4)
    queries = np.arange(0, model.config["num_queries"], 7)
    for b in range(len(sizes)):
        masks = torch.from_numpy(onnx.run_masks(trunk, b, queries))
        torch.testing.assert_close(masks, expected.pred_masks[b, queries], rtol=1e-4, atol=5e-4)


def test_same_kept_queries_and_segments(exported, predictors):
    pictures = exported[2]
    torch_predictor, onnx_predictor = predictors
    expected, actual = torch_predictor(pictures), onnx_predictor(pictures)
    assert sum(len(r.kept) for r in expected) == exported[4]
    for e, a in zip(expected, actual):
        assert torch.equal(e.kept.indices, a.kept.indices) and torch.equal(e.kept.category_ids, a.kept.category_ids)
        torch.testing.assert_close(a.kept.scores, e.kept.scores, rtol=1e-4, atol=1e-6)
        assert [(s["category_id"], s["query"]) for s in e.segments_info] == \
            [(s["category_id"], s["query"]) for s in a.segments_info]
        assert (e.id_map == a.id_map).float().mean() >= 0.999


def test_zero_kept_queries(exported, predictors):
    pictures = exported[2]
    torch_predictor, onnx_predictor = predictors
    actual = onnx_predictor.with_settings(threshold=0.999)(pictures)
    assert all(len(r.kept) == 0 and r.segments_info == [] and not r.id_map.any() for r in actual)
    assert_same_results(torch_predictor.with_settings(threshold=0.999)(pictures), actual)
