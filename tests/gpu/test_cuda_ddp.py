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


def test_ddp_as_training_wraps_it_fits_gradient_buckets(cuda, nccl_group):
    """``training.wrap_distributed`` (channels-last conv weights, as their gradients): no "Grad strides do
    not match bucket view strides" warning, i.e. no copy of every such gradient per step."""
    import warnings

    from detr_panoptic.engine.distributed import DistributedContext
    from detr_panoptic.engine.training import wrap_distributed

    model = tiny_model().to(cuda)
    ctx = DistributedContext(rank=0, world_size=2, device=cuda)  # world_size > 1: wrap (the group has 1 process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_losses(model, cuda, wrap=lambda m: wrap_distributed(m, ctx, find_unused_parameters=True,
                                                                 broadcast_buffers=False))
    assert not [w for w in caught if "Grad strides" in str(w.message)]


def test_auto_device_is_the_local_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = distributed.init_distributed("auto")
    assert ctx.device == torch.device("cuda", 0) and not ctx.is_distributed
