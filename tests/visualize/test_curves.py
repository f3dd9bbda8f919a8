"""Curves from a hand-written metrics.jsonl."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.visualize.curves import (
    loss_keys,
    plot_losses,
    plot_pq,
    plot_run,
    read_metrics,
    smooth,
    split_records,
)


def write_run(folder, *, per_class=True, broken_last_line=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 21):
        lines.append({"kind": "train", "step": step, "epoch": step // 10, "lr": 1e-4, "loss": 5.0 / step,
                      "loss_ce": 2.0 / step, "loss_bbox": 1.0 / step, "loss_giou": 1.0 / step,
                      "loss_mask": 0.5 / step, "loss_dice": 0.5 / step, "loss_ce_0": 2.5 / step,
                      "step_time": 0.3, "data_time": 0.01})
        if step % 10 == 0:
            record = {"kind": "val", "step": step, "epoch": step // 10 - 1, "pq": 20.0 + step, "sq": 70.0,
                      "rq": 30.0 + step, "pq_things": 15.0 + step, "pq_stuff": 25.0 + step, "loss": 4.0 / step}
            if per_class:
                record["per_class"] = {"1": {"pq": 30.0, "sq": 70.0, "rq": 40.0},
                                       "7": {"pq": 10.0, "sq": 60.0, "rq": 15.0}}
            lines.append(record)
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    if broken_last_line:
        text += '{"kind": "train", "st'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_read_and_split(tmp_path):
    run = write_run(tmp_path / "run", broken_last_line=True)
    records = read_metrics(run)
    train, val = split_records(records)
    assert len(train) == 20 and [r["step"] for r in val] == [10, 20]
    assert loss_keys(train) == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"]
    assert "loss_ce_0" in loss_keys(train, include_aux=True)


def test_bad_metrics_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train"}\nnot json\n{"kind": "val"}\n')
    with pytest.raises(UserInputError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_smooth_is_bias_corrected():
    assert np.allclose(smooth(np.full(5, 3.0)), 3.0)


def test_figures_have_a_panel_per_loss_with_train_and_validation(tmp_path):
    train, val = split_records(read_metrics(write_run(tmp_path / "run")))
    fig = plot_losses(train, val)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"]
    total = fig.axes[0]
    assert [line.get_label() for line in total.get_lines() if not line.get_label().startswith("_")] == \
        ["train", "validation"]
    pq = plot_pq(val)
    assert [line.get_label() for line in pq.axes[0].get_lines()] == ["PQ", "SQ", "RQ", "PQ things", "PQ stuff"]
    assert list(pq.axes[0].get_lines()[0].get_ydata()) == [30.0, 40.0]
    # Nothing logged yet: figures say so instead of failing.
    assert plot_losses([], []).axes[0].texts[0].get_text() == "no losses logged yet"


def test_plot_run_writes_pngs(tmp_path):
    run = write_run(tmp_path / "run", per_class=False)
    written = plot_run(run)
    assert [p.name for p in written] == ["losses.png", "pq.png"]
    for path in written:
        assert Image.open(path).size[0] > 300


def test_plot_run_draws_per_class_bars_of_the_last_validation(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "categories.json").write_text(json.dumps([{"id": 1, "name": "car", "isthing": 1},
                                                     {"id": 7, "name": "road", "isthing": 0}]))
    written = plot_run(run, tmp_path / "figures")
    assert [p.name for p in written] == ["losses.png", "pq.png", "per_class.png"]
    assert all(p.parent == tmp_path / "figures" for p in written)
    from detr_panoptic.visualize.curves import per_class_figure, run_categories
    _, val = split_records(read_metrics(run))
    ax = per_class_figure(val[-1], categories=run_categories(run)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["car", "road"]
    assert sorted(round(p.get_height(), 1) for p in ax.patches)[:2] == [10.0, 15.0]


def test_plot_run_draws_the_image_dependence_of_validations_that_carry_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "val", "step": s, "epoch": 0, "pq": 10.0, "diag_memory_image_var": v,
                "diag_decoder_image_var": v / 10, "diag_box_centre_spread": v / 100}
               for s, v in ((10, 0.3), (20, 1e-3), (30, 1e-4))]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    written = plot_run(run)
    assert [p.name for p in written] == ["losses.png", "pq.png", "diagnostics.png"]
    from detr_panoptic.visualize.curves import plot_diagnostics
    ax = plot_diagnostics(records).axes[0]
    assert ax.get_yscale() == "log"
    assert list(ax.get_lines()[0].get_ydata()) == [0.3, 1e-3, 1e-4]
    assert len(ax.get_lines()) == 3


def test_plot_run_draws_the_class_accuracy_of_train_records_that_carry_it(tmp_path):
    from detr_panoptic.visualize.curves import plot_accuracy

    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": 1.0, "class_accuracy": 10.0 * s,
                "class_error": 100 - 10.0 * s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [p.name for p in plot_run(run)] == ["losses.png", "accuracy.png", "pq.png"]
    fig = plot_accuracy(records)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["class_accuracy", "class_error"]
    raw_accuracy, raw_error = axes[0].get_lines()[0], axes[1].get_lines()[0]
    assert list(raw_accuracy.get_ydata()) == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert list(raw_error.get_ydata()) == [90.0, 80.0, 70.0, 60.0, 50.0]
    assert "class_accuracy" not in loss_keys(records)  # not a loss panel
