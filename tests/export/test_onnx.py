"""ONNX export of a small model (through ``detr-panoptic export``) and ``OnnxPredictor``: the graphs give
PyTorch's logits, boxes and masks within 1e-4, and the predictor the PyTorch predictor's panoptic results."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.checkpoints import save_checkpoint
from detr_panoptic.cli import main
from detr_panoptic.inference import PanopticPredictor, PredictorSettings, preprocess
from detr_panoptic.utils.batching import pad_images
from tests.export.helpers import assert_same_results
from tests.export.models import (
    design_class_head,
    design_mask_head,
    small_category_map,
    small_model,
    threshold_keeping_about,
)

pytest.importorskip("onnxruntime", reason="the ONNX tests need `pip install 'detr-panoptic[onnx]'`")
pytest.importorskip("onnxscript", reason="the ONNX tests need `pip install 'detr-panoptic[onnx]'`")

pytestmark = pytest.mark.slow  # one export of the small model: ~30 s on a loaded 2-core machine
INPUT_SIZE = (64, 128)
KEPT = 9  # about this many of the 24 queries of the two pictures (threshold_keeping_about)


def _pictures():
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (100, 150, 3), dtype=np.uint8)),
            Image.fromarray(generator.integers(0, 256, (90, 60, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model whose class head keeps 9 queries of the two pictures (at the checkpoint's threshold) and
    whose masks depend on the query (``design_mask_head``), saved as a checkpoint, exported with the command."""
    folder = tmp_path_factory.mktemp("onnx")
    model = small_model()
    pictures = _pictures()
    tensors = [preprocess(p, *INPUT_SIZE) for p in pictures]
    design_mask_head(model)
    design_class_head(model, tensors, list(range(model.num_classes)))
    threshold, kept = threshold_keeping_about(model, tensors, KEPT)
    postprocess = {"threshold": threshold, "merge_stuff": "reference", "min_area": 2}
    category_map = small_category_map()
    checkpoint = folder / "model.pth"
    save_checkpoint(checkpoint, model, category_map=category_map, model_config=model.config,
                    input_size={"min_size": INPUT_SIZE[0], "max_size": INPUT_SIZE[1]}, postprocess=postprocess)
    out = folder / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    settings = PredictorSettings(category_map, *INPUT_SIZE, **postprocess)
    return model, out, pictures, tensors, settings, kept


@pytest.fixture(scope="module")
def predictors(exported):
    from detr_panoptic import OnnxPredictor

    model, out, _, _, settings, _ = exported
    return PanopticPredictor(model, settings, device="cpu"), OnnxPredictor.from_pretrained(out, device="cpu")


def test_metadata_restores_the_settings(exported, predictors):
    _, out, _, _, settings, _ = exported
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["opset"] == 18 and meta["graphs"]["masks"]["inputs"][0] == "mask_queries"
    assert predictors[1].settings == settings


@pytest.mark.parametrize("sizes", [[(64, 96)], [(96, 64)], [(64, 96), (96, 64)], [(80, 112), (64, 64)]])
def test_graphs_give_pytorch_outputs_at_any_size(exported, predictors, sizes):
    model, _, _, _, _, _ = exported
    onnx = predictors[1]
    images = [torch.randn(3, h, w) for h, w in sizes]
    batch, padding = pad_images(images)
    with torch.no_grad():
        expected = model(batch, padding)
    trunk = onnx.run_trunk(batch, padding)
    torch.testing.assert_close(torch.from_numpy(trunk["logits"]), expected.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(trunk["boxes"]), expected.pred_boxes, rtol=1e-4, atol=1e-4)
    queries = np.arange(model.config["num_queries"])
    for b in range(len(images)):
        masks = torch.from_numpy(onnx.run_masks(trunk, b, queries))
        torch.testing.assert_close(masks, expected.pred_masks[b], rtol=1e-4, atol=1e-4)
    one = torch.from_numpy(onnx.run_masks(trunk, 0, queries[3:4]))  # a single query
    torch.testing.assert_close(one, expected.pred_masks[0, 3:4], rtol=1e-4, atol=1e-4)


