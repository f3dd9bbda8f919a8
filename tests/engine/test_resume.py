"""A run killed with SIGKILL and resumed ends with exactly the parameters of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # so that "tests.engine.toys" imports

RUNNER = """
import sys, threading, torch
sys.path.insert(0, {here!r})
from tests.engine.toys import tiny_config, toy_datasets
from detr_panoptic.engine import hooks
from detr_panoptic.engine.training import train_stage
from detr_panoptic.utils.logging import setup_logging

setup_logging()
stop_after = int(sys.argv[2])
if stop_after:  # the victim says where it is and stops there, so that the test kills it mid-run
    original = hooks.LRSchedulerHook.after_step
    def stopping_after_step(self, trainer, record):
        original(self, trainer, record)
        if record["step"] >= stop_after:
            print("VICTIM STOPPED", record["step"], flush=True)
            threading.Event().wait()  # until SIGKILL
    hooks.LRSchedulerHook.after_step = stopping_after_step
config = tiny_config(sys.argv[1], train={{"epochs": 3, "checkpoint_every_steps": 1}}, data={{"workers": 1}})
train_stage(config, datasets=toy_datasets(6), evaluate=lambda model: {{"pq": 1.0}})
"""


def _run(script: Path, out: Path, stop_after: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(out), str(stop_after)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_parameters(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(here=str(REPO_ROOT)))
    reference = _run(script, tmp_path / "reference", 0)

    killed_dir = tmp_path / "killed"
    victim = _run(script, killed_dir, 4)
    output = []
    while not (output and output[-1].startswith("VICTIM STOPPED")) and victim.poll() is None:
        output.append(victim.stdout.readline())
    assert victim.poll() is None, "".join(output) + victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    at_kill = torch.load(killed_dir / "checkpoints" / "last.pth", weights_only=True)
    assert 1 <= at_kill["step"] < 9  # 6 images, batch 2, 3 epochs = 9 steps

    resumed = _run(script, killed_dir, 0)
    log_resumed = resumed.communicate(timeout=300)[0]
    log_reference = reference.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log_resumed
    assert reference.returncode == 0, log_reference
    assert f"resuming from {killed_dir / 'checkpoints' / 'last.pth'} at step {at_kill['step']}" in log_resumed

    final = torch.load(killed_dir / "checkpoints" / "last.pth", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "last.pth", weights_only=True)
    assert final["step"] == expected["step"] == 9
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    # the metrics file tells one consistent story: steps 1..9 once each, same losses
    steps = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == list(range(1, 10))
    assert [r["loss"] for r in train_steps] == [r["loss"] for r in ref_steps if r["kind"] == "train"]


class _Interrupt(Exception):
    pass


def test_resume_with_query_groups_is_exact(tmp_path, monkeypatch):
    """A run stopped after step 2 (last.pth saved) and resumed ends with the weights, the extra query groups
    and the Adam moments of the uninterrupted run; the checkpoints' model entry keeps the official keys."""
    from detr_panoptic.engine import training
    from detr_panoptic.engine.trainer import Hook
    from tests.engine.toys import tiny_config, toy_datasets

    def config(out):
        return tiny_config(out, train={"query_groups": 2, "max_steps": 4, "checkpoint_every_steps": 1,
                                       "lr_backbone": 1e-4})

    training.train_stage(config(tmp_path / "straight"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})

    class StopAfterStep2(Hook):
        def after_step(self, trainer, record):
            if trainer.state.step == 2:
                raise _Interrupt

    real_build_hooks = training.build_hooks
    monkeypatch.setattr(training, "build_hooks", lambda *a, **k: [*real_build_hooks(*a, **k), StopAfterStep2()])
    with pytest.raises(_Interrupt):
        training.train_stage(config(tmp_path / "resumed"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})
    monkeypatch.setattr(training, "build_hooks", real_build_hooks)
    stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)
    assert stopped["step"] == 2 and set(stopped["training_state"]) == {"group_query_embed"}
    training.train_stage(config(tmp_path / "resumed"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})

    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.pth", weights_only=True)
    assert final["step"] == expected["step"] == 4
    assert not any("group_query" in key for key in final["model"])
    assert not torch.equal(stopped["training_state"]["group_query_embed"],
                           final["training_state"]["group_query_embed"])  # the groups moved after the resume
    assert torch.equal(final["training_state"]["group_query_embed"], expected["training_state"]["group_query_embed"])
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
