"""SetCriterion: equal to a per-pair re-implementation of the reference definitions, and the
matched-only (packed) mask path equals the all-queries path in values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detr_panoptic.models.criterion import build_criterion, select_matched_masks
from detr_panoptic.models.outputs import DETROutput

NUM_CLASSES = 4
EOS = 0.1


def _boxes(n, g):
    return torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)


def _case(seed, num_targets=(3, 2), num_queries=6, image_sizes=((24, 32), (20, 28)), aux=0):
    """Random predictions (leaf tensors) and targets; masks predicted at 1/4 of the padded batch."""
    g = torch.Generator().manual_seed(seed)
    batch = len(num_targets)
    pad_h = max(h for h, _ in image_sizes)
    pad_w = max(w for _, w in image_sizes)
    logits = torch.randn(batch, num_queries, NUM_CLASSES + 1, generator=g).requires_grad_()
    boxes = torch.stack([_boxes(num_queries, g) for _ in range(batch)]).requires_grad_()
    masks = torch.randn(batch, num_queries, pad_h // 4, pad_w // 4, generator=g).requires_grad_()
    targets = []
    for n, (h, w) in zip(num_targets, image_sizes):
        targets.append({
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": _boxes(n, g),
            "masks": torch.rand(n, h, w, generator=g) > 0.6,
        })
    aux_outputs = [DETROutput(pred_logits=torch.randn(batch, num_queries, NUM_CLASSES + 1, generator=g).requires_grad_(),
                              pred_boxes=torch.stack([_boxes(num_queries, g) for _ in range(batch)]).requires_grad_())
                   for _ in range(aux)]
    return logits, boxes, masks, targets, aux_outputs


# -- an independent, loop-by-loop version of the reference definitions -------------------------------
def _giou(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0) * \
        (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (torch.maximum(ax1, bx1) - torch.minimum(ax0, bx0)) * (torch.maximum(ay1, by1) - torch.minimum(ay0, by0))
    return inter / union - (hull - union) / hull


def _reference_losses(logits, boxes, masks, targets, indices):
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    # cross-entropy: weighted mean over every query of the batch
    num, den = 0.0, 0.0
    for b in range(logits.shape[0]):
        matched = {int(q): int(targets[b]["labels"][t]) for q, t in zip(*indices[b])}
        for q in range(logits.shape[1]):
            cls = matched.get(q, NUM_CLASSES)
            weight = EOS if cls == NUM_CLASSES else 1.0
            num = num - weight * torch.log_softmax(logits[b, q], -1)[cls]
            den += weight
    out = {"loss_ce": num / den}
    pad_h = max(t["masks"].shape[1] for t in targets)
    pad_w = max(t["masks"].shape[2] for t in targets)
    l1 = giou = focal = dice = 0.0
    for b in range(logits.shape[0]):
        for q, t in zip(indices[b][0].tolist(), indices[b][1].tolist()):
            l1 = l1 + sum((boxes[b, q, k] - targets[b]["boxes"][t, k]).abs() for k in range(4))
            giou = giou + 1 - _giou(boxes[b, q], targets[b]["boxes"][t])
            target = torch.zeros(pad_h, pad_w)
            h, w = targets[b]["masks"].shape[1:]
            target[:h, :w] = targets[b]["masks"][t].float()
            pred = F.interpolate(masks[b, q][None, None], size=(pad_h, pad_w), mode="bilinear",
                                 align_corners=False)[0, 0]
            p = pred.sigmoid()
            ce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
            p_t = p * target + (1 - p) * (1 - target)
            alpha_t = 0.25 * target + 0.75 * (1 - target)
            focal = focal + (alpha_t * ce * (1 - p_t) ** 2).mean()
            dice = dice + 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    zero = masks.sum() * 0
    out.update({"loss_bbox": l1 / num_boxes + zero, "loss_giou": giou / num_boxes + zero,
                "loss_mask": focal / num_boxes + zero, "loss_dice": dice / num_boxes + zero})
    return out


def _grads(losses, weight_dict, leaves):
    total = sum(weight_dict[k] * v for k, v in losses.items() if k in weight_dict)
    return torch.autograd.grad(total, leaves, allow_unused=True)


@pytest.mark.parametrize("seed,num_targets", [(0, (3, 2)), (1, (1, 4)), (2, (0, 3)), (3, (2, 2))])
def test_losses_and_gradients_equal_reference(seed, num_targets):
    logits, boxes, masks, targets, _ = _case(seed, num_targets)
    criterion = build_criterion(NUM_CLASSES, eos_coef=EOS)
    outputs = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks)
    indices = criterion.matcher(outputs, targets)
    got = criterion(outputs, targets)
    want = _reference_losses(logits, boxes, masks, targets, indices)
    assert set(got) == {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_accuracy", "class_error"}
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double().reshape(()), rtol=1e-5, atol=1e-6,
                                   msg=name)
    weights = criterion.weight_dict
    for g_got, g_want in zip(_grads(got, weights, [logits, boxes, masks]), _grads(want, weights, [logits, boxes, masks])):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed,num_targets", [(0, (3, 2)), (5, (0, 2)), (6, (4, 1))])
def test_matched_only_path_equals_all_queries_path(seed, num_targets):
    logits, boxes, all_masks, targets, _ = _case(seed, num_targets)
    criterion = build_criterion(NUM_CLASSES, eos_coef=EOS)
    outputs = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=all_masks)
    indices = criterion.matcher(outputs, targets)
    full = criterion(outputs, targets)
    # Packed: matched queries plus an extra unmatched one in image 0, in a shuffled order.
    mask_queries = []
    for b, (q, _) in enumerate(indices):
        extra = [i for i in range(logits.shape[1]) if i not in q.tolist()][:1] if b == 0 else []
        mask_queries.append(torch.tensor(list(reversed(q.tolist())) + extra, dtype=torch.long))
    packed = torch.cat([all_masks[b, mq] for b, mq in enumerate(mask_queries)])
    packed_out = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=packed, mask_queries=mask_queries)
    matched = criterion(packed_out, targets, indices=indices)
    for name in full:
        torch.testing.assert_close(matched[name], full[name], msg=name)
    leaves = [logits, boxes, all_masks]
    for g_full, g_matched in zip(_grads(full, criterion.weight_dict, leaves), _grads(matched, criterion.weight_dict, leaves)):
        torch.testing.assert_close(g_full, g_matched)


def test_all_images_without_targets_give_finite_zero_box_and_mask_losses():
    logits, boxes, masks, targets, _ = _case(0, (0, 0))
    criterion = build_criterion(NUM_CLASSES, eos_coef=EOS)
    losses = criterion(DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks), targets)
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    want_ce = -torch.log_softmax(logits, -1)[..., NUM_CLASSES].mean()  # every query targets no-object
    torch.testing.assert_close(losses["loss_ce"], want_ce)
    total = criterion.weighted_total(losses)
    total.backward()
    assert math.isfinite(total.item())


def test_aux_losses_named_and_weighted():
    logits, boxes, masks, targets, aux = _case(4, (2, 3), aux=2)
    criterion = build_criterion(NUM_CLASSES, aux_loss=True, num_decoder_layers=3, eos_coef=EOS, bbox_loss_coef=7.0)
    outputs = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks, aux_outputs=aux)
    losses = criterion(outputs, targets)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0", "loss_ce_1", "loss_bbox_1", "loss_giou_1"} <= set(losses)
    assert "loss_mask_0" not in losses
    assert criterion.weight_dict["loss_bbox_1"] == 7.0
    # an aux layer's losses equal the last layer's losses computed on that layer's outputs
    alone = build_criterion(NUM_CLASSES, eos_coef=EOS, masks=False)(aux[1], targets)
    torch.testing.assert_close(losses["loss_giou_1"], alone["loss_giou"])
    torch.testing.assert_close(losses["loss_ce_1"], alone["loss_ce"])
    total = criterion.weighted_total(losses)
    want = sum(criterion.weight_dict[k] * v for k, v in losses.items() if k.startswith("loss"))
    torch.testing.assert_close(total, want)


def test_packed_masks_missing_a_matched_query_is_an_error():
    masks = torch.randn(2, 3, 4)
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="no mask"):
        select_matched_masks(masks, [torch.tensor([0, 1])], indices)


def test_wrong_number_of_classes_is_reported():
    logits, boxes, masks, targets, _ = _case(0)
    criterion = build_criterion(NUM_CLASSES + 2)
    with pytest.raises(ValueError, match="classes"):
        criterion(DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks), targets)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_fused_mask_losses_equal_torchvision_focal_and_dice(scale):
    from detr_panoptic.models.criterion import dice_loss, focal_loss, sigmoid_mask_losses

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 300, generator=g) * scale).requires_grad_()
    targets = torch.rand(4, 300, generator=g) > 0.7
    targets[3] = False  # an empty target mask
    focal, dice = sigmoid_mask_losses(logits, targets)
    (grad_fused,) = torch.autograd.grad(2 * focal.sum() + 3 * dice.sum(), logits)
    want_focal = focal_loss(logits, targets.float(), 1.0)
    want_dice = dice_loss(logits, targets.float(), 1.0)
    (grad_ref,) = torch.autograd.grad(2 * want_focal + 3 * want_dice, logits)
    torch.testing.assert_close(focal.sum(), want_focal)
    torch.testing.assert_close(dice.sum(), want_dice)
    torch.testing.assert_close(grad_fused, grad_ref)
    assert torch.isfinite(grad_fused).all()


def test_other_gamma_uses_the_reference_formula():
    logits, boxes, masks, targets, _ = _case(0)
    criterion = build_criterion(NUM_CLASSES, eos_coef=EOS)
    outputs = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks)
    fused = criterion(outputs, targets)
    criterion.focal_gamma = 2.0 + 1e-9  # takes the torchvision path, numerically the same
    plain = criterion(outputs, targets)
    torch.testing.assert_close(fused["loss_mask"], plain["loss_mask"])


# -- the logged accuracy: the reference's class_error ---------------------------------------------------
def _reference_class_error(logits, targets, indices):
    """The reference ``loss_labels(..., log=True)``: the matched queries' logits gathered batch by batch,
    then ``100 - accuracy(src_logits[idx], target_classes_o)`` with precision@1 from ``topk``; 0 accuracy
    (class_error 100) when nothing is matched."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    matched = logits.detach()[batch_idx, src_idx]
    if target_classes_o.numel() == 0:
        return torch.tensor(100.0)
    _, pred = matched.topk(1, 1, True, True)
    correct = pred.t().eq(target_classes_o.view(1, -1).expand_as(pred.t()))
    return 100 - correct[:1].reshape(-1).float().sum(0) * (100.0 / target_classes_o.size(0))


