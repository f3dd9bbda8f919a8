"""panoptic_postprocess: the reference algorithm (quirks included), its three fixes, options and errors."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_panoptic.models.outputs import DETROutput
from detr_panoptic.models.postprocess import nearest_resize_ids, panoptic_postprocess

BIG = 10.0


def logits_for(labels: list[int], num_classes: int, confidence: float = BIG) -> torch.Tensor:
    """[1, Q, C+1] logits whose best class is ``labels[q]`` (C = no object) with high probability."""
    logits = torch.zeros(1, len(labels), num_classes + 1)
    for q, label in enumerate(labels):
        logits[0, q, label] = confidence
    return logits


def reference_panoptic(logits, masks, processed_size, target_size, is_thing, threshold):
    """The reference algorithm as NOTES.md describes it, written as plainly as possible (per image).

    Returns [(category, area)] per segment (reference ids are 0..n-1) and the id map at the target size.
    """
    num_classes = logits.shape[-1] - 1
    scores, classes = logits.softmax(-1).max(-1)
    keep = (classes != num_classes) & (scores > threshold)
    cur_scores, cur_classes = scores[keep], classes[keep]
    cur_masks = F.interpolate(masks[keep][:, None], size=processed_size, mode="bilinear", align_corners=False)[:, 0]
    h, w = processed_size
    stuff_equiv = defaultdict(list)
    for k, label in enumerate(cur_classes.tolist()):
        if not is_thing[label]:
            stuff_equiv[label].append(k)

    def ids_area(masks, scores, dedup=False):
        if masks.shape[0] == 0:
            m_id = torch.zeros(h, w, dtype=torch.long)
        else:
            m_id = masks.flatten(1).transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
        if dedup:
            for equiv in stuff_equiv.values():
                if len(equiv) > 1:
                    for eq_id in equiv:
                        m_id.masked_fill_(m_id.eq(eq_id), equiv[0])
        image = Image.fromarray(m_id.numpy().astype(np.int32), mode="I")
        resized = np.asarray(image.resize((target_size[1], target_size[0]), resample=Image.NEAREST))
        m_id = torch.from_numpy(resized.astype(np.int64))
        return [int(m_id.eq(i).sum()) for i in range(len(scores))], m_id

    area, id_map = ids_area(cur_masks, cur_scores, dedup=True)
    if cur_classes.numel() > 0:
        while True:
            small = torch.as_tensor([a <= 4 for a in area], dtype=torch.bool)
            if small.any():
                cur_scores, cur_classes, cur_masks = cur_scores[~small], cur_classes[~small], cur_masks[~small]
                area, id_map = ids_area(cur_masks, cur_scores)
            else:
                break
    return [(int(c), a) for c, a in zip(cur_classes.tolist(), area)], id_map


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_algorithm_on_random_predictions(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes, queries = 6, 15
    is_thing = torch.tensor([True, True, False, False, True, False])
    logits = torch.randn(1, queries, num_classes + 1, generator=generator) * 4
    logits[0, :4, 2] = 12  # several queries of stuff class 2: only the first should survive
    masks = torch.randn(1, queries, 9, 13, generator=generator) * 3
    processed, target = (35, 50), (53, 71)
    outputs = DETROutput(pred_logits=logits, pred_boxes=torch.rand(1, queries, 4), pred_masks=masks)
    result = panoptic_postprocess(outputs, [processed], [target], is_thing=is_thing, threshold=0.5)[0]
    expected_segments, expected_map = reference_panoptic(logits[0], masks[0], processed, target,
                                                         is_thing.tolist(), 0.5)
    assert [(s["category_id"], s["area"]) for s in result.segments_info] == expected_segments
    assert [s["id"] for s in result.segments_info] == list(range(1, len(expected_segments) + 1))
    if expected_segments:
        assert torch.equal(result.id_map, expected_map + 1)  # the fix: ids start at 1
        assert sum(1 for c, _ in expected_segments if c == 2) == 1
    assert result.id_map.shape == target


def test_nearest_resize_matches_pil():
    ids = torch.randint(0, 50, (13, 17))
    for size in [(13, 17), (40, 23), (5, 9), (26, 34)]:
        pil = Image.fromarray(ids.numpy().astype(np.int32), mode="I").resize((size[1], size[0]), Image.NEAREST)
        assert torch.equal(nearest_resize_ids(ids, size), torch.from_numpy(np.asarray(pil).astype(np.int64)))


def block_masks(regions: list[tuple[slice, slice]], size=(8, 8), low=-5.0) -> torch.Tensor:
    """[1, Q, H, W] mask logits: query q is high (its index-dependent value) on its region."""
    masks = torch.full((1, len(regions), *size), low)
    for q, (rows, cols) in enumerate(regions):
        masks[0, q, rows, cols] = 5.0
    return masks


def test_duplicate_stuff_queries_first_one_survives_and_argmax_reassigns():
    # classes: 0 thing, 1 stuff. q0 and q1 both stuff class 1 (left/right halves); q2 a thing in the middle
    # that is second-best on the right half: after q1 is dropped, the right half goes to q2, not to q0.
    masks = block_masks([(slice(None), slice(0, 4)), (slice(None), slice(4, 8)), (slice(0, 5), slice(3, 4))])
    masks[0, 2, :5, 3] = 6.0  # q2 wins 5 pixels of the left half (so it survives the first pass)
    masks[0, 2, :, 4:] = 4.0  # and is second best on the right half
    outputs = DETROutput(pred_logits=logits_for([1, 1, 0], 2), pred_boxes=torch.rand(1, 3, 4), pred_masks=masks)
    result = panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True, False]))[0]
    assert [(s["query"], s["category_id"], s["isthing"]) for s in result.segments_info] == [(0, 1, False), (2, 0, True)]
    assert [s["area"] for s in result.segments_info] == [27, 37]
    assert (result.id_map[:, :3] == 1).all() and (result.id_map[:, 4:] == 2).all()

    merged = panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True, False]), merge_stuff="merge")[0]
    assert [(s["query"], s["area"]) for s in merged.segments_info] == [(0, 59), (2, 5)]


def test_small_segments_are_removed_iteratively():
    # q1 wins exactly 4 pixels (removed), q2 wins 5 (kept)
    masks = block_masks([(slice(None), slice(None)), (slice(0, 2), slice(0, 2)), (slice(4, 5), slice(0, 5))])
    masks[0, 0] = 0.0
    outputs = DETROutput(pred_logits=logits_for([0, 0, 0], 1), pred_boxes=torch.rand(1, 3, 4), pred_masks=masks)
    result = panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True]))[0]
    assert [(s["query"], s["area"]) for s in result.segments_info] == [(0, 59), (2, 5)]
    assert result.id_map[:2, :2].eq(1).all()


def test_nothing_kept_gives_no_segments_and_an_all_void_map():
    logits = logits_for([3, 3], 3)  # best class is "no object"
    outputs = DETROutput(pred_logits=logits, pred_boxes=torch.rand(1, 2, 4), pred_masks=torch.randn(1, 2, 4, 4))
    result = panoptic_postprocess(outputs, [(16, 16)], [(20, 30)], is_thing=torch.ones(3, dtype=torch.bool))[0]
    assert result.segments_info == [] and result.id_map.shape == (20, 30) and not result.id_map.any()
    # below the threshold: not kept either
    low = DETROutput(pred_logits=logits_for([0], 3, confidence=1.0), pred_boxes=torch.rand(1, 1, 4),
                     pred_masks=torch.randn(1, 1, 4, 4))
    assert panoptic_postprocess(low, [(16, 16)], is_thing=torch.ones(3, dtype=torch.bool))[0].segments_info == []


def test_everything_removed_as_too_small_gives_no_segments():
    outputs = DETROutput(pred_logits=logits_for([0], 1), pred_boxes=torch.rand(1, 1, 4),
                         pred_masks=torch.randn(1, 1, 1, 1))
    result = panoptic_postprocess(outputs, [(2, 2)], is_thing=torch.tensor([True]))[0]
    assert result.segments_info == [] and result.id_map.tolist() == [[0, 0], [0, 0]]


def test_class_to_category_and_score_fields():
    masks = block_masks([(slice(None), slice(0, 4)), (slice(None), slice(4, 8))])
    outputs = DETROutput(pred_logits=logits_for([0, 1], 2), pred_boxes=torch.rand(1, 2, 4), pred_masks=masks)
    result = panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True, False]),
                                  class_to_category=torch.tensor([24, 7]))[0]
    assert [s["category_id"] for s in result.segments_info] == [24, 7]
    assert all(0.99 < s["score"] <= 1.0 for s in result.segments_info)
    assert set(result.segments_info[0]) == {"id", "category_id", "isthing", "area", "score", "query"}


def test_padded_batch_is_cropped_before_resizing():
    # Image 1 is 8x8 inside a 16x16 padded batch: its masks' valid part is the top-left 2x2 of the 4x4 grid.
    generator = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 3, 4, 4, generator=generator) * 3
    logits = torch.cat([logits_for([0, 1, 0], 2), logits_for([0, 1, 0], 2)])
    is_thing = torch.tensor([True, False])
    padded = DETROutput(pred_logits=logits, pred_boxes=torch.rand(2, 3, 4), pred_masks=masks, input_size=(16, 16))
    batch_result = panoptic_postprocess(padded, [(16, 16), (8, 8)], is_thing=is_thing, threshold=0.5)
    alone = DETROutput(pred_logits=logits[1:], pred_boxes=torch.rand(1, 3, 4), pred_masks=masks[1:, :, :2, :2])
    single_result = panoptic_postprocess(alone, [(8, 8)], is_thing=is_thing, threshold=0.5)[0]
    assert batch_result[1].segments_info == single_result.segments_info
    assert torch.equal(batch_result[1].id_map, single_result.id_map)
    stretched = DETROutput(pred_logits=logits, pred_boxes=torch.rand(2, 3, 4), pred_masks=masks)  # no crop
    stretched_result = panoptic_postprocess(stretched, [(16, 16), (8, 8)], is_thing=is_thing, threshold=0.5)
    assert not torch.equal(stretched_result[1].id_map, single_result.id_map)


def test_packed_masks_give_the_same_result_and_missing_masks_raise():
    generator = torch.Generator().manual_seed(3)
    masks = torch.randn(1, 4, 6, 6, generator=generator)
    logits = logits_for([0, 2, 1, 0], 2)  # q1: no object
    full = DETROutput(pred_logits=logits, pred_boxes=torch.rand(1, 4, 4), pred_masks=masks)
    packed = DETROutput(pred_logits=logits, pred_boxes=torch.rand(1, 4, 4), pred_masks=masks[0, [3, 0, 2]],
                        mask_queries=[torch.tensor([3, 0, 2])])
    is_thing = torch.tensor([True, False])
    a = panoptic_postprocess(full, [(12, 12)], is_thing=is_thing)[0]
    b = panoptic_postprocess(packed, [(12, 12)], is_thing=is_thing)[0]
    assert a.segments_info == b.segments_info and torch.equal(a.id_map, b.id_map)
    partial = DETROutput(pred_logits=logits, pred_boxes=torch.rand(1, 4, 4), pred_masks=masks[0, [0]],
                         mask_queries=[torch.tensor([0])])
    with pytest.raises(ValueError, match="not computed"):
        panoptic_postprocess(partial, [(12, 12)], is_thing=is_thing)


def test_bad_arguments():
    outputs = DETROutput(pred_logits=logits_for([0], 2), pred_boxes=torch.rand(1, 1, 4),
                         pred_masks=torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="merge_stuff"):
        panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True, False]), merge_stuff="nope")
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_postprocess(outputs, [(8, 8)], is_thing=torch.tensor([True]))
    with pytest.raises(ValueError, match="processed_sizes"):
        panoptic_postprocess(outputs, [(8, 8), (8, 8)], is_thing=torch.tensor([True, False]))


@pytest.mark.parametrize("seed", range(4))
def test_pixel_winner_equals_argmax_over_any_sequence_of_subsets(seed):
    """PixelWinner (running maximum, and reuse of an earlier answer for a subset of it) gives argmax's
    first-of-equal-maxima channel bit for bit, ties included, whatever order the subsets come in."""
    from detr_panoptic.models.postprocess import PixelWinner

    generator = torch.Generator().manual_seed(seed)
    channels = 9
    masks = torch.randint(0, 4, (channels, 17, 23), generator=generator).float()  # many ties
    winner = PixelWinner(masks)
    subset = torch.ones(channels, dtype=torch.bool)
    for step in range(25):
        if step % 6 == 5:  # now and then a set that is no subset of the last one
            subset = torch.rand(channels, generator=generator) < 0.6
        elif step:  # otherwise shrink
            subset = subset & (torch.rand(channels, generator=generator) < 0.8)
        if not subset.any():
            subset[int(torch.randint(0, channels, (1,), generator=generator))] = True
        index = subset.nonzero().squeeze(1)
        expected = index[masks[index].argmax(0)]
        assert torch.equal(winner(subset), expected), f"step {step}, subset {index.tolist()}"
    with pytest.raises(ValueError, match="at least one channel"):
        winner(torch.zeros(channels, dtype=torch.bool))


def test_pixel_winner_nan_is_the_maximum_as_for_argmax():
    from detr_panoptic.models.postprocess import PixelWinner

    masks = torch.zeros(3, 2, 2)
    masks[1, 0, 0] = float("nan")
    masks[2] = 1.0
    assert torch.equal(PixelWinner(masks)(torch.ones(3, dtype=torch.bool)), masks.argmax(0))


def test_min_visible_drops_a_thing_query_that_wins_little_of_its_own_mask():
    """q1 duplicates thing q0 but wins only 10 of its 25 mask pixels (0.4): ``min_visible`` above that drops
    it and argmax gives its pixels to the rest; stuff (q2 wins 29 of 64) is never dropped by the rule; 0 is
    the reference; ``sweep`` gives the same results per setting."""
    from detr_panoptic.models.postprocess import PanopticPostProcessor, PostprocessSettings

    masks = torch.full((1, 3, 8, 8), -5.0)
    masks[0, 0, :5, :5] = 5.0
    masks[0, 1, :5, 2:7] = 4.0
    masks[0, 2] = 1.0
    outputs = DETROutput(pred_logits=logits_for([0, 0, 1], 2), pred_boxes=torch.rand(1, 3, 4), pred_masks=masks)
    is_thing = torch.tensor([True, False])

    def segments(min_visible: float) -> list[tuple[int, int]]:
        processor = PanopticPostProcessor(is_thing, None, PostprocessSettings(0.5, "reference", 4, min_visible))
        return [(s["query"], s["area"]) for s in processor(outputs, processed_sizes=[(8, 8)])[0].segments_info]

    reference = panoptic_postprocess(outputs, [(8, 8)], is_thing=is_thing, threshold=0.5)[0]
    assert segments(0.0) == [(s["query"], s["area"]) for s in reference.segments_info] == [(0, 25), (1, 10), (2, 29)]
    assert segments(0.4) == [(0, 25), (1, 10), (2, 29)]  # 10 of 25 is not less than 0.4
    assert segments(0.5) == [(0, 25), (2, 39)]
    assert segments(1.0) == [(0, 25), (2, 39)]

    processor = PanopticPostProcessor(is_thing, None)
    grid = [PostprocessSettings(0.5, "reference", 4, v) for v in (0.0, 0.4, 0.5, 1.0)]
    [per_image] = list(processor.sweep(outputs, grid, processed_sizes=[(8, 8)]))
    by_setting = {s: r for group, r in per_image for s in group}
    for setting in grid:
        assert [(s["query"], s["area"]) for s in by_setting[setting].segments_info] == segments(setting.min_visible)
    with pytest.raises(Exception, match="min_visible"):
        PostprocessSettings(0.5, "reference", 4, 1.5)
    assert PostprocessSettings.from_dict({"threshold": 0.5}).min_visible == 0.0  # older records: the reference
