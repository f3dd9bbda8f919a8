"""``OnnxPredictor`` on onnxruntime's CUDA provider: its sessions really run on CUDA (onnxruntime falls back
to the CPU with only a log line when the CUDA libraries do not load) and give the CPU sessions' results."""
from __future__ import annotations

import pytest

from tests.export.test_onnx import _pictures, exported  # noqa: F401  (the module-scoped export fixture)

ort = pytest.importorskip("onnxruntime", reason="needs `pip install 'detr-panoptic[onnx]'`")


def test_onnx_predictor_runs_on_the_cuda_provider(exported):  # noqa: F811
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider ({ort.get_available_providers()}): "
                    f"pip install onnxruntime-gpu")
    from detr_panoptic import OnnxPredictor

    _, out, pictures, _, _ = exported
    gpu = OnnxPredictor.from_pretrained(out, device="cuda")
    for session in (gpu.trunk, gpu.masks):
        assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()  # no silent fallback
    cpu = OnnxPredictor.from_pretrained(out, device="cpu")
    expected, actual = cpu(pictures), gpu(pictures)
    assert len(expected) == len(actual) == len(pictures)
    for e, a in zip(expected, actual):
        agreement = float((e.id_map == a.id_map.to(e.id_map.device)).float().mean())
        assert agreement > 0.99
        assert [s["category_id"] for s in e.segments_info] == [s["category_id"] for s in a.segments_info]
