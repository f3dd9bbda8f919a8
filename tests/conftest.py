"""Shared test fixtures: the location of ../shared and a seeded RNG per test."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = (REPO_ROOT / ".." / "shared").resolve()
COCO_SAMPLE = SHARED / "data" / "coco_panoptic_sample"


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def coco_sample() -> Path:
    if not COCO_SAMPLE.is_dir():
        pytest.skip(f"the COCO panoptic sample is not at {COCO_SAMPLE} (../shared beside the repository)")
    return COCO_SAMPLE


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP barriers make 2 threads 10-30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
