"""models/dense_outputs.py: semantic maps and instances from the queries (Mask2Former's inference)."""
from __future__ import annotations

import math

import pytest
import torch

from detr_panoptic.models.dense_outputs import DenseOutputs, instances_from_queries, semantic_from_queries
from detr_panoptic.models.outputs import DETROutput


def output() -> DETROutput:
    """Two queries over 3 classes (+ no object) on an 8x8 mask grid: query 0 covers the left half and
    is class 0 (p 0.7) or class 2 (p ~0.2); query 1 covers the top-right quarter, class 1 (p ~0.8)."""
    logits = torch.log(torch.tensor([[[0.7, 0.05, 0.2, 0.05], [0.1, 0.8, 0.05, 0.05]]]))
    masks = torch.full((1, 2, 8, 8), -6.0)
    masks[0, 0, :, :4] = 3.0
    masks[0, 1, :4, 4:] = 2.0
    return DETROutput(pred_logits=logits, pred_boxes=torch.zeros(1, 2, 4), pred_masks=masks, input_size=(32, 32))


def test_semantic_is_the_argmax_of_probability_weighted_masks():
    classes = semantic_from_queries(output(), 0, torch.tensor([0, 1]), (32, 32), (16, 16))
    assert classes.shape == (16, 16)
    assert (classes[:, :7] == 0).all()          # query 0's class
    assert (classes[:7, 9:] == 1).all()         # query 1's class
    probabilities = torch.tensor([[0.7, 0.05, 0.2], [0.1, 0.8, 0.05]])
    corner = probabilities.T @ torch.sigmoid(torch.tensor([-6.0, -6.0]))
    assert int(classes[15, 15]) == int(corner.argmax())


def test_instances_are_ranked_query_class_pairs():
    is_thing = torch.tensor([True, True, True])
    found = instances_from_queries(output(), 0, torch.tensor([0, 1]), (32, 32), (16, 16), is_thing, top_k=3)
    assert [c for _, c, _ in found] == [1, 0, 2]  # p 0.8, 0.7, 0.2 (the same query twice)
    mask, _, score = found[0]
    assert mask[:7, 9:].all() and not mask[9:].any() and not mask[:, :7].any()  # bilinear edges: +-1 pixel
    # class probability x mean mask probability inside the mask (bilinear edges lower the mean a little)
    assert 0.8 * 0.8 < score < 0.8 * torch.sigmoid(torch.tensor(2.0)) + 1e-6
    only_stuff = instances_from_queries(output(), 0, torch.tensor([0, 1]), (32, 32), (16, 16),
                                        torch.tensor([False, False, True]), top_k=5)
    assert [c for _, c, _ in only_stuff] == [2, 2]
    assert math.isclose(only_stuff[0][2] / only_stuff[1][2], 0.2 / 0.05, rel_tol=0.2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="semantic"):
        DenseOutputs(semantic="argmax")
    assert DenseOutputs("queries").uses_queries and not DenseOutputs().uses_queries
