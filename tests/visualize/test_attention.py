"""Attention figures from hand-made attention tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from detr_panoptic.visualize.attention import (
    plot_encoder_attention,
    plot_mask_grid,
    plot_query_attention,
    reference_points,
    save_figure,
)


def _image(height=48, width=64):
    return torch.randint(0, 255, (3, height, width), dtype=torch.uint8)


def test_query_figure_has_a_row_per_query_and_a_column_per_head(tmp_path):
    decoder = torch.rand(3, 8, 2, 2)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0]] * 3)
    masks = torch.rand(3, 48, 64)
    fig = plot_query_attention(_image(), decoder, boxes, masks, ["a", "b", "c"])
    assert len(fig.axes) == 3 * 3
    per_head = plot_query_attention(_image(), decoder, boxes, masks, ["a", "b", "c"], per_head=True)
    assert len(per_head.axes) == 3 * (8 + 2)
    save_figure(fig, tmp_path / "queries.png")
    assert Image.open(tmp_path / "queries.png").size[0] > 100


def test_query_figure_with_no_query_says_so():
    fig = plot_query_attention(_image(), torch.zeros(0, 8, 2, 2), torch.zeros(0, 4), torch.zeros(0, 48, 64), [])
    assert fig.axes[0].get_title() == "no query above the threshold"


def test_encoder_figure_shows_the_map_of_the_cell_under_each_point():
    feat = 4
    encoder = torch.zeros(feat, feat, feat, feat)
    encoder[1, 2, 3, 0] = 1.0   # the cell at row 1, column 2 looks at row 3, column 0
    points = [(2.5 * 64 / feat, 1.5 * 48 / feat)]
    fig = plot_encoder_attention(_image(), encoder, points)
    shown = fig.axes[1].get_images()[-1].get_array()
    assert shown[3, 0] == 1.0 and shown.sum() == 1.0


def test_reference_points_lie_in_the_largest_segments_then_on_a_grid():
    id_map = torch.zeros(40, 40, dtype=torch.long)
    id_map[:, :30] = 1
    id_map[30:, 30:] = 2
    points = reference_points(id_map, 40, 40, count=3)
    assert len(points) == 3
    assert id_map[int(points[0][1]), int(points[0][0])] == 1
    assert id_map[int(points[1][1]), int(points[1][0])] == 2
    assert len(reference_points(None, 40, 40, count=4)) == 4


def test_mask_grid_lays_out_all_masks(tmp_path):
    fig = plot_mask_grid(torch.rand(7, 20, 30), [f"q{i}" for i in range(7)], image=np.zeros((20, 30, 3), np.uint8),
                         columns=3)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == [f"q{i}" for i in range(7)] and len(fig.axes) == 9
    save_figure(fig, tmp_path / "masks.png")
    assert (tmp_path / "masks.png").stat().st_size > 1000
