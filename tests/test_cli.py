from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detr_panoptic import __version__
from detr_panoptic.cli import COMMAND_MODULES, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: detr-panoptic" in out
    # Every registered module contributes at least one subcommand that --help shows.
    from detr_panoptic.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name in sub.choices:
        assert name in out
    assert len(COMMAND_MODULES) >= 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("detr-panoptic")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    proc = subprocess.run([str(exe), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "detr-panoptic" in proc.stdout


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_config_command_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 2}\n")
    out = tmp_path / "resolved.yaml"
    assert main(["config", str(cfg), "--set", "train.lr=3e-5", "--out", str(out)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-5 and printed["train"]["epochs"] == 2
    assert yaml.safe_load(out.read_text()) == printed


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {bogus: 2}\n")
    assert main(["config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.bogus" in err and str(cfg) in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["--debug", "config", str(tmp_path / "missing.yaml")])


def test_config_list_and_shipped_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--list"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert {"demo", "demo_quick", "cityscapes/recipe_two_stages", "cityscapes/stage1_freeze_transformer"} <= set(listed)
    assert main(["config", "cityscapes/recipe_two_stages", "--stages"]) == 0
    out = capsys.readouterr().out
    assert "# cityscapes/stage1" in out and "# cityscapes/stage2" in out
    assert main(["config", "cityscapes/no_such_recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cityscapes/no_such_recipe" in err and "cityscapes/recipe_two_stages" in err
    assert main(["config"]) == 2 and "--list" in capsys.readouterr().err
    assert main(["config", "--list", "demo"]) == 2


def test_train_and_demo_take_shipped_config_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The recipe is found by name and resolved; it stops at the (missing) data, before writing anything.
    assert main(["train", "cityscapes/recipe_two_stages", "--set", f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: no such folder" in err and "config file not found" not in err
    assert main(["demo", "--config", "no_such_demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_demo" in err and "demo_quick" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())
