from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from detr_panoptic.utils.io import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_a_writer_that_replaces_the_temporary_file_still_gives_the_umask_mode(tmp_path: Path) -> None:
    """safetensors' ``save_file`` writes its own owner-only file over the temporary one."""
    from safetensors.torch import save_file

    target = tmp_path / "weights.safetensors"
    with atomic_path(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_stale_temporaries_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A process killed inside ``atomic_path`` leaves its temporary file; writers clear them on (re)start."""
    import subprocess
    import sys

    from detr_panoptic.inference.evaluators import OverlayWriter, PanopticWriter
    from detr_panoptic.utils.io import remove_stale_temporaries

    killed = ("import os, sys\nfrom detr_panoptic.utils.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    os._exit(9)\n")
    for folder in ("overlays", "predictions", "."):
        (tmp_path / folder).mkdir(exist_ok=True)
        target = tmp_path / folder / ("x.json" if folder == "." else "025.png")
        subprocess.run([sys.executable, "-c", killed, str(target)], check=False)
        assert not target.exists() and len([p for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]) == 1
    (tmp_path / "overlays" / "000.png").write_bytes(b"done")
    (tmp_path / "overlays" / ".keep").write_text("not ours")
    OverlayWriter(tmp_path / "overlays", category_map=None)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [".keep", "000.png"]
    PanopticWriter(tmp_path / "predictions.json", tmp_path / "predictions", categories=[], resume=True)
    assert not [p for p in tmp_path.rglob(".*") if ".tmp" in p.name]
    assert remove_stale_temporaries(tmp_path / "missing") == 0
