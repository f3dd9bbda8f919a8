"""AdamW with backbone / other parameter groups, and the learning-rate schedule.

The schedule is a ``LambdaLR`` stepped once per optimizer step (so it resumes from its state dict
exactly): an optional linear warm-up times one of

* ``step``: the reference StepLR, ``lr * drop_factor ** (epoch // lr_drop_epochs)`` with
  ``epoch = step // steps_per_epoch``;
* ``cosine``: ``0.5 * (1 + cos(pi * step / total_steps))``;
* ``constant``;
* ``wsd`` (warm-up, stable, decay): 1 until the last ``decay_steps`` steps, then
  ``0.5 * (1 + cos(pi * (step - (total_steps - decay_steps)) / decay_steps))`` down to 0. Its stable part
  does not depend on ``total_steps``, so a run can be lengthened while it is in that part (resume it with a
  larger ``train.max_steps``) and ends exactly as a run configured that long from the start.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from detr_panoptic.engine.freezing import parameter_part
from detr_panoptic.utils.errors import UserInputError


def parameter_groups(model: nn.Module, *, lr: float, lr_backbone: float) -> list[dict]:
    """Trainable parameters split into ``other`` (lr) and ``backbone`` (lr_backbone) groups.

    Frozen parameters and, when ``lr_backbone`` is 0, the backbone are left out; empty groups too.
    """
    backbone, other = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (backbone if parameter_part(name) == "backbone" else other).append(param)
    groups = []
    if other and lr > 0:
        groups.append({"params": other, "lr": lr, "name": "other"})
    if backbone and lr_backbone > 0:
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    return groups


def build_optimizer(model: nn.Module, *, lr: float, lr_backbone: float, weight_decay: float) -> torch.optim.AdamW:
    if lr < 0 or lr_backbone < 0 or weight_decay < 0:
        raise UserInputError(f"train.lr ({lr}), train.lr_backbone ({lr_backbone}) and train.weight_decay "
                             f"({weight_decay}) must be >= 0")
    groups = parameter_groups(model, lr=lr, lr_backbone=lr_backbone)
    if not groups:
        raise UserInputError("nothing to train: every parameter is frozen or has learning rate 0 "
                             "(check the freeze section, train.lr and train.lr_backbone)")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, *, scheduler: str, steps_per_epoch: int, total_steps: int, lr_drop_epochs: int,
              lr_drop_factor: float, warmup_steps: int, decay_steps: int = 0) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    if scheduler == "step":
        epoch = step // max(steps_per_epoch, 1)
        factor *= lr_drop_factor ** (epoch // max(lr_drop_epochs, 1))
    elif scheduler == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    elif scheduler == "wsd":
        if not 0 < decay_steps <= total_steps:
            raise UserInputError(f"train.scheduler wsd needs 0 < train.decay_steps <= the run's steps "
                                 f"({total_steps}), got {decay_steps}")
        into_decay = min(step, total_steps) - (total_steps - decay_steps)
        if into_decay > 0:
            factor *= 0.5 * (1.0 + math.cos(math.pi * into_decay / decay_steps))
    elif scheduler != "constant":
        raise UserInputError(f"train.scheduler must be step, cosine, constant or wsd, got {scheduler!r}")
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, scheduler: str = "step", steps_per_epoch: int,
                    total_steps: int, lr_drop_epochs: int = 200, lr_drop_factor: float = 0.1,
                    warmup_steps: int = 0, decay_steps: int = 0) -> LambdaLR:
    factor = partial(lr_factor, scheduler=scheduler, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                     lr_drop_epochs=lr_drop_epochs, lr_drop_factor=lr_drop_factor, warmup_steps=warmup_steps,
                     decay_steps=decay_steps)
    factor(0)  # validate the options now, not at the first step
    return LambdaLR(optimizer, factor)
