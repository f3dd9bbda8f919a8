"""convert_cityscapes called at module level from a script (no main guard), as a subprocess: it works,
with the same output as in this process; where its pool cannot fork it fails at once with the cause."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detr_panoptic.data.cityscapes import convert_cityscapes
from tests.data.cityscapes_trees import json_bytes, make_tree

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_script(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=path.parent, check=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks on Linux only")
def test_a_script_without_main_guard_converts(tmp_path):
    tree = make_tree(tmp_path / "cityscapes", synthetic=(0, 6))
    expected = convert_cityscapes(tree, tmp_path / "here", splits=["val"], workers=1, progress=False)["val"]
    script = tmp_path / "convert_script.py"
    script.write_text(textwrap.dedent(f"""
        from detr_panoptic import convert_cityscapes

        print("SCRIPT RAN")
        convert_cityscapes({str(tree)!r}, {str(tmp_path / "script")!r}, splits=["val"], workers=2)
    """))  # the default progress bar included: its monitor thread starts after the pool
    completed = run_script(script)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("SCRIPT RAN") == 1  # not run again by the workers
    written = tmp_path / "script" / expected.name
    assert json_bytes(written) == json_bytes(expected)
    for png in sorted(expected.with_suffix("").iterdir()):
        from detr_panoptic.evaluation import read_id_png

        assert (read_id_png(png) == read_id_png(written.with_suffix("") / png.name)).all()


def test_a_script_whose_pool_cannot_fork_fails_at_once_saying_why(tmp_path):
    tree = make_tree(tmp_path / "cityscapes", synthetic=(0, 4), edge_cases=False)
    script = tmp_path / "convert_script.py"
    script.write_text(textwrap.dedent(f"""
        import threading
        from detr_panoptic import convert_cityscapes

        threading.Thread(target=threading.Event().wait, daemon=True).start()  # no fork with this thread
        convert_cityscapes({str(tree)!r}, {str(tmp_path / "out")!r}, splits=["val"], workers=2, progress=False)
    """))
    completed = run_script(script)
    assert completed.returncode != 0
    assert "WorkerDiedError" in completed.stderr and 'if __name__ == "__main__":' in completed.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks on Linux only")
def test_a_script_without_main_guard_generates_and_checks_with_pools(tmp_path):
    # The other pool users: the synthetic generator and check-dataset, with their progress bars.
    script = tmp_path / "generate_and_check.py"
    root = tmp_path / "synthetic"
    script.write_text(textwrap.dedent(f"""
        from detr_panoptic.data.check import check_cityscapes
        from detr_panoptic.data.cityscapes import convert_cityscapes
        from detr_panoptic.data.synthetic import make_synthetic_cityscapes

        print("SCRIPT RAN")
        make_synthetic_cityscapes({str(root)!r}, train=0, val=4, size=(64, 128), workers=2, progress=True)
        convert_cityscapes({str(root)!r}, splits=["val"], workers=2, progress=True)
        print("PROBLEMS", check_cityscapes({str(root)!r}, "val", workers=2, progress=True))
    """))
    completed = run_script(script)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("SCRIPT RAN") == 1
    assert "PROBLEMS []" in completed.stdout
    assert len(list((root / "gtFine" / "cityscapes_panoptic_val").glob("*.png"))) == 4
