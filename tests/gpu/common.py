"""Tiny models, toy batches and one training step shared by the GPU tests (CPU vs CUDA comparisons)."""
from __future__ import annotations

import copy
from typing import Any

import torch

from detr_panoptic.data.coco_panoptic import collate
from detr_panoptic.engine.trainer import EpochBatches, RunState, Trainer
from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.detr import PanopticDETR
from tests.engine.toys import TOY_CATEGORIES, ToyPanoptic

NUM_CLASSES = TOY_CATEGORIES.num_classes
# dropout 0: CPU and CUDA draw different random masks, so a comparison must not depend on them
TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 8, "dropout": 0.0, "aux_loss": True}


def tiny_model(seed: int = 0) -> PanopticDETR:
    torch.manual_seed(seed)
    return PanopticDETR(NUM_CLASSES, **TINY)


def make_trainer(model: PanopticDETR, device: torch.device, *, amp: str = "none", dataset=None,
                 workers: int = 0, pin_memory: bool = False, wrap=None) -> Trainer:
    """A ``Trainer`` around ``model`` (moved to ``device``) as ``engine.training`` builds one: AdamW on the
    trainable parameters, matched-only masks, gradient clipping 0.1. ``wrap(model)`` (e.g. DDP) is what
    the trainer runs."""
    model = model.to(device).train()
    criterion = build_criterion(NUM_CLASSES, aux_loss=True, num_decoder_layers=TINY["dec_layers"]).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    dataset = dataset if dataset is not None else ToyPanoptic(4)
    batches = EpochBatches(dataset, batch_size=2, seed=0, workers=workers, pin_memory=pin_memory)
    state = RunState(steps_per_epoch=batches.steps_per_epoch, total_steps=batches.steps_per_epoch)
    return Trainer(model=wrap(model) if wrap else model, criterion=criterion, optimizer=optimizer, scheduler=None,
                   batches=batches, state=state, device=device, clip_max_norm=0.1, amp=amp)


def toy_batch(size: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    dataset = ToyPanoptic(size, seed=seed)
    return collate([dataset[i] for i in range(size)])


def step_losses(model: PanopticDETR, device: torch.device, amp: str = "none", steps: int = 2,
                wrap=None) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Losses of ``steps`` optimizer steps on the same toy batch (a copy of ``model`` on ``device``), and the
    final parameters on the CPU."""
    trainer = make_trainer(copy.deepcopy(model), device, amp=amp, wrap=wrap)
    batch = toy_batch()
    records = [trainer.step([batch]) for _ in range(steps)]
    params = {n: p.detach().float().cpu() for n, p in trainer.unwrapped_model.named_parameters()}
    return records, params
