"""Fixtures for the engine tests; the toy data lives in tests/engine/toys.py."""
from __future__ import annotations

import pytest

from tests.engine.toys import toy_datasets


@pytest.fixture
def toy():
    return toy_datasets()


@pytest.fixture(autouse=True)
def _engine_tests_use_one_thread(one_thread):
    """Every engine test runs with one intra-op thread (the fixture lives in tests/conftest.py)."""
