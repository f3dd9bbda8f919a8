"""Training-only query branches: denoising (DN-DETR) and one-to-many matching (H-DETR)."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.denoising import DenoisingQueries, noised_boxes, noised_labels, sine_box_encoding
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.matcher import QuerySelector
from detr_panoptic.models.one_to_many import OneToManyOutput, OneToManyQueries, repeated_targets
from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.models.query_branches import branch_loss_weights, compose_queries

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 5, "dropout": 0.0, "aux_loss": True}


def _model(seed: int = 0) -> PanopticDETR:
    torch.manual_seed(seed)
    return PanopticDETR(3, **TINY)


def _targets(h: int = 64, w: int = 96):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 40:, :] = True
    masks[1, 5:25, 10:40] = True
    masks[2, 8:30, 50:90] = True
    boxes = torch.tensor([[0, 40, w, h], [10, 5, 40, 25], [50, 8, 90, 30]], dtype=torch.float)
    one = {"labels": torch.tensor([0, 2, 1]), "masks": masks,
           "boxes": box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([w, h, w, h])}
    two = {k: v[:1] for k, v in one.items()}  # fewer targets: padding denoising queries
    return [one, two]


def _with_branches(model: PanopticDETR) -> PanopticDETR:
    model.add_query_branch(DenoisingQueries(3, 32, groups=2))
    return model.add_query_branch(OneToManyQueries(10, 32, repeats=2))


def _forward(model: PanopticDETR, images: torch.Tensor, targets, *, branches: bool):
    criterion = build_criterion(3, aux_loss=True, num_decoder_layers=2)
    selector = QuerySelector(criterion.matcher, targets)
    out = model(images, mask_queries=selector, targets=targets if branches else None)
    return out, criterion(out, targets, indices=selector.indices)


@pytest.mark.parametrize("groups", [1, 3])
def test_branches_leave_the_model_queries_unchanged(groups):
    """The model's queries never see a branch: with the branches, their outputs, matching, masks and losses are
    those of the model without them (equal up to float rounding: the attention runs over more keys)."""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    targets = _targets()
    model = _with_branches(_model().enable_query_groups(groups)).train()
    plain_out, plain_losses = _forward(model, images, targets, branches=False)
    out, losses = _forward(model, images, targets, branches=True)
    assert plain_out.branches == {} and set(out.branches) == {"dn", "o2m"}
    torch.testing.assert_close(out.pred_logits, plain_out.pred_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred_boxes, plain_out.pred_boxes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred_masks, plain_out.pred_masks, rtol=1e-5, atol=1e-5)
    assert [q.tolist() for q in out.mask_queries] == [q.tolist() for q in plain_out.mask_queries]
    for name, value in plain_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    extra = sorted(set(losses) - set(plain_losses))
    assert extra == sorted(f"loss_{b}_{k}{s}" for b in ("dn", "o2m") for k in ("ce", "bbox", "giou") for s in ("", "_0"))
    dn, o2m = out.branches["dn"], out.branches["o2m"]
    assert dn.class_logits.shape == (2, 2, 2 * 3, 4) and o2m.boxes.shape == (2, 2, 10, 4)  # [L, B, n, *]
    # and gradients reach the branches' own parameters
    sum(losses[k] for k in extra).backward()
    for name, param in model.query_branches.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_eval_mode_and_no_targets_run_the_official_queries_only():
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    plain = _model().eval()
    branched = _with_branches(_model().enable_query_groups(2)).eval()
    with torch.no_grad():
        a = plain(images)
        b = branched(images, targets=_targets()[:1])
    assert b.branches == {} and torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_masks, b.pred_masks)
    assert set(branched.state_dict()) == set(plain.state_dict())  # checkpoints: the official keys only
    assert {k.split(".")[1] for k in branched.training_state_dict() if k.startswith("query_branches.")} == {"dn", "o2m"}


def test_the_attention_mask_keeps_branches_apart():
    main = torch.zeros(4, 8)
    group_mask = torch.eye(2, dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)
    branches = [DenoisingQueries(3, 8, groups=2), OneToManyQueries(3, 8, repeats=1)]
    plan = compose_queries(main, group_mask, branches, _targets(), batch_size=2)
    mask = plan.self_mask
    assert mask.shape == (4 + 2 * 3 + 3,) * 2 and plan.position.shape == (2, 13, 8)
    assert torch.equal(mask[:4, :4], group_mask) and not mask[:4, 4:].any()  # the model sees no branch
    dn, o2m = slice(4, 10), slice(10, 13)
    assert mask[dn, :4].all() and not mask[o2m, :4].any()  # denoising sees the model's queries, o2m does not
    assert not mask[dn, o2m].any() and not mask[o2m, dn].any()
    assert mask[4:7, 4:7].all() and not mask[4:7, 7:10].any()  # denoising groups see only themselves
    assert mask[o2m, o2m].all()
    assert torch.equal(plan.content[:, :4], torch.zeros(2, 4, 8)) and torch.equal(plan.content[:, 10:], torch.zeros(2, 3, 8))


def test_noise_stays_in_range_and_zero_noise_is_the_identity():
    torch.manual_seed(0)
    boxes = torch.rand(200, 4) * 0.5 + 0.25
    noised = noised_boxes(boxes, 0.4)
    assert ((noised[:, :2] - boxes[:, :2]).abs() <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()
    ratio = noised[:, 2:] / boxes[:, 2:]
    assert ((ratio >= 0.6 - 1e-6) & (ratio <= 1.4 + 1e-6)).all() and not torch.equal(noised, boxes)
    assert torch.equal(noised_boxes(boxes, 0.0), boxes)
    labels = torch.randint(0, 5, (2000,))
    assert torch.equal(noised_labels(labels, 0.0, 5), labels)
    flipped = (noised_labels(labels, 0.5, 5) != labels).float().mean()
    assert 0.3 < flipped < 0.5  # half are redrawn, 4 in 5 of those to another class
    assert sine_box_encoding(torch.rand(3, 4), 6).shape == (3, 24)
    assert noised_boxes(torch.zeros(0, 4), 0.4).shape == (0, 4)


def test_denoising_losses_vanish_for_a_perfect_reconstruction():
    targets = _targets()
    branch = DenoisingQueries(3, 8, groups=2, label_noise=0.5)
    queries = branch.queries(targets, 2, torch.device("cpu"))
    layout = queries.about
    assert (layout.groups, layout.per_group, layout.counts) == (2, 3, [3, 1])
    boxes = torch.full((1, 2, 6, 4), 0.5)
    logits = torch.zeros(1, 2, 6, 4)
    for b, (q, t) in enumerate(layout.indices(torch.device("cpu"))):
        boxes[0, b, q] = targets[b]["boxes"][t]
        logits[0, b, q, targets[b]["labels"][t]] = 50.0
    losses = branch.output(logits, boxes, queries).losses(build_criterion(3), targets, num_boxes=4.0)
    assert set(losses) == {"loss_dn_ce", "loss_dn_bbox", "loss_dn_giou"}
    assert all(float(v) < 1e-6 for v in losses.values()), losses
    boxes[0, 0, 0] += 0.1  # one box off by 0.1 in each coordinate: L1 0.4 / (2 groups x 4 boxes)
    losses = branch.output(logits, boxes, queries).losses(build_criterion(3), targets, num_boxes=4.0)
    assert float(losses["loss_dn_bbox"]) == pytest.approx(0.4 / 8, rel=1e-5)


def test_one_to_many_with_one_repeat_is_the_one_to_one_loss():
    torch.manual_seed(2)
    logits, boxes = torch.randn(2, 2, 6, 4), torch.rand(2, 2, 6, 4) * 0.5 + 0.25
    targets = _targets()
    criterion = build_criterion(3, aux_loss=True, num_decoder_layers=2, masks=False)
    ours = OneToManyOutput(logits, boxes, repeats=1).losses(criterion, targets, num_boxes=4.0)  # 3 + 1 targets
    aux = DETROutput(pred_logits=logits[0], pred_boxes=boxes[0])
    reference = criterion(DETROutput(pred_logits=logits[1], pred_boxes=boxes[1], aux_outputs=[aux]), targets)
    reference = {k: v for k, v in reference.items() if k.startswith("loss_")}
    assert len(reference) == 6 and len(ours) == 6
    for name, value in reference.items():
        torch.testing.assert_close(ours[name.replace("loss_", "loss_o2m_")], value, msg=name)
    repeated = repeated_targets(targets, 3)
    assert repeated[0]["labels"].tolist() == [0, 2, 1] * 3 and repeated[1]["boxes"].shape == (3, 4)


def test_branch_losses_are_weighted_like_their_main_counterparts():
    weights = build_criterion(3, aux_loss=True, num_decoder_layers=3).weight_dict
    dn = branch_loss_weights(weights, "dn", 0.5)
    assert dn == {"loss_dn_ce": 0.5, "loss_dn_bbox": 2.5, "loss_dn_giou": 1.0, "loss_dn_ce_0": 0.5,
                  "loss_dn_bbox_0": 2.5, "loss_dn_giou_0": 1.0, "loss_dn_ce_1": 0.5, "loss_dn_bbox_1": 2.5,
                  "loss_dn_giou_1": 1.0}


def test_branches_leave_the_global_random_stream_alone_and_start_equal():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = DenoisingQueries(3, 16, groups=1)
    second = OneToManyQueries(4, 16, repeats=2)
    assert torch.equal(torch.rand(3), expected)
    again = DenoisingQueries(3, 16, groups=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert torch.equal(second.query_embed.weight, OneToManyQueries(4, 16, repeats=2).query_embed.weight)
