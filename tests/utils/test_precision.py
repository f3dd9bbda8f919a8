"""utils.precision: precision names -> autocast dtypes, hardware checks, the autocast context."""
from __future__ import annotations

import logging

import pytest
import torch

from detr_panoptic.utils import precision
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.precision import autocast, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", [None, "fp32", "FP32", "float32", torch.float32])
def test_fp32_means_no_autocast(name):
    assert resolve_dtype(name, CPU) is None


@pytest.mark.parametrize("name", ["bf16", "bfloat16", " BF16 ", torch.bfloat16])
def test_bf16_on_cpu(name):
    assert resolve_dtype(name, CPU) == torch.bfloat16


@pytest.mark.parametrize("name", ["fp16", "half", torch.float16])
def test_fp16_on_cpu_is_refused_naming_the_key(name):
    with pytest.raises(UserInputError, match=r"train\.amp: fp16 is not supported on the CPU.*use bf16"):
        resolve_dtype(name, "cpu", key="train.amp")


@pytest.mark.parametrize("name", ["int8", "fp64", torch.float64, torch.int32])
def test_unknown_precision(name):
    with pytest.raises(UserInputError, match=r"--dtype: .*(unknown precision|not a supported precision)"):
        resolve_dtype(name, CPU, key="--dtype")


def test_emulated_cpu_bf16_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="detr_panoptic.utils.precision"):
        assert resolve_dtype("bf16", CPU, key="--dtype") == torch.bfloat16
        assert resolve_dtype("bf16", CPU) == torch.bfloat16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--dtype" in warnings[0].getMessage() and "emulated" in warnings[0].getMessage()


def test_native_cpu_bf16_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="detr_panoptic.utils.precision"):
        resolve_dtype("bf16", CPU)
    assert not caplog.records


def test_cpu_bf16_native_reads_the_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not precision.cpu_bf16_native()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.cpu_bf16_native()


def test_autocast_context():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", None):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.float32):
        assert (a @ b).dtype == torch.float32


def test_dtype_name_and_summary():
    assert [precision.dtype_name(d) for d in (None, torch.float32, torch.bfloat16, torch.float16)] == \
        ["fp32", "fp32", "bf16", "fp16"]
    summary = precision.hardware_summary()
    assert isinstance(summary["cpu"], str) and summary["cpu"]
    assert isinstance(summary["cpu_bf16_native"], bool)
