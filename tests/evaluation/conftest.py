"""Fixtures for the evaluation tests; the generated cases live in tests/evaluation/pq_cases.py."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.evaluation.pq_cases import Case, generate_case


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., Case]:
    def make(seed: int = 0, **kwargs: Any) -> Case:
        return generate_case(seed, **kwargs).write(tmp_path / f"case{seed}")
    return make