def test_same_panoptic_results_as_the_pytorch_predictor(exported, predictors):
    _, _, pictures, _, _, kept = exported
    torch_predictor, onnx_predictor = predictors
    expected = torch_predictor(pictures)
    actual = onnx_predictor(pictures)
    assert sum(len(r.kept) for r in expected) == kept and all(len(r.segments_info) >= 3 for r in expected)
    assert_same_results(expected, actual)
    assert actual[0].id_map.shape == (100, 150) and actual[1].id_map.shape == (90, 60)
    assert_same_results(torch_predictor([pictures[0]]), onnx_predictor([pictures[0]]))
    merged = torch_predictor.with_settings(merge_stuff="merge")
    assert_same_results(merged(pictures), onnx_predictor.with_settings(merge_stuff="merge")(pictures))


def test_zero_kept_queries(exported, predictors):
    model, _, pictures, tensors, _, _ = exported
    torch_predictor, onnx_predictor = predictors
    # a threshold between the two pictures' best scores: nothing kept in one of them (its mask graph run
    # is skipped), some in the other
    with torch.no_grad():  # the pictures as the predictor runs them: one padded batch
        scores, labels = model(list(tensors)).pred_logits.softmax(-1).max(-1)
    best = [float(s[lb != model.num_classes].max()) for s, lb in zip(scores, labels)]
    low, high = sorted(best)
    assert high - low > 1e-2
    mixed = (low + high) / 2
    actual = onnx_predictor.with_settings(threshold=mixed)(pictures)
    assert min(len(r.kept) for r in actual) == 0 and sum(len(r.kept) for r in actual) > 0
    empty = next(r for r in actual if len(r.kept) == 0)
    assert empty.segments_info == [] and not empty.id_map.any()
    assert_same_results(torch_predictor.with_settings(threshold=mixed)(pictures), actual)
    strict = onnx_predictor.with_settings(threshold=0.99)  # nothing anywhere
    assert all(not r.id_map.any() and len(r.kept) == 0 for r in strict(pictures))
    assert_same_results(torch_predictor.with_settings(threshold=0.99)(pictures), strict(pictures))


def test_mask_batch_does_not_change_results(exported, predictors):
    from detr_panoptic import OnnxPredictor

    _, out, pictures, _, _, _ = exported
    chunked = OnnxPredictor.from_pretrained(out, device="cpu", mask_batch=4)
    assert_same_results(predictors[1](pictures), chunked(pictures))


def test_predict_batch_and_run_inference_use_it(exported, predictors):
    from detr_panoptic.inference import InferenceSample

    _, _, pictures, tensors, _, _ = exported
    samples = [InferenceSample(image=t, orig_size=(p.height, p.width), image_info={"id": i}, file_name=f"{i}.png")
               for i, (t, p) in enumerate(zip(tensors, pictures))]
    assert_same_results(predictors[0].predict_batch(samples), predictors[1].predict_batch(samples))


def test_cuda_without_the_gpu_provider_is_a_clear_error(exported):
    import onnxruntime

    from detr_panoptic import OnnxPredictor
    from detr_panoptic.utils.errors import UserInputError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(UserInputError, match="onnxruntime-gpu"):
        OnnxPredictor.from_pretrained(exported[1], device="cuda")


def test_predict_to_folder_with_the_onnx_predictor(exported, predictors, tmp_path):
    """The ONNX predictor drives ``predict_to_folder`` (restartable folder fingerprinted by its graphs)."""
    import json

    from detr_panoptic.inference import predict_to_folder

    _, _, pictures, _, _, _ = exported
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"{i}.png")
    inputs = [str(tmp_path / f"{i}.png") for i in range(len(pictures))]
    torch_run = predict_to_folder(predictors[0], inputs, tmp_path / "torch", progress=False, overlays=False)
    onnx_run = predict_to_folder(predictors[1], inputs, tmp_path / "onnx", progress=False, overlays=False)
    a = json.loads(torch_run.predictions_json.read_text())["annotations"]
    b = json.loads(onnx_run.predictions_json.read_text())["annotations"]
    assert [[s["category_id"] for s in x["segments_info"]] for x in a] == \
        [[s["category_id"] for s in x["segments_info"]] for x in b]
    assert len(predictors[1].weights_fingerprint()) == 16
