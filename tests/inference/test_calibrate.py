"""inference.calibrate: the post-processing sweep equals evaluate per setting; the chosen setting travels in the
checkpoint and is what the predictor uses by default; the ``calibrate`` command and its report section."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr_panoptic.checkpoints import write_postprocess
from detr_panoptic.cli import main
from detr_panoptic.inference import PanopticPredictor, PredictorSettings, evaluate_dataset
from detr_panoptic.inference.calibrate import (
    CalibrationTable,
    calibrate,
    make_grid,
)
from detr_panoptic.utils.errors import UserInputError

TINY_MODEL = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
              "dim_feedforward": 32, "num_queries": 12, "dropout": 0.0, "aux_loss": False}
SIZE = {"min_size": 64, "max_size": 128}


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    from detr_panoptic.data import convert_cityscapes, make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=0, val=3, size=(64, 128), seed=11)
    convert_cityscapes(root, splits=("val",), workers=1, progress=False)
    return root


def val_dataset(root: Path):
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset

    return cityscapes_panoptic_dataset(root, "val", **SIZE)


def confident_model(num_classes: int) -> torch.nn.Module:
    """A tiny random PanopticDETR whose class scores spread over the sweep's range (a random head scores
    every class about 1/C, so no query would pass any threshold) and often repeat a stuff class."""
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(num_classes, **TINY_MODEL).eval()
    with torch.no_grad():
        head = model.detr.class_embed
        head.weight.normal_(0.0, 0.8, generator=torch.Generator().manual_seed(1))
        head.bias.zero_()
        head.bias[:2] += 1.0  # classes 0/1 (road, sidewalk: stuff) win some queries: duplicates for merge_stuff
    return model


@pytest.fixture(scope="module")
def checkpoint(cityscapes, tmp_path_factory) -> Path:
    from detr_panoptic.checkpoints import save_checkpoint

    category_map = val_dataset(cityscapes).category_map
    model = confident_model(category_map.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    return save_checkpoint(path, model, category_map=category_map, input_size=SIZE,
                           model_config=dict(TINY_MODEL, num_classes=category_map.num_classes),
                           extra={"step": torch.tensor(7)})


def predictor_for(checkpoint: Path, **settings) -> PanopticPredictor:
    return PanopticPredictor.from_pretrained(checkpoint, device="cpu", **settings)


GRID = {"thresholds": (0.3, 0.5, 0.7, 0.85), "merge_modes": ("reference", "merge"), "min_areas": (4, 40),
        "min_visibles": (0.0, 0.5)}


@pytest.fixture(scope="module")
def table(cityscapes, checkpoint) -> CalibrationTable:
    return calibrate(predictor_for(checkpoint), val_dataset(cityscapes), num_workers=0, **GRID)


def test_the_sweep_is_not_trivial(table):
    assert len(table) == 32 and table.num_images == 3
    assert len({(r.tp, r.fp, r.fn) for r in table}) > 3  # the settings give different results
    assert sum(r.fp for r in table) > 0  # segments are predicted (a random model rarely matches: PQ may be 0)
    assert table.postprocess_runs < 32 * 3  # shared runs (same kept queries / merge equal to reference)


def test_the_data_exercises_both_merge_modes(cityscapes, checkpoint):
    """Some image keeps a stuff class twice at the lowest threshold, where merge and reference differ."""
    predictor = predictor_for(checkpoint, threshold=0.3)
    pictures = sorted((cityscapes / "leftImg8bit" / "val").rglob("*.png"))
    reference = predictor(pictures)
    merged = predictor.with_settings(merge_stuff="merge")(pictures)
    assert any(a.segments_info != b.segments_info for a, b in zip(reference, merged))


@pytest.mark.parametrize("setting", [(0.3, "reference", 4, 0.0), (0.3, "merge", 40, 0.0), (0.5, "merge", 4, 0.0),
                                     (0.85, "reference", 40, 0.0), (0.3, "merge", 4, 0.5)])
def test_sweep_equals_evaluate_for_a_setting(table, cityscapes, checkpoint, tmp_path, setting):
    threshold, merge_stuff, min_area, min_visible = setting
    predictor = predictor_for(checkpoint, threshold=threshold, merge_stuff=merge_stuff, min_area=min_area,
                              min_visible=min_visible)
    out = evaluate_dataset(predictor, val_dataset(cityscapes), tmp_path, num_workers=0, workers=1, progress=False,
                           chart=False)
    metrics, row = out["metrics"], table.row(threshold, merge_stuff, min_area, min_visible)
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff"):
        assert row.__dict__[key] == pytest.approx(metrics[key], abs=1e-9), key
    for category, values in out["results"]["per_class"].items():
        assert row.results["per_class"][category] == pytest.approx(values, abs=1e-11)


@pytest.mark.slow
def test_sweep_equals_the_pq_evaluator_for_every_setting(table, cityscapes, checkpoint):
    """Every setting: the same per-category IoU sums and TP/FP/FN as ``run_inference`` + ``PQEvaluator``
    (what ``evaluate_dataset(write=False)`` runs), so also where a random model's PQ is 0."""
    from detr_panoptic.inference import DatasetSamples, PQEvaluator, make_loader, run_inference

    base = predictor_for(checkpoint)
    dataset = val_dataset(cityscapes)
    samples = DatasetSamples(dataset, **SIZE)
    for row in table:
        s = row.setting
        predictor = base.with_settings(**s.as_dict())
        evaluator = PQEvaluator(json.loads(Path(dataset.json_path).read_text())["categories"])
        run = run_inference(predictor, make_loader(samples), [evaluator])
        assert run.outputs["pq"] == row.results, s
        assert evaluator.accumulator.counts() == row.counts, s


