"""Parameter groups and the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_panoptic.engine.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from detr_panoptic.utils.errors import UserInputError


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detr = nn.Module()
        self.detr.backbone = nn.Linear(2, 2)
        self.detr.class_embed = nn.Linear(2, 3)
        self.mask_head = nn.Linear(2, 1)


def test_backbone_group_only_with_positive_lr_and_trainable():
    model = _Model()
    groups = parameter_groups(model, lr=1e-4, lr_backbone=1e-5)
    assert [g["name"] for g in groups] == ["other", "backbone"]
    assert groups[1]["lr"] == 1e-5 and len(groups[1]["params"]) == 2
    assert [g["name"] for g in parameter_groups(model, lr=1e-4, lr_backbone=0.0)] == ["other"]
    model.mask_head.weight.requires_grad_(False)
    other = parameter_groups(model, lr=1e-4, lr_backbone=0.0)[0]["params"]
    assert all(p is not model.mask_head.weight for p in other) and len(other) == 3


def test_nothing_to_train_is_a_user_error():
    model = _Model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserInputError, match="nothing to train"):
        build_optimizer(model, lr=1e-4, lr_backbone=0.0, weight_decay=1e-4)


def test_step_schedule_drops_per_epoch_and_warmup_ramps():
    kw = {"scheduler": "step", "steps_per_epoch": 10, "total_steps": 100, "lr_drop_epochs": 3, "lr_drop_factor": 0.1}
    assert lr_factor(29, warmup_steps=0, **kw) == 1.0
    assert lr_factor(30, warmup_steps=0, **kw) == pytest.approx(0.1)
    assert lr_factor(60, warmup_steps=0, **kw) == pytest.approx(0.01)
    assert lr_factor(0, warmup_steps=4, **kw) == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, **kw) == 1.0
    cos = {**kw, "scheduler": "cosine"}
    assert lr_factor(50, warmup_steps=0, **cos) == pytest.approx(0.5)
    assert lr_factor(100, warmup_steps=0, **cos) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserInputError, match="scheduler"):
        lr_factor(0, warmup_steps=0, **{**kw, "scheduler": "linear"})


def test_scheduler_resumes_from_its_state_dict():
    def make():
        model = _Model()
        opt = build_optimizer(model, lr=1.0, lr_backbone=0.0, weight_decay=0.0)
        return opt, build_scheduler(opt, scheduler="cosine", steps_per_epoch=5, total_steps=20, warmup_steps=3)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())  # the optimizer state carries the current lr
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 20)))


def test_wsd_schedule_stable_then_cosine_decay():
    kw = {"scheduler": "wsd", "steps_per_epoch": 10, "lr_drop_epochs": 3, "lr_drop_factor": 0.1, "warmup_steps": 4}
    assert lr_factor(1, total_steps=100, decay_steps=20, **kw) == pytest.approx(0.5)
    assert lr_factor(80, total_steps=100, decay_steps=20, **kw) == 1.0
    assert lr_factor(90, total_steps=100, decay_steps=20, **kw) == pytest.approx(0.5)
    assert lr_factor(100, total_steps=100, decay_steps=20, **kw) == pytest.approx(0.0, abs=1e-12)
    # the stable part does not depend on the run's length
    assert [lr_factor(s, total_steps=100, decay_steps=20, **kw) for s in range(81)] == \
        [lr_factor(s, total_steps=5000, decay_steps=20, **kw) for s in range(81)]
    for bad in (0, 101):
        with pytest.raises(UserInputError, match="decay_steps"):
            lr_factor(0, total_steps=100, decay_steps=bad, **kw)


def test_wsd_run_lengthened_on_resume_equals_the_long_run():
    """Resumed in its stable part with a larger total, a wsd schedule continues as if configured so."""
    def make(total):
        opt = build_optimizer(_Model(), lr=1.0, lr_backbone=0.0, weight_decay=0.0)
        return opt, build_scheduler(opt, scheduler="wsd", steps_per_epoch=5, total_steps=total, warmup_steps=3,
                                    decay_steps=10)

    def run(opt, sched, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    long_opt, long_sched = make(60)
    expected = run(long_opt, long_sched, 60)
    short_opt, short_sched = make(30)
    first = run(short_opt, short_sched, 15)  # stopped (killed) in the stable part of the 30-step run
    opt, sched = make(60)
    opt.load_state_dict(short_opt.state_dict())
    sched.load_state_dict(short_sched.state_dict())
    assert first + run(opt, sched, 45) == pytest.approx(expected)
    assert expected[50] == 1.0 and expected[56] < 0.5


def test_mixed_precision_per_device():
    from detr_panoptic.engine.trainer import autocast_dtype

    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # bf16 autocast on the CPU too
    with pytest.raises(UserInputError, match=r"train\.amp: fp16 is not supported on the CPU"):
        autocast_dtype("fp16", torch.device("cpu"))
    assert autocast_dtype("none", torch.device("cpu")) is None
    assert autocast_dtype("fp16", torch.device("cuda", 0)) is torch.float16
    assert autocast_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16
    with pytest.raises(UserInputError, match="amp"):
        autocast_dtype("fp8", torch.device("cpu"))