@pytest.mark.parametrize("seed,num_targets", [(0, (3, 2)), (1, (1, 4)), (2, (0, 3)), (8, (0, 0)), (9, (5, 6))])
def test_class_error_equals_the_reference(seed, num_targets):
    logits, boxes, masks, targets, aux = _case(seed, num_targets, num_queries=8, aux=1)
    # Make some matched queries right: their target label gets a large logit, so accuracy is neither 0 nor 100.
    criterion = build_criterion(NUM_CLASSES, aux_loss=True, num_decoder_layers=2, eos_coef=EOS)
    outputs = DETROutput(pred_logits=logits, pred_boxes=boxes, pred_masks=masks, aux_outputs=aux)
    indices = criterion.matcher(outputs, targets)
    with torch.no_grad():
        for b, (q, t) in enumerate(indices):
            for query, target in list(zip(q.tolist(), t.tolist()))[::2]:
                logits[b, query, targets[b]["labels"][target]] += 10.0
    losses = criterion(outputs, targets, indices=indices)
    want = _reference_class_error(logits, targets, indices)
    torch.testing.assert_close(losses["class_error"], want.float())
    torch.testing.assert_close(losses["class_accuracy"], 100 - want.float())
    assert not losses["class_error"].requires_grad and "class_error" not in criterion.weight_dict
    total = sum(len(t["labels"]) for t in targets)
    if total > 1:
        assert 0 < losses["class_error"].item() < 100  # some right, some wrong: the fixture tests something
    if total == 0:
        assert losses["class_error"].item() == 100.0  # nothing matched, as the reference
    # the last layer's matching, not an auxiliary layer's
    aux_error = _reference_class_error(aux[0].pred_logits, targets, criterion.matcher(aux[0], targets))
    if total > 1 and not torch.isclose(aux_error, want):
        assert not torch.isclose(losses["class_error"], aux_error)
