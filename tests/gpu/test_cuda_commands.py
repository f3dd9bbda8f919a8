"""What users run, on CUDA: ``detr-panoptic demo --quick --device cuda`` end to end and again (the finished
phases are reused), then ``evaluate``/``predict``/``attention``/``calibrate`` on its model with ``--device
cuda`` give the CPU's results. The demo's folder is shared by the module's tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from detr_panoptic.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path_factory.mktemp("demo_cuda") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cuda"]) == 0
    return out


def test_quick_demo_on_cuda_runs_end_to_end_and_resumes(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert 0.0 <= metrics["pq"] <= 100.0 and (demo_run / "report.html").is_file()
    best = demo_run / "stage2" / "checkpoints" / "best.pth"
    before = best.stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(demo_run), "--device", "cuda"]) == 0  # again: phases reused
    assert best.stat().st_mtime_ns == before
    again = json.loads((demo_run / "metrics.json").read_text())
    assert again["pq"] == metrics["pq"]


def _both(tmp_path: Path, command: list[str]) -> tuple[Path, Path]:
    """``command`` with ``--out`` on the CPU and on CUDA (plain float32 on both: no TF32)."""
    outs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main([*command, "--device", device, "--out", str(out)]) == 0, device
        outs.append(out)
    return outs[0], outs[1]


def _common(demo_run: Path) -> list[str]:
    return ["--checkpoint", str(demo_run / "stage2" / "checkpoints" / "best.pth")]


def test_evaluate_on_cuda_equals_the_cpu(demo_run, tmp_path, strict_fp32):
    cpu, gpu = _both(tmp_path, ["evaluate", *_common(demo_run), "--cityscapes", str(demo_run / "data" / "cityscapes")])
    a, b = (json.loads((out / "metrics.json").read_text()) for out in (cpu, gpu))
    for key in ("pq", "sq", "rq"):
        assert b[key] == pytest.approx(a[key], abs=0.2), key  # a pixel or two may flip on float rounding


def _category_maps(out: Path) -> dict[str, torch.Tensor]:
    """Per prediction PNG: the category of each pixel (0: none), from the PNG ids and predictions.json."""
    annotations = json.loads((out / "predictions.json").read_text())["annotations"]
    maps = {}
    for annotation in annotations:
        rgb = read_image(str(out / "predictions" / annotation["file_name"])).long()
        ids = rgb[0] + 256 * rgb[1] + 65536 * rgb[2]
        lookup = torch.zeros(int(ids.max()) + 1, dtype=torch.long)
        for segment in annotation["segments_info"]:
            lookup[segment["id"]] = segment["category_id"]
        maps[annotation["file_name"]] = lookup[ids]
    return maps


def test_predict_on_cuda_equals_the_cpu(demo_run, tmp_path, strict_fp32):
    images = sorted((demo_run / "data" / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[:3]
    cpu, gpu = _both(tmp_path, ["predict", *_common(demo_run), *map(str, images)])
    a, b = _category_maps(cpu), _category_maps(gpu)
    assert a.keys() == b.keys() and len(a) == len(images)
    for name in a:
        assert float((a[name] == b[name]).float().mean()) > 0.99, name


def test_attention_on_cuda_equals_the_cpu(demo_run, tmp_path, strict_fp32):
    image = min((demo_run / "data" / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    cpu, gpu = _both(tmp_path, ["attention", *_common(demo_run), str(image)])
    names = sorted(p.relative_to(cpu) for p in cpu.rglob("*.png"))
    assert names and names == sorted(p.relative_to(gpu) for p in gpu.rglob("*.png"))
    for name in names:
        a, b = read_image(str(cpu / name)).float(), read_image(str(gpu / name)).float()
        assert a.shape == b.shape and float((a - b).abs().mean()) < 2.0, name  # 8-bit colours, float rounding


def test_calibrate_on_cuda_chooses_what_the_cpu_chooses(demo_run, tmp_path, strict_fp32):
    cpu, gpu = _both(tmp_path, ["calibrate", *_common(demo_run), "--cityscapes", str(demo_run / "data" / "cityscapes"),
                                "--limit", "4"])
    from detr_panoptic.inference.calibrate import CalibrationTable

    a, b = (CalibrationTable.from_json(json.loads((out / "calibration.json").read_text())) for out in (cpu, gpu))
    assert b.best.setting.as_dict() == a.best.setting.as_dict()
    assert b.best.pq == pytest.approx(a.best.pq, abs=0.2)
