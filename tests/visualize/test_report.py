"""The HTML report: contents from a hand-made run folder, and a real render in headless Chromium."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.visualize.report import HEADER_COLOR, build_report

CHROMIUM = Path("/usr/bin/chromium")
MAGENTA = (255, 0, 255)


def make_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    records = [{"kind": "train", "step": s, "epoch": 0, "lr": 1e-4, "loss": 3.0 / s, "loss_ce": 1.0 / s,
                "class_accuracy": 12.5 * s, "class_error": 100 - 12.5 * s} for s in range(1, 6)]
    records.append({"kind": "val", "step": 5, "epoch": 0, "pq": 41.5, "sq": 77.0, "rq": 52.0, "pq_things": 35.0,
                    "pq_stuff": 48.0, "per_class": {"1": {"pq": 50.0, "sq": 80.0, "rq": 62.5},
                                                    "7": {"pq": 12.5, "sq": 70.0, "rq": 17.9}}})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (folder / "config.yaml").write_text("model:\n  num_queries: 100  # <b>escaped</b>\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "predictions.json").write_text(json.dumps({
        "annotations": [], "categories": [{"id": 1, "name": "car", "isthing": 1},
                                          {"id": 7, "name": "road", "isthing": 0}]}))
    (folder / "eval" / "predictions").mkdir()
    Image.new("RGB", (8, 8), (1, 0, 0)).save(folder / "eval" / "predictions" / "ids.png")  # not a picture
    (folder / "eval" / "overlays").mkdir()
    overlay = np.zeros((120, 200, 3), np.uint8)
    overlay[:] = MAGENTA
    Image.fromarray(overlay).save(folder / "eval" / "overlays" / "street.png")
    (folder / "attention").mkdir()
    Image.new("RGB", (60, 40), (0, 200, 0)).save(folder / "attention" / "queries_01.png")
    return folder


def test_report_embeds_everything_and_escapes_text(tmp_path):
    run = make_run(tmp_path / "run")
    path = build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert "<title>detr-panoptic report: run</title>" in page
    for anchor in ("run", "curves", "per-class", "overlays", "attention", "config"):
        assert f'id="{anchor}"' in page
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page and "<b>escaped</b>" not in page
    assert not re.search(r'src="(?!data:)', page), "every image must be embedded"
    assert "eval/overlays/street.png" in page and "attention/queries_01.png" in page
    assert "ids.png" not in page                                     # COCO id PNGs are not pictures
    # Per class, weakest first, with names from the categories found in the folder.
    assert page.index("<td class=\"name\">road</td>") < page.index("<td class=\"name\">car</td>")
    assert "41.50" in page
    # the last step's class accuracy and class_error in the table, their curves among the figures
    assert "<th>class_accuracy</th><th>class_error</th>" in page and "<td>62.50</td><td>37.50</td>" in page
    assert 'alt="class accuracy of the matched queries (last layer) and class_error"' in page


def test_report_reads_an_evaluation_folder_in_either_form(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "metrics.json").write_text(json.dumps({"pq": 43.4, "sq": 79.3, "rq": 53.8, "n": 133, "pq_things": 48.2,
                                                   "sq_things": 1, "rq_things": 1, "n_things": 80,
                                                   "per_class": {"1": {"pq": 60.0, "sq": 80.0, "rq": 75.0}}}))
    Image.new("RGB", (50, 20), (0, 0, 255)).save(flat / "per_class_pq.png")  # evaluate's chart: drawn anew
    page = build_report(flat, tmp_path / "flat.html").read_text()
    assert "43.40" in page and "48.20" in page and "60.00" in page
    assert "per_class_pq.png" not in page and page.count("<img") == 1
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "metrics.json").write_text(json.dumps({
        "All": {"pq": 0.434, "sq": 0.793, "rq": 0.538, "n": 133}, "Things": {"pq": 0.482, "sq": 0.8, "rq": 0.6, "n": 80},
        "Stuff": {"pq": 0.3, "sq": 0.7, "rq": 0.4, "n": 53}, "per_class": {"1": {"pq": 0.6, "sq": 0.8, "rq": 0.75}}}))
    page = build_report(nested).read_text()
    assert "43.40" in page and "60.00" in page


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        build_report(tmp_path / "missing")
    with pytest.raises(UserInputError, match="nothing to report"):
        build_report(tmp_path)


def _hex(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


def test_report_renders_in_headless_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium is not installed at /usr/bin/chromium (Debian package 'chromium'; "
                    ".ci/run installs it)")
    page = build_report(make_run(tmp_path / "run"), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               "--window-size=1200,4000", page.as_uri()]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot: {completed.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The header band has the page's colour: an error page would not.
    header = pixels[5:60, 5:600]
    assert (np.abs(header - _hex(HEADER_COLOR)).max(-1) <= 3).mean() > 0.5
    # The embedded overlay (a magenta JPEG) was decoded and laid out.
    magenta = (np.abs(pixels - np.array(MAGENTA)).max(-1) <= 40).sum()
    assert magenta > 0.5 * 120 * 200
    # Not blank below the header: the sections' white cards on the grey page, and the plots.
    body = pixels[200:]
    assert len(np.unique(body.reshape(-1, 3)[::97], axis=0)) > 20
