"""DistributedDataParallel with the NCCL backend, one process (world size 1): a step through DDP equals
the plain step, and the engine's reductions run over NCCL."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from detr_panoptic.engine import distributed
from tests.gpu.common import step_losses, tiny_model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def nccl_group(cuda, monkeypatch):
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.cuda.set_device(cuda)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1, device_id=cuda)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_step_over_nccl_equals_the_plain_step(cuda, strict_fp32, nccl_group):
    assert dist.get_backend() == "nccl"
    values = torch.tensor([1.0, 3.0], device=cuda)
    assert torch.equal(distributed.all_reduce_mean(values), values)  # an NCCL all-reduce, world size 1
    assert distributed.all_gather_objects({"rank": 0}) == [{"rank": 0}]
    model = tiny_model()
    plain, plain_params = step_losses(model, cuda)
    ddp, ddp_params = step_losses(
        model, cuda, wrap=lambda m: torch.nn.parallel.DistributedDataParallel(
            m, device_ids=[cuda.index], find_unused_parameters=True))
    for a, b in zip(plain, ddp):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for name, value in plain_params.items():
        torch.testing.assert_close(ddp_params[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_device_is_the_local_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = distributed.init_distributed("auto")
    assert ctx.device == torch.device("cuda", 0) and not ctx.is_distributed
