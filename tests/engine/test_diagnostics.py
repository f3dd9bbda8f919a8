"""engine/diagnostics.py: the image-dependence measurements and the validation wrapper."""
from __future__ import annotations

import torch

from detr_panoptic.engine.diagnostics import (
    DIAGNOSTIC_KEYS,
    DiagnosedValidation,
    image_dependence,
    image_variance_ratio,
)
from detr_panoptic.models.detr import PanopticDETR
from tests.engine.toys import TINY_MODEL


def _model() -> PanopticDETR:
    torch.manual_seed(0)
    return PanopticDETR(3, **{**TINY_MODEL, "dropout": 0.0})


def test_variance_ratio_designed_values():
    # two images, values differ only between images: all variance is across images
    between = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    assert abs(image_variance_ratio(between) - 1.0) < 1e-12
    # same values in both images, varying within: none across images
    within = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert image_variance_ratio(within) == 0.0
    # half and half: per-position var across images is 1, total var is 2
    mixed = torch.tensor([[0.0, 2.0], [2.0, 4.0]]) - 0.0
    assert abs(image_variance_ratio(mixed) - 0.5) < 1e-12
    assert image_variance_ratio(torch.ones(3, 4)) == 0.0


def test_identical_images_have_no_image_dependence():
    model = _model()
    image = torch.randn(3, 64, 96)
    diag = image_dependence(model, [image, image.clone(), image.clone()])
    assert set(diag) == set(DIAGNOSTIC_KEYS)
    assert diag["diag_memory_image_var"] < 1e-10
    assert diag["diag_decoder_image_var"] < 1e-10
    assert diag["diag_box_centre_spread"] < 1e-12


def test_different_images_show_dependence_and_a_constant_encoder_shows_none():
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 96, generator=g) for _ in range(4)]
    diag = image_dependence(model, images)
    assert diag["diag_memory_image_var"] > 1e-3
    assert diag["diag_decoder_image_var"] > 1e-4
    assert model.training  # mode restored
    # an input projection that ignores the features: memory depends on position only
    with torch.no_grad():
        model.detr.input_proj.weight.zero_()
    collapsed = image_dependence(model, images)
    assert collapsed["diag_memory_image_var"] < 1e-10
    assert collapsed["diag_box_centre_spread"] < 1e-12


def test_wrapper_adds_keys_to_the_validation_metrics():
    model = _model()
    images = [torch.randn(3, 64, 96) for _ in range(2)]
    wrapped = DiagnosedValidation(lambda m: {"pq": 12.5}, images)
    metrics = wrapped(model)
    assert metrics["pq"] == 12.5
    assert all(k in metrics for k in DIAGNOSTIC_KEYS)
    assert set(DiagnosedValidation(None, images)(model)) == set(DIAGNOSTIC_KEYS)
