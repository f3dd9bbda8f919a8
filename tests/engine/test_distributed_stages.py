"""``torchrun --nproc_per_node 2`` on the CPU (gloo): chained stages, rank 0's resume decision, and the error
when the processes do not share the run folder (what a multi-node run without a shared filesystem meets)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # so that "tests.engine.toys" imports

RUNNER = """
import os, sys, time
sys.path.insert(0, {here!r})
from tests.engine.toys import TINY_MODEL, toy_datasets
from detr_panoptic.config import config_from_dict
from detr_panoptic.engine import hooks
from detr_panoptic.engine.training import train
from detr_panoptic.utils.logging import setup_logging

setup_logging()
out, mode, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank = int(os.environ["RANK"])
real_save_best = hooks.CheckpointHook.save_best
def slow_save_best(self, trainer):  # rank 0 writes best.pth late: the other rank must wait for it
    time.sleep(1.0)
    real_save_best(self, trainer)
hooks.CheckpointHook.save_best = slow_save_best
config = config_from_dict({{
    "name": "toy", "model": dict(TINY_MODEL, dropout=0.0),
    "train": {{"output_dir": out + (f"/rank{{rank}}" if mode == "unshared" else ""), "batch_size": 1,
               "max_steps": max_steps, "lr": 1e-3, "lr_backbone": 0.0, "device": "cpu", "seed": 3,
               "eval_every_epochs": 0, "resume": mode != "rank0-resumes" or rank == 0}},
    "data": {{"workers": 0}}, "logging": {{"tensorboard": False, "progress": False}},
    "stages": [{{"name": "stage1"}}, {{"name": "stage2", "model": {{"init": "@stage1/best"}}}}],
}}, source="test")
try:
    train(config, datasets=toy_datasets(8), evaluate=lambda model: {{"pq": 1.0}})
except Exception as exc:
    print(f"rank {{rank}} stopped: {{type(exc).__name__}}: {{exc}}", flush=True)
    sys.exit(2)
"""


def _torchrun(script: Path, out: Path, mode: str, max_steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(out), mode, str(max_steps)]
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_chained_stages_resume_and_unshared_folders_under_torchrun(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(here=str(REPO_ROOT)))
    out = tmp_path / "run"

    # stage 1 without validation writes best.pth in after_train only; stage 2 starts from it on both ranks
    first = _torchrun(script, out, "chain", 2)
    assert first.returncode == 0, first.stdout
    best1 = torch.load(out / "stage1" / "checkpoints" / "best.pth", weights_only=True)
    last2 = torch.load(out / "stage2" / "checkpoints" / "last.pth", weights_only=True)
    assert best1["step"] == 2 and last2["step"] == 2

    # rank 0 decides to resume (rank 1's own config says train.resume: false): both continue from step 2
    again = _torchrun(script, out, "rank0-resumes", 3)
    assert again.returncode == 0, again.stdout
    assert again.stdout.count("resuming from") == 2, again.stdout  # logged by rank 0, once per stage
    for stage in ("stage1", "stage2"):
        assert torch.load(out / stage / "checkpoints" / "last.pth", weights_only=True)["step"] == 3

    # each process writing its own folder (as on nodes without a shared filesystem): one clear error, no hang
    unshared = _torchrun(script, tmp_path / "unshared", "unshared", 2)
    assert unshared.returncode != 0
    assert "rank 1 stopped: UserInputError: rank 1" in unshared.stdout, unshared.stdout
    assert "filesystem shared by all nodes" in unshared.stdout
    assert "rank 0 stopped: UserInputError" in unshared.stdout  # rank 0 stops too, instead of waiting
