"""Comparing predictors' results."""
from __future__ import annotations

import pytest
import torch


def assert_same_results(expected, actual):
    """Same id maps and segments; scores and boxes to float rounding (they come from the logits)."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert torch.equal(e.id_map, a.id_map)
        assert len(e.segments_info) == len(a.segments_info)
        for es, as_ in zip(e.segments_info, a.segments_info):
            assert {k: v for k, v in es.items() if k != "score"} == {k: v for k, v in as_.items() if k != "score"}
            assert as_["score"] == pytest.approx(es["score"], abs=1e-5)
        assert torch.equal(e.kept.indices, a.kept.indices) and torch.equal(e.kept.category_ids, a.kept.category_ids)
        torch.testing.assert_close(a.kept.boxes, e.kept.boxes, rtol=1e-4, atol=1e-3)
