"""The training data loader with worker processes and pinned memory feeds the GPU."""
from __future__ import annotations

import math

import torch

from tests.engine.toys import ToyPanoptic
from tests.gpu.common import make_trainer, tiny_model


def test_workers_and_pinned_memory_feed_a_cuda_step(cuda):
    dataset = ToyPanoptic(8)
    trainer = make_trainer(tiny_model(), cuda, dataset=dataset, workers=2, pin_memory=True)
    batches = list(trainer.batches.iterate(0))
    assert len(batches) == trainer.batches.micro_batches_per_epoch == 4
    images, targets = batches[0]
    assert all(image.is_pinned() for image in images)
    assert all(t["masks"].is_pinned() and t["boxes"].is_pinned() for t in targets)
    # the same items as a single-process, unpinned loader (workers change nothing but the speed)
    plain = make_trainer(tiny_model(), torch.device("cpu"), dataset=dataset, workers=0).batches.iterate(0)
    for (images_w, targets_w), (images_p, targets_p) in zip(batches, plain):
        for a, b in zip(images_w, images_p):
            assert torch.equal(a, b)
        assert [t["image_id"] for t in targets_w] == [t["image_id"] for t in targets_p]
    record = trainer.step([batches[0]])
    assert all(math.isfinite(v) for v in record.values())
    trainer.state.total_steps = 2
    trainer.train()  # the loop itself: two steps read through the pinned, multi-worker loader
    assert trainer.state.step == 2
    assert next(trainer.unwrapped_model.parameters()).device.type == "cuda"
