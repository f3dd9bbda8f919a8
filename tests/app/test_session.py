"""The app's logic without a web page: one forward per image, post-processing on the cached output equal to
the predictor's, odd files read as ``predict`` reads them, the size limit, downloads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.app.session import (
    Setting,
    analyse,
    attention_picture,
    open_image,
    overlay,
    segment_rows,
    shown_segments,
    write_downloads,
)
from detr_panoptic.inference import PanopticPredictor
from detr_panoptic.utils.errors import UserInputError

from .conftest import LOWEST, ForwardCounter


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """One intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def predictor(toy_checkpoint) -> PanopticPredictor:
    return PanopticPredictor.from_pretrained(toy_checkpoint, device="cpu")


def same_segments(a, b) -> None:
    assert [(s["category_id"], s["area"], s["query"]) for s in a.segments_info] == \
        [(s["category_id"], s["area"], s["query"]) for s in b.segments_info]
    assert [s["score"] for s in a.segments_info] == pytest.approx([s["score"] for s in b.segments_info], abs=1e-6)
    assert torch.equal(a.id_map, b.id_map)


def test_settings_change_post_processing_only_equal_to_the_predictor(predictor, street):
    counter = ForwardCounter(predictor.model)
    picture, notes = open_image(street)
    analysis = analyse(predictor, picture, lowest=LOWEST)
    settings = (Setting(0.3, "reference", 4), Setting(0.9, "reference", 4), Setting(0.6, "merge", 4),
                Setting(0.6, "reference", 500))
    results = {setting: analysis.result(setting)[0] for setting in settings}
    counter.handle.remove()
    assert counter.count == 1 and notes == []  # one forward for every setting
    for setting, result in results.items():
        expected = predictor.with_settings(threshold=setting.threshold, merge_stuff=setting.merge_stuff,
                                           min_area=setting.min_area)(picture)[0]
        same_segments(result, expected)
    assert len(results[settings[0]].segments_info) > len(results[settings[1]].segments_info) > 0


def test_threshold_below_the_computed_masks_is_refused(predictor, street):
    analysis = analyse(predictor.with_settings(threshold=0.7), open_image(street)[0], lowest=0.5)
    with pytest.raises(UserInputError, match="below 0.50"):
        analysis.result(Setting(0.4, "reference", 4))


def test_table_overlay_filters_and_attention(predictor, street):
    picture = open_image(street)[0]
    analysis = analyse(predictor, picture, lowest=LOWEST)
    result, _ = analysis.result(Setting(0.3, "reference", 4))
    rows = segment_rows(result, predictor.settings.category_map)
    assert [r[0] for r in rows] == [s["id"] for s in result.segments_info if s["area"] > 0]
    kinds = {r[2] for r in rows}
    assert kinds <= {"thing", "stuff"}
    drawn = overlay(picture, result, predictor.settings.category_map, opacity=1.0)
    plain = overlay(picture, result, predictor.settings.category_map, opacity=0.0)
    assert drawn.shape == (picture.height, picture.width, 3) and not np.array_equal(drawn, plain)
    things = shown_segments(result, stuff=False)
    assert all(s["isthing"] for s in things.segments_info)
    assert set(torch.unique(things.id_map).tolist()) <= {0} | {s["id"] for s in things.segments_info}
    segment = result.segments_info[0]
    counter = ForwardCounter(predictor.model)
    maps = analysis.attention(result, segment["id"])
    analysis.attention(result, result.segments_info[-1]["id"])
    assert counter.count == 1  # one forward with attention on the first pick, kept for the others
    counter.handle.remove()
    assert maps.queries.tolist() == [segment["query"]]
    reference = predictor.with_settings(threshold=0.3).attention(picture)
    row = reference.queries.tolist().index(segment["query"])
    torch.testing.assert_close(maps.decoder[0], reference.decoder[row])  # the same maps as `attention` draws
    torch.testing.assert_close(maps.masks[0], reference.masks[row])
    mean = attention_picture(analysis, result, segment["id"], predictor.settings.category_map)
    heads = attention_picture(analysis, result, segment["id"], predictor.settings.category_map, per_head=True)
    assert mean.ndim == 3 and heads.shape[1] > mean.shape[1]  # one panel per head instead of the mean
    with pytest.raises(UserInputError, match="no segment 999"):
        analysis.attention(result, 999)


def test_downloads_are_the_shown_result(predictor, street, tmp_path):
    from detr_panoptic.evaluation.panoptic_format import rgb_to_id_map

    analysis = analyse(predictor, open_image(street)[0], lowest=LOWEST)
    result, _ = analysis.result(Setting(0.5, "merge", 4))
    png, json_path = write_downloads(result, predictor.settings.category_map, tmp_path)
    record = json.loads(json_path.read_text())
    segments = record["annotations"][0]["segments_info"]
    assert [s["id"] for s in segments] == [s["id"] for s in result.segments_info if s["area"] > 0]
    ids = rgb_to_id_map(np.asarray(Image.open(png).convert("RGB")))
    assert np.array_equal(ids, result.id_map.numpy())


@pytest.mark.parametrize("kind", ["16-bit", "cmyk", "rgba", "exif"])
def test_odd_files_are_read_as_predict_reads_them(predictor, odd_images, kind):
    picture, _ = open_image(odd_images[kind])
    result, _ = analyse(predictor, picture, lowest=LOWEST).result(Setting.of(predictor))
    same_segments(result, predictor(odd_images[kind])[0])
    if kind == "exif":
        assert picture.size == (96, 192)  # shown upright, as predict predicts it


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_unreadable_files_name_the_file(odd_images, kind):
    with pytest.raises(UserInputError, match=f"cannot read image .*{odd_images[kind].name}"):
        open_image(odd_images[kind])


def test_large_images_are_downscaled_with_a_note(street):
    picture, notes = open_image(street, max_pixels=48 * 96)
    assert picture.size == (96, 48)
    assert notes and "downscaled to 96x48" in notes[0]
