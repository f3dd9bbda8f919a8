"""The ``detr-panoptic pq`` command: printed tables, metrics.json, one-line errors."""
from __future__ import annotations

import json

from detr_panoptic.cli import main
from tests.evaluation.pq_cases import CATEGORIES, reference_pq


def test_pq_prints_tables_and_writes_metrics(make_case, tmp_path, capsys):
    case = make_case(4)
    out = tmp_path / "m" / "metrics.json"
    code = main(["pq", "--gt-json", str(case.gt_json_path), "--gt-folder", str(case.gt_folder),
                 "--pred-json", str(case.pred_json_path), "--pred-folder", str(case.pred_folder),
                 "--out", str(out), "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    reference = reference_pq(case)
    for category in CATEGORIES:
        values = reference["per_class"][category["id"]]
        line = next(line for line in printed.splitlines() if line.startswith(category["name"] + " "))
        assert line.split("|")[1].split() == [f"{100 * values[m]:.1f}" for m in ("pq", "sq", "rq")]
    for name in ("All", "Things", "Stuff"):
        line = next(line for line in printed.splitlines() if line.startswith(name + " "))
        expected = [f"{100 * reference[name][m]:.1f}" for m in ("pq", "sq", "rq")] + [str(reference[name]["n"])]
        assert line.split("|")[1].split() == expected

    metrics = json.loads(out.read_text())
    assert abs(metrics["pq"] - 100 * reference["All"]["pq"]) < 1e-9
    assert abs(metrics["rq_stuff"] - 100 * reference["Stuff"]["rq"]) < 1e-9
    assert metrics["n_things"] == reference["Things"]["n"]
    assert metrics["per_class"]["8"]["name"] == "sky"
    assert abs(metrics["per_class"]["8"]["sq"] - 100 * reference["per_class"][8]["sq"]) < 1e-9
    assert abs(metrics["panopticapi"]["All"]["pq"] - reference["All"]["pq"]) < 1e-12
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, nothing left behind


def test_pq_folders_default_to_the_json_names(make_case, capsys):
    case = make_case(4)
    code = main(["pq", "--gt-json", str(case.gt_json_path), "--pred-json", str(case.pred_json_path),
                 "--workers", "1"])
    assert code == 0
    assert "All" in capsys.readouterr().out


def test_pq_bad_input_is_one_line_and_exit_2(make_case, capsys):
    case = make_case(4)
    missing = case.pred_json["annotations"].pop(0)
    case.pred_json_path.write_text(json.dumps(case.pred_json))
    code = main(["pq", "--gt-json", str(case.gt_json_path), "--pred-json", str(case.pred_json_path),
                 "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no prediction for image {missing['image_id']!r}" in err
