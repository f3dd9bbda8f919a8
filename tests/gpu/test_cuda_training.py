"""A training step on CUDA: the CPU's losses in fp32 (1e-4), finite under bf16 and fp16 autocast."""
from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.common import step_losses, tiny_model


def test_fp32_step_on_cuda_equals_the_cpu_step(cuda, strict_fp32):
    model = tiny_model()
    cpu_records, cpu_params = step_losses(model, torch.device("cpu"))
    gpu_records, gpu_params = step_losses(model, cuda)
    for step, (c, g) in enumerate(zip(cpu_records, gpu_records), start=1):
        assert c.keys() == g.keys()
        for key in c:  # step 2 also checks that the first optimizer step moved both copies alike
            assert g[key] == pytest.approx(c[key], rel=1e-4, abs=1e-6), (step, key, c[key], g[key])
    for name, value in cpu_params.items():
        torch.testing.assert_close(gpu_params[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step_on_cuda_is_finite_and_close(cuda, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no native bf16")
    model = tiny_model()
    reference, _ = step_losses(model, cuda, steps=1)
    records, params = step_losses(model, cuda, amp=amp, steps=3)
    for record in records:
        assert all(math.isfinite(v) for v in record.values()), record
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    # the same weights at step 1: only the precision differs (bf16 ~3 significant digits, fp16 ~4)
    assert records[0]["loss"] == pytest.approx(reference[0]["loss"], rel=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # autocast: weights stay float32


def test_fp16_uses_a_grad_scaler_and_bf16_does_not(cuda):
    from tests.gpu.common import make_trainer

    assert make_trainer(tiny_model(), cuda, amp="fp16").scaler is not None
    assert make_trainer(tiny_model(), cuda, amp="bf16").scaler is None
