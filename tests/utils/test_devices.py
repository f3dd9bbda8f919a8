"""Device mapping with a stubbed CUDA (no GPU needed): one process per GPU whatever the launcher shows."""
from __future__ import annotations

import logging

import pytest
import torch

from detr_panoptic.engine.distributed import process_device
from detr_panoptic.utils.devices import resolve_device
from detr_panoptic.utils.errors import UserInputError


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: CUDA looks available with ``n`` visible devices."""
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_count


def test_local_rank_maps_onto_the_visible_gpus(gpus):
    gpus(4)  # torchrun on a 4-GPU machine: every process sees all four
    assert [resolve_device("auto", r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert resolve_device("cuda", 2) == torch.device("cuda", 2)
    gpus(1)  # SLURM / CUDA_VISIBLE_DEVICES per task: each process sees only its own GPU, as index 0
    assert [resolve_device("auto", r) for r in range(4)] == [torch.device("cuda", 0)] * 4
    gpus(2)  # two GPUs per task, four processes on the node
    assert [resolve_device("cuda", r).index for r in range(4)] == [0, 1, 0, 1]


def test_explicit_index_is_checked_and_overridden_under_torchrun(gpus, caplog):
    gpus(2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserInputError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    # one process: cuda:1 is honoured; under torchrun each process keeps its own GPU, with a warning
    assert process_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)
    with caplog.at_level(logging.WARNING):
        assert process_device("cuda:0", local_rank=0, world_size=2) == torch.device("cuda", 0)
    assert "CUDA_VISIBLE_DEVICES" in caplog.text
    assert process_device("cuda:0", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert process_device("cpu", local_rank=1, world_size=2) == torch.device("cpu")


def test_no_cuda(gpus):
    gpus(0)
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(UserInputError, match="not available"):
        resolve_device("cuda")