def test_best_is_the_highest_pq(table):
    best = table.best
    assert best.pq == max(r.pq for r in table)
    assert CalibrationTable.from_json(json.loads(json.dumps(table.to_json()))).best.setting == best.setting


def test_calibrated_checkpoint_is_read_back_and_used_by_predict(table, checkpoint, cityscapes, tmp_path):
    best = table.best.setting
    copy = write_postprocess(checkpoint, best.as_dict(), out=tmp_path / "calibrated.pth")
    predictor = predictor_for(copy)
    assert (predictor.settings.threshold, predictor.settings.merge_stuff, predictor.settings.min_area) == \
        (best.threshold, best.merge_stuff, best.min_area)
    # predict uses it: the same result as asking for the setting explicitly on the uncalibrated checkpoint
    image = cityscapes / "leftImg8bit" / "val"
    picture = min(image.rglob("*.png"))
    explicit = predictor_for(checkpoint, threshold=best.threshold, merge_stuff=best.merge_stuff,
                             min_area=best.min_area)
    got, expected = predictor(picture)[0], explicit(picture)[0]
    assert torch.equal(got.id_map, expected.id_map) and got.segments_info == expected.segments_info
    # an explicit threshold still wins; the rest stays calibrated
    override = predictor_for(copy, threshold=0.95)
    assert override.settings.threshold == 0.95 and override.settings.merge_stuff == best.merge_stuff
    # everything else in the file is kept
    saved = torch.load(copy, weights_only=True)
    original = torch.load(checkpoint, weights_only=True)
    assert int(saved["step"]) == 7 and saved["detr_panoptic"]["input_size"] == original["detr_panoptic"]["input_size"]
    assert saved["detr_panoptic"]["postprocess"] == best.as_dict()


def test_checkpoint_without_calibration_behaves_as_before(checkpoint):
    settings = predictor_for(checkpoint).settings
    defaults = PredictorSettings(settings.category_map)
    assert (settings.threshold, settings.merge_stuff, settings.min_area) == \
        (defaults.threshold, defaults.merge_stuff, defaults.min_area) == (0.85, "reference", 4)


