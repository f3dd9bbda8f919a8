"""Sharding, and DDP with 2 CPU processes (torchrun, gloo): parameters equal across ranks and equal to one
process with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_panoptic.engine.distributed import shard_indices
from detr_panoptic.engine.training import train_stage
from tests.engine.toys import SometimesEmpty, ToyPanoptic, tiny_config, toy_datasets

REPO_ROOT = Path(__file__).resolve().parents[2]  # so that "tests.engine.toys" imports


def test_shards_partition_the_epoch_and_interleave_like_one_big_batch():
    single = shard_indices(10, seed=1, epoch=3)
    assert sorted(single) == list(range(10))
    shards = [shard_indices(10, seed=1, epoch=3, rank=r, world_size=2) for r in range(2)]
    # rank r's k-th item is global position 2k + r
    assert [x for pair in zip(*shards) for x in pair] == single
    assert shard_indices(10, seed=1, epoch=4) != single  # a new order each epoch
    padded = [shard_indices(5, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 3 and set(padded[0] + padded[1]) == set(range(5))


RUNNER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
from tests.engine.toys import SometimesEmpty, ToyPanoptic, tiny_config, toy_datasets
from detr_panoptic.engine.training import train
from detr_panoptic.utils.logging import setup_logging

setup_logging()
out = sys.argv[1]

def evaluate(model):
    # runs on every rank after the last step: keep each rank's parameters (and where it ran) for the test
    torch.save(model.state_dict(), f"{{out}}/rank{{dist.get_rank()}}.pt")
    with open(f"{{out}}/rank{{dist.get_rank()}}.where", "w") as file:
        file.write(os.environ["LOCAL_RANK"] + " " + os.environ["GROUP_RANK"])
    return {{"pq": 1.0}}

config = tiny_config(out, model={{"dropout": 0.0}}, train={{"batch_size": 1, "max_steps": 4, "eos_coef": 1.0}})
datasets = (SometimesEmpty(8), ToyPanoptic(2), toy_datasets()[2])
train(config, datasets=datasets, evaluate=evaluate)
"""


# Why the losses agree: box and mask losses are sums over matched pairs divided by num_boxes, which is the
# global count averaged over processes, so each rank's loss is (its sum) / (global count / world_size) and
# DDP's gradient average gives (sum of all) / (global count): the single-process loss. The cross-entropy is
# a weighted mean per process; its average over processes equals the global weighted mean when every
# process has the same total weight, which eos_coef=1 (all weights 1, Q queries per image) guarantees while
# the images keep different numbers of segments (so the num_boxes all_reduce is exercised). Some images have
# no segment at all: a rank then computes no mask, which DDP must tolerate (find_unused_parameters).
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, nodes):
    # nodes=2: two torchrun agents with one process each, as on two machines (static rendezvous on this
    # host): both processes are LOCAL_RANK 0, on node 0 and node 1.
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(here=str(REPO_ROOT)))
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        launches = [run + ["--standalone", "--nproc_per_node", "2", str(script), str(out)]]
    else:
        port = free_port()
        launches = [run + ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out)]
                    for node in range(2)]
    agents = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for command in launches]
    try:
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output
        # the channels-last convolutions' gradients fit DDP's buckets (no per-step copy, no warning)
        assert "Grad strides do not match" not in output
    expected_places = ["0 0", "1 0"] if nodes == 1 else ["0 0", "0 1"]  # LOCAL_RANK, node
    assert [(out / f"rank{rank}.where").read_text() for rank in range(2)] == expected_places

    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key

    config = tiny_config(tmp_path / "single", model={"dropout": 0.0},
                         train={"batch_size": 2, "max_steps": 4, "eos_coef": 1.0})
    datasets = (SometimesEmpty(8), ToyPanoptic(2), toy_datasets()[2])
    train_stage(config, datasets=datasets, evaluate=lambda model: {"pq": 1.0})
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pth", weights_only=True)["model"]
    ddp_checkpoint = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert ddp_checkpoint["step"] == 4 and len(ddp_checkpoint["rng"]["per_rank"]) == 2
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=2e-5, msg=key)
        assert torch.equal(ddp_checkpoint["model"][key], rank0[key])


def test_a_batch_without_targets_leaves_the_mask_head_without_gradients():
    """Why DDP keeps ``find_unused_parameters`` on (``train.ddp_find_unused_parameters``): with matched-only
    masks, a process whose images have no targets computes no mask, so the mask head's parameters get no
    gradient in that step; with targets, every trainable parameter gets one."""
    from detr_panoptic.data.coco_panoptic import collate
    from detr_panoptic.engine.trainer import EpochBatches, RunState, Trainer
    from detr_panoptic.models.criterion import build_criterion
    from detr_panoptic.models.detr import PanopticDETR
    from tests.engine.toys import TINY_MODEL

    torch.manual_seed(0)
    model = PanopticDETR(3, **TINY_MODEL)
    dataset = SometimesEmpty(3)  # item 1 has no segment
    trainer = Trainer(model=model, criterion=build_criterion(3, aux_loss=True, num_decoder_layers=2),
                      optimizer=torch.optim.AdamW(model.parameters()), scheduler=None,
                      batches=EpochBatches(dataset, batch_size=1, seed=0), state=RunState(), device=torch.device("cpu"))

    def without_gradient(item: int) -> set[str]:
        model.zero_grad(set_to_none=True)
        _, total = trainer.forward_losses(*collate([dataset[item]]))
        total.backward()
        return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}

    assert without_gradient(0) == set()
    unused = without_gradient(1)
    assert unused and all(name.startswith(("mask_head.", "bbox_attention.")) for name in unused)
