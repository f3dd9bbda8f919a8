"""``detr-panoptic app``: the install hint, flags checked before anything loads, the default checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from detr_panoptic.app.serve import default_checkpoint
from detr_panoptic.cli import main


def test_missing_extra_gives_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app"]) == 2
    err = capsys.readouterr().err
    assert "detr-panoptic app: error:" in err and "pip install 'detr-panoptic[app]'" in err


def test_bad_flags_and_checkpoints_fail_before_serving(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert main(["app", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["app", "--queue-size", "0"]) == 2
    assert "--queue-size must be at least 1" in capsys.readouterr().err
    missing = tmp_path / "missing.pth"
    assert main(["app", "--checkpoint", str(missing), "--port", "0"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["app", "--help"])
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--queue-size", "--device"):
        assert flag in out


def test_default_checkpoint_is_the_demos_final_model_else_the_start_point(tmp_path):
    run = tmp_path / "runs" / "demo"
    packaged = Path(default_checkpoint(run))
    assert packaged.name == "demo_start_point.safetensors" and packaged.is_file()
    best = run / "stage2" / "checkpoints" / "best.pth"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    assert default_checkpoint(run) == str(best)
    calibrated = run / "calibration" / "calibrated.pth"
    calibrated.parent.mkdir(parents=True)
    calibrated.write_bytes(b"")
    assert default_checkpoint(run) == str(calibrated)