def test_bad_grids_are_clear_errors():
    with pytest.raises(UserInputError, match="empty"):
        make_grid(thresholds=())
    with pytest.raises(UserInputError, match=r"outside \[0, 1\)"):
        make_grid(thresholds=(0.5, 1.0))
    with pytest.raises(UserInputError, match="merge mode"):
        make_grid(merge_modes=("union",))
    with pytest.raises(UserInputError, match="integer >= 0"):
        make_grid(min_areas=(-1,))
    with pytest.raises(UserInputError, match="visible fraction"):
        make_grid(min_visibles=(1.5,))
    grid = make_grid()  # 14 thresholds x 2 merge modes x 1 area x 4 visible fractions
    assert len(grid) == 112 and grid[0].threshold == 0.3 and grid[-1].threshold == 0.95
    assert {s.min_visible for s in grid} == {0.0, 0.25, 0.5, 0.75}


def test_in_place_needs_a_file():
    with pytest.raises(UserInputError, match="--in-place needs a checkpoint file"):
        write_postprocess("coco-r50-panoptic", {"threshold": 0.5, "merge_stuff": "reference",
                                                          "min_area": 4}, in_place=True)


def test_calibrate_command_and_report(cityscapes, checkpoint, tmp_path, capsys):
    out = tmp_path / "cal"
    code = main(["calibrate", "--checkpoint", str(checkpoint), "--cityscapes", str(cityscapes), "--split", "val",
                 "--out", str(out), "--thresholds", "0.3,0.6,0.9", "--merge-modes", "reference,merge",
                 "--min-visibles", "0,0.5", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "calibration.json").read_text())
    assert len(record["rows"]) == 12 and record["num_images"] == 3
    best = record["best"]
    assert f"chosen: threshold {best['threshold']:.2f}" in printed and "PQ_th" in printed
    assert (out / "calibration.png").stat().st_size > 1000
    saved = torch.load(out / "calibrated.pth", weights_only=True)
    assert saved["detr_panoptic"]["postprocess"] == {k: best[k] for k in ("threshold", "merge_stuff", "min_area",
                                                                            "min_visible")}
    assert "postprocess" not in torch.load(checkpoint, weights_only=True)["detr_panoptic"]  # the source untouched

    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert 'id="calibration"' in page and "Post-processing calibration" in page


def test_calibrate_command_in_place(cityscapes, checkpoint, tmp_path):
    import shutil

    target = tmp_path / "model.pth"
    shutil.copy(checkpoint, target)
    code = main(["calibrate", "--checkpoint", str(target), "--cityscapes", str(cityscapes), "--split", "val",
                 "--out", str(tmp_path / "cal"), "--thresholds", "0.4,0.8", "--merge-modes", "reference",
                 "--in-place", "--device", "cpu", "--limit", "2"])
    assert code == 0
    best = json.loads((tmp_path / "cal" / "calibration.json").read_text())["best"]
    assert not (tmp_path / "cal" / "calibrated.pth").exists()
    assert predictor_for(target).settings.threshold == best["threshold"]
    assert int(torch.load(target, weights_only=True)["step"]) == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.pth")] == []  # no temporary left


def test_calibrate_command_bad_grid_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--checkpoint", str(tmp_path / "x.pth"), "--cityscapes", str(tmp_path),
              "--out", str(tmp_path / "o"), "--thresholds", "0.5,abc"])
    assert exit_info.value.code == 2
    assert "--thresholds: expected a comma-separated list of float" in capsys.readouterr().err
    code = main(["calibrate", "--checkpoint", str(tmp_path / "x.pth"), "--cityscapes", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--thresholds", "0.5,1.5"])
    assert code == 2
    assert "calibration threshold 1.5 is outside [0, 1)" in capsys.readouterr().err
