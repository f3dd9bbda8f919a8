"""HungarianMatcher: the cost matches the reference formula pair by pair, the assignment is optimal."""
from __future__ import annotations

import itertools

import pytest
import torch

from detr_panoptic.models.matcher import HungarianMatcher, QuerySelector
from detr_panoptic.models.outputs import DETROutput


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def _giou_pair(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes, written out by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _reference_cost(logits, boxes, labels, target_boxes, wc=1.0, wb=5.0, wg=2.0):
    prob = logits.softmax(-1)
    cost = torch.zeros(logits.shape[0], len(labels), dtype=torch.float64)
    for q in range(logits.shape[0]):
        for t in range(len(labels)):
            l1 = sum(abs(float(boxes[q, k]) - float(target_boxes[t, k])) for k in range(4))
            giou = _giou_pair(boxes[q].tolist(), target_boxes[t].tolist())
            cost[q, t] = wb * l1 - wc * float(prob[q, labels[t]]) - wg * giou
    return cost


def test_cost_matrix_equals_pairwise_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    boxes = _random_boxes(5, g)
    labels = torch.tensor([0, 2, 2])
    target_boxes = _random_boxes(3, g)
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=5.0, cost_giou=2.0)
    got = matcher.cost_matrix(logits, boxes, labels, target_boxes)
    want = _reference_cost(logits, boxes, labels, target_boxes, wc=1.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_targets = 5, 3
    logits = torch.randn(2, num_queries, 4, generator=g)
    boxes = torch.stack([_random_boxes(num_queries, g) for _ in range(2)])
    targets = [{"labels": torch.randint(0, 3, (num_targets,), generator=g), "boxes": _random_boxes(num_targets, g)}
               for _ in range(2)]
    matcher = HungarianMatcher()
    indices = matcher(DETROutput(pred_logits=logits, pred_boxes=boxes), targets)
    for b, (rows, cols) in enumerate(indices):
        cost = _reference_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        assert len(rows) == len(cols) == num_targets
        assert sorted(cols.tolist()) == list(range(num_targets))
        got = sum(float(cost[r, c]) for r, c in zip(rows.tolist(), cols.tolist()))
        best = min(sum(float(cost[perm[t], t]) for t in range(num_targets))
                   for perm in itertools.permutations(range(num_queries), num_targets))
        assert got == pytest.approx(best, abs=1e-6)


def test_zero_targets_give_empty_matches():
    logits = torch.randn(2, 4, 3)
    boxes = torch.rand(2, 4, 4) * 0.5 + 0.25
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    indices = HungarianMatcher()(DETROutput(pred_logits=logits, pred_boxes=boxes), targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert indices[1][1].tolist() == [0]


def test_more_targets_than_queries_matches_every_query():
    logits = torch.randn(1, 2, 3)
    boxes = torch.rand(1, 2, 4) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25}]
    rows, cols = HungarianMatcher()(DETROutput(pred_logits=logits, pred_boxes=boxes), targets)[0]
    assert sorted(rows.tolist()) == [0, 1] and len(set(cols.tolist())) == 2


def test_non_finite_predictions_raise_floating_point_error():
    logits = torch.full((1, 3, 3), float("nan"))
    boxes = torch.rand(1, 3, 4)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(FloatingPointError, match="not finite"):
        HungarianMatcher()(DETROutput(pred_logits=logits, pred_boxes=boxes), targets)


def test_query_selector_returns_matched_queries_and_keeps_indices():
    logits = torch.randn(1, 6, 3)
    boxes = torch.rand(1, 6, 4) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    selector = QuerySelector(HungarianMatcher(), targets)
    queries = selector(DETROutput(pred_logits=logits, pred_boxes=boxes))
    assert selector.indices is not None
    assert queries[0].tolist() == selector.indices[0][0].tolist()


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)


def test_non_finite_costs_can_be_tolerated_for_training():
    logits = torch.full((1, 3, 3), float("nan"))
    boxes = torch.rand(1, 3, 4)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    rows, cols = HungarianMatcher(raise_on_nonfinite=False)(DETROutput(pred_logits=logits, pred_boxes=boxes), targets)[0]
    assert len(rows) == len(cols) == 2
