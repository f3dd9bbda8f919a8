"""Inference on CUDA gives the CPU's panoptic result: the model's kept-query forward + the
``PanopticPostProcessor``, and ``inference.PanopticPredictor(device="cuda")``; bf16/fp16 on CUDA run and keep
the segments."""
from __future__ import annotations

import contextlib

import pytest
import torch

from detr_panoptic.models.postprocess import PanopticPostProcessor, PostprocessSettings
from tests.gpu.common import tiny_model

SIZE = (96, 144)
THRESHOLD = 0.85


def steered_model(kept: int = 4):
    """A tiny model in eval mode whose class head is fitted (least squares on the decoder output) so that
    ``kept`` queries predict a class with probability ~1 and the others "no object"."""
    model = tiny_model().eval()
    image = _image()
    with torch.inference_mode():
        batch, mask = model._batch([image], None)
        hs = model._trunk(batch, mask)["hs"][-1][0].double()  # [Q, D]
    queries = hs.shape[0]
    num_classes = model.num_classes
    target = torch.zeros(queries, num_classes + 1, dtype=torch.float64)
    target[:, num_classes] = 12.0
    for n, q in enumerate(torch.linspace(0, queries - 1, kept).round().long().tolist()):
        target[q, num_classes] = 0.0
        target[q, n % num_classes] = 12.0
    features = torch.cat([hs, torch.ones(queries, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(features, target).solution
    with torch.no_grad():
        model.detr.class_embed.weight.copy_(solution[:-1].T.float())
        model.detr.class_embed.bias.copy_(solution[-1].float())
        # Random weights give every query nearly the same mask (the attention term of the head's first layer
        # is tiny), so every pixel would be a near tie; amplified, the masks differ per query.
        model.mask_head.lay1.weight[:, -model.bbox_attention.num_heads:] *= 300
    return model


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 9, generator=g)
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)[0] * 2 - 1


def _agreement(a, b) -> float:
    """Share of pixels whose segment comes from the same query in both results."""
    def by_query(result):
        lookup = torch.full((int(result.id_map.max()) + 1,), -1, dtype=torch.long)
        for segment in result.segments_info:
            lookup[segment["id"]] = segment["query"]
        return lookup[result.id_map.cpu()]
    return float((by_query(a) == by_query(b)).float().mean())


def _predict(model, images, *, is_thing=None, target_sizes=None, dtype=None):
    """The model's forward with masks of the kept queries (under ``dtype`` autocast), then the post-processor."""
    if is_thing is None:
        is_thing = torch.zeros(model.num_classes, dtype=torch.bool)
    processor = PanopticPostProcessor(is_thing, settings=PostprocessSettings(threshold=THRESHOLD))
    device_type = images[0].device.type
    precision = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode():
        with precision:
            output = model(images, mask_queries=processor.kept_queries)
        output.pred_masks = output.pred_masks.float()
        return processor(output, target_sizes)


def _summary(result):
    return [(s["query"], s["category_id"], s["isthing"]) for s in result.segments_info]


def test_predict_on_cuda_equals_the_cpu_result(cuda, strict_fp32):
    model = steered_model()
    images = [_image(0), _image(1)[:, :80, :120]]
    is_thing = torch.tensor([False, True, True])
    cpu = _predict(model, images, is_thing=is_thing, target_sizes=[(192, 288), (160, 240)])
    assert cpu[0].segments_info, "the steered model keeps queries"
    gpu_model = model.to(cuda)
    gpu = _predict(gpu_model, [i.to(cuda) for i in images], is_thing=is_thing, target_sizes=[(192, 288), (160, 240)])
    for c, g in zip(cpu, gpu):
        assert _summary(g) == _summary(c)
        assert g.id_map.shape == c.id_map.shape
        assert _agreement(c, g) >= 0.999
        for sc, sg in zip(c.segments_info, g.segments_info):
            assert sg["area"] == pytest.approx(sc["area"], rel=0.005, abs=4)
            assert sg["score"] == pytest.approx(sc["score"], rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_predict_on_cuda_keeps_the_segments(cuda, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no native bf16 on this GPU")
    model = steered_model().to(cuda)
    image = _image().to(cuda)
    reference = _predict(model, [image])[0]
    result = _predict(model, [image], dtype=dtype)[0]
    assert _summary(result) == _summary(reference)
    # random weights: segment borders are soft, so reduced precision moves some (bf16 on the CPU: 92.7%)
    assert _agreement(reference, result) >= 0.85


def test_predictor_on_cuda_equals_the_cpu_predictor(cuda, strict_fp32):
    inference = pytest.importorskip("detr_panoptic.inference")
    if not hasattr(inference, "PanopticPredictor") or not hasattr(inference, "PredictorSettings"):
        pytest.skip("detr_panoptic.inference has no PanopticPredictor yet")
    from tests.engine.toys import TOY_CATEGORIES

    model = steered_model()
    settings = inference.PredictorSettings(category_map=TOY_CATEGORIES, min_size=SIZE[0], max_size=SIZE[1],
                                           threshold=THRESHOLD)
    picture = ((_image() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)  # an RGB uint8 [3, H, W]
    cpu = inference.PanopticPredictor(model, settings, device="cpu")([picture])[0]
    gpu_predictor = inference.PanopticPredictor(model, settings, device="cuda")
    assert gpu_predictor.device.type == "cuda"
    assert next(gpu_predictor.model.parameters()).device.type == "cuda"
    gpu = gpu_predictor([picture])[0]
    assert cpu.segments_info, "the steered model keeps queries"
    assert _summary(gpu) == _summary(cpu)
    assert _agreement(cpu, gpu) >= 0.999
    for dtype in ("bf16", "fp16"):
        if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            continue
        reduced = inference.PanopticPredictor(model, settings, device="cuda", dtype=dtype)([picture])[0]
        assert _summary(reduced) == _summary(cpu), dtype
