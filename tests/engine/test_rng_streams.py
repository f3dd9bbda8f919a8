"""Loading a training item draws its augmentation from its own seeded CPU stream and leaves every other
random stream alone: the caller's CPU stream and, above all, the CUDA generators (GPU dropout)."""
from __future__ import annotations

import torch

from detr_panoptic.engine.trainer import SeededItems


class RandomItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)  # stands for a random augmentation


def test_items_are_seeded_per_item_without_touching_other_streams(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    items = SeededItems(RandomItems(), seed=1, epoch=0)
    torch.manual_seed(5)
    reseeded.clear()  # torch.manual_seed itself reseeds CUDA: only the loading is under test
    caller = torch.get_rng_state()
    first = [items[i] for i in range(4)]
    assert reseeded == []  # torch.manual_seed in the loader would reseed every CUDA generator per item
    assert torch.equal(torch.get_rng_state(), caller)  # the caller's stream continues as if nothing was drawn
    assert torch.equal(items[2], first[2]) and not torch.equal(first[1], first[2])  # per item, reproducible
    assert not torch.equal(SeededItems(RandomItems(), seed=1, epoch=1)[2], first[2])  # a new draw each epoch
