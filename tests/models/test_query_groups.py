"""Group-DETR query groups (train.query_groups): training only, official checkpoints, per-group matching."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from detr_panoptic.config import config_from_dict
from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.matcher import HungarianMatcher, QuerySelector
from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.models.postprocess import PanopticPostProcessor, PostprocessSettings
from detr_panoptic.models.transformer import group_attention_mask
from detr_panoptic.utils.errors import UserInputError

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 5, "dropout": 0.0, "aux_loss": True}


def _model(seed: int = 0) -> PanopticDETR:
    torch.manual_seed(seed)
    return PanopticDETR(3, **TINY)


def _targets(h: int = 64, w: int = 96):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 40:, :] = True
    masks[1, 5:25, 10:40] = True
    boxes = torch.tensor([[0, 40, w, h], [10, 5, 40, 25]], dtype=torch.float)
    return [{"labels": torch.tensor([0, 2]), "masks": masks,
             "boxes": box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([w, h, w, h])}]


def _step(model: PanopticDETR, image: torch.Tensor):
    criterion = build_criterion(3, aux_loss=True, num_decoder_layers=2)
    targets = _targets()
    selector = QuerySelector(criterion.matcher, targets)
    out = model(image[None], mask_queries=selector)
    losses = criterion(out, targets, indices=selector.indices)
    total = criterion.weighted_total(losses)
    total.backward()
    return out, losses, selector.indices


def test_one_group_is_todays_model_bit_for_bit():
    image = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(3))
    plain, grouped = _model(), _model().enable_query_groups(1)
    assert grouped.group_query_embed is None and set(plain.state_dict()) == set(grouped.state_dict())
    out_a, losses_a, _ = _step(plain, image)
    out_b, losses_b, _ = _step(grouped, image)
    assert torch.equal(out_a.pred_logits, out_b.pred_logits) and torch.equal(out_a.pred_masks, out_b.pred_masks)
    assert all(torch.equal(losses_a[k], losses_b[k]) for k in losses_a)
    for (name, p), q in zip(plain.named_parameters(), grouped.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    # the global random stream is untouched by enabling groups
    torch.manual_seed(5)
    _model().enable_query_groups(3)
    after = torch.rand(1)
    torch.manual_seed(5)
    _model()
    assert torch.equal(after, torch.rand(1))


def test_two_groups_train_with_twice_the_queries_and_per_group_matching():
    model = _model().enable_query_groups(2)
    image = torch.randn(3, 64, 96)
    out, losses, indices = _step(model, image)
    assert out.pred_logits.shape == (1, 10, 4) and out.pred_boxes.shape == (1, 10, 4)
    assert out.query_groups == 2 and all(a.query_groups == 2 for a in out.aux_outputs)
    rows, cols = indices[0]
    # each target once per group: one query in 0..4 and one in 5..9 per target
    assert sorted(cols.tolist()) == [0, 0, 1, 1]
    assert ((rows < 5).sum(), (rows >= 5).sum()) == (2, 2)
    assert out.pred_masks.shape[0] == 4  # masks of the matched queries of both groups
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.group_query_embed.grad is not None and model.group_query_embed.grad.abs().sum() > 0
    assert model.detr.query_embed.weight.grad.abs().sum() > 0
    # eval mode: the official queries alone
    model.eval()
    with torch.no_grad():
        assert model(image[None]).pred_logits.shape == (1, 5, 4)


def test_self_attention_stays_within_each_group():
    mask = group_attention_mask(6, 2)
    assert mask[:3, :3].all() and mask[3:, 3:].all() and not mask[:3, 3:].any() and not mask[3:, :3].any()
    with pytest.raises(ValueError):
        group_attention_mask(5, 2)
    # changing the second group's queries changes nothing in the first group's outputs
    model = _model().enable_query_groups(2)
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        first = model(image).pred_logits[:, :5].clone()
        model.group_query_embed.add_(torch.randn_like(model.group_query_embed))
        again = model(image)
    assert torch.allclose(first, again.pred_logits[:, :5], atol=1e-6)
    # and the first group's outputs are the official queries' outputs without groups
    with torch.no_grad():
        model.query_groups, saved = 1, model.group_query_embed
        alone = model(image).pred_logits
        model.query_groups = 2
    assert torch.allclose(first, alone, atol=1e-5)
    assert saved is model.group_query_embed


def test_checkpoint_keys_and_inference_unchanged():
    plain = _model()
    grouped = _model().enable_query_groups(3)
    assert set(grouped.state_dict()) == set(plain.state_dict())
    assert "group_query_embed" in dict(grouped.named_parameters())
    # official weights load into a grouped model (groups kept) and a grouped model's weights into a plain one
    grouped.load_state_dict(plain.state_dict())
    assert grouped.group_query_embed is not None
    fresh = _model(seed=1)
    fresh.load_state_dict(grouped.state_dict())
    image = torch.randn(3, 64, 96)
    is_thing = torch.tensor([False, True, True])
    processor = PanopticPostProcessor(is_thing, settings=PostprocessSettings(threshold=0.0))
    with torch.inference_mode():
        a = processor(plain.eval()([image], mask_queries=processor.kept_queries))[0]
        b = processor(grouped.eval()([image], mask_queries=processor.kept_queries))[0]
    assert torch.equal(a.id_map, b.id_map) and a.segments_info == b.segments_info


def test_matcher_and_criterion_average_over_groups():
    # two identical groups: the grouped losses equal one group's
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 4, 4), torch.rand(1, 4, 4) * 0.5 + 0.25
    one = DETROutput(pred_logits=logits, pred_boxes=boxes)
    two = DETROutput(pred_logits=logits.repeat(1, 2, 1), pred_boxes=boxes.repeat(1, 2, 1), query_groups=2)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])}]
    matcher = HungarianMatcher()
    rows1, cols1 = matcher(one, targets)[0]
    rows2, cols2 = matcher(two, targets)[0]
    assert rows2.tolist() == rows1.tolist() + (rows1 + 4).tolist() and cols2.tolist() == cols1.tolist() * 2
    criterion = build_criterion(3, masks=False)
    a, b = criterion(one, targets), criterion(two, targets)
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_config_field_is_validated():
    assert config_from_dict({}).train.query_groups == 1
    assert config_from_dict({"train": {"query_groups": 3}}).train.query_groups == 3
    with pytest.raises(UserInputError, match="query_groups"):
        config_from_dict({"train": {"query_groups": 0}})


def test_training_only_state_round_trips_outside_the_official_keys():
    """``training_only`` parameters and modules (the extra query groups; any module a training feature
    registers) stay out of ``state_dict`` and round-trip through ``training_state_dict``."""
    model = _model().enable_query_groups(2)
    official = set(_model().state_dict())
    model.extra_head = torch.nn.Linear(4, 3)  # a training-only module, as a feature would register one
    model.training_only.add("extra_head")
    assert set(model.state_dict()) == official
    state = model.training_state_dict()
    assert set(state) == {"group_query_embed", "extra_head.weight", "extra_head.bias"}
    other = _model(seed=1).enable_query_groups(2)
    other.extra_head = torch.nn.Linear(4, 3)
    other.training_only.add("extra_head")
    other.load_state_dict(model.state_dict())  # strict: the training-only keys are not missing
    other.load_training_state_dict(state)
    for key, value in other.training_state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="query_groups"):
        _model().enable_query_groups(3).load_training_state_dict(
            {"group_query_embed": state["group_query_embed"], "extra_head.weight": state["extra_head.weight"]})
    with pytest.raises(ValueError, match="shape"):
        _model().enable_query_groups(3).load_training_state_dict({"group_query_embed": state["group_query_embed"]})
