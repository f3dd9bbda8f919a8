"""The GPU suite (marker ``cuda``): every test here needs CUDA and is skipped without it, so the CPU
suite and CI stay green. Run it on a machine with a GPU: ``bench/gpu.sh`` (suite + recipe figures) or
``python -m pytest tests/gpu -m cuda -q``."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Every test under tests/gpu carries the ``cuda`` marker and, without CUDA, a skip saying why."""
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False): the GPU suite runs "
                                   "on a machine with a GPU, see bench/gpu.sh")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture
def strict_fp32():
    """Plain IEEE float32 on the GPU (no TF32 in matmuls or convolutions), so CUDA and CPU agree to ~1e-6."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())
