"""Fixtures for the engine tests; the toy data lives in tests/engine/toys.py."""
from __future__ import annotations

import pytest
import torch

from tests.engine.toys import toy_datasets


@pytest.fixture
def toy():
    return toy_datasets()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP barriers make 2 threads 10-30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
