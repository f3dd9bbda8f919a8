"""A user of the wheel gets a working tool: build the sdist and the wheel with the standard ``python -m
build`` (from a copy of the checkout), install the wheel into a fresh venv outside the checkout, and run
``detr-panoptic config --list`` and ``detr-panoptic demo --quick`` there, from another folder.

The fresh venv reuses the dependencies already installed (no torch download): with
``--system-site-packages`` when the base interpreter has torch, else through a ``.pth`` file naming this
interpreter's site-packages, which holds the dependencies. ``.pth`` lines only append folders to
``sys.path``; the ``.pth`` files inside those folders (our editable install's pointer to ``src/``) are
not read, and the venv's own site-packages comes first, so ``import detr_panoptic`` is the wheel's: the
test checks that.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["demo", "demo_quick", "cityscapes/recipe_two_stages", "cityscapes/stage1_freeze_transformer",
           "cityscapes/stage2_freeze_attention"]


def _copy_checkout(dest: Path) -> None:
    """The files a build of this checkout sees (tracked + untracked, not ignored), without venv or build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, check=True, capture_output=True, timeout=60).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:  # not a git checkout (an unpacked sdist, say)
        shutil.copytree(REPO_ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.so", "_work"))
        return
    for name in names:
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the build
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _base_has_torch() -> bool:
    base = getattr(sys, "_base_executable", sys.executable)
    proc = subprocess.run([base, "-s", "-c", "import torch"], capture_output=True, timeout=120, check=False)
    return proc.returncode == 0


START_POINT_CHECK = """
from detr_panoptic.checkpoints import load_checkpoint
from detr_panoptic.demo.pipeline import demo_config_path, load_demo_config, start_point_path
settings, _ = load_demo_config(demo_config_path())
path = start_point_path(settings.start_point)
loaded = load_checkpoint(path)
print(path)
print(loaded.model.config["backbone"], loaded.model.config["num_queries"])
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_installed_wheel_runs_the_demo_outside_the_checkout(tmp_path: Path) -> None:
    source, dist, venv, elsewhere = (tmp_path / n for n in ("source", "dist", "venv", "elsewhere"))
    _copy_checkout(source)
    # sdist, then the wheel built from the unpacked sdist: the sdist alone must be enough to build.
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)], cwd=tmp_path, timeout=900)
    [sdist] = dist.glob("detr_panoptic-*.tar.gz")
    [wheel] = dist.glob("detr_panoptic-*.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert "src/detr_panoptic/utils/_png_unfilter.c" in in_sdist and "setup.py" in in_sdist
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    for name in SHIPPED:
        assert f"src/detr_panoptic/configs/{name}.yaml" in in_sdist, name
        assert f"detr_panoptic/configs/{name}.yaml" in in_wheel, name
    assert "detr_panoptic/resources/coco_panoptic_categories.json" in in_wheel
    assert "detr_panoptic/resources/LICENSE-coco-categories.txt" in in_wheel
    for name in ("demo_start_point.safetensors", "demo_start_point.json"):  # the demo's packaged start point
        assert f"detr_panoptic/resources/{name}" in in_wheel, name
    if shutil.which("cc") or shutil.which("gcc"):  # the build compiles the optional extension when it can
        assert any(n.startswith("detr_panoptic/utils/_png_unfilter.") and n.endswith((".so", ".pyd"))
                   for n in in_wheel), sorted(in_wheel)

    # A fresh venv outside the checkout (tmp_path), the wheel installed without its dependencies...
    system_site = _base_has_torch()
    _run([sys.executable, "-m", "venv", "--without-pip", *(["--system-site-packages"] if system_site else []),
          str(venv)], cwd=tmp_path, timeout=300)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)], cwd=tmp_path, timeout=600)
    # ...which come from this interpreter's site-packages (torch and the rest), never from src/.
    if not system_site:
        dep_dirs = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
        assert not any(Path(p).resolve() == (REPO_ROOT / "src").resolve() for p in dep_dirs)
        venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=tmp_path).strip())
        (venv_site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(dep_dirs)))

    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([str(python), "-c", ("import detr_panoptic, importlib.metadata as m; print(detr_panoptic.__file__); "
                                      "print(m.distribution('detr-panoptic').locate_file(''))")],
                 cwd=elsewhere, env=env).splitlines()
    for found in where:  # the module and the distribution metadata: the wheel's, in the venv
        assert Path(found).resolve().is_relative_to(venv.resolve()), where
        assert not Path(found).resolve().is_relative_to(REPO_ROOT.resolve()), where
    # Every core dependency the wheel declares is importable metadata-wise, at a satisfying version.
    _run([str(python), "-c", DEPENDENCY_CHECK], cwd=elsewhere, env=env)

    tool = str(venv / "bin" / "detr-panoptic")
    listed = _run([tool, "config", "--list"], cwd=elsewhere, env=env)
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert names == sorted(SHIPPED), listed
    stages = _run([tool, "config", "cityscapes/recipe_two_stages", "--stages"], cwd=elsewhere, env=env)
    assert "# cityscapes/stage1" in stages and "# cityscapes/stage2" in stages

    # The default demo's start point resolves inside the installed package and loads.
    start = _run([str(python), "-c", START_POINT_CHECK], cwd=elsewhere, env=env).strip().splitlines()
    assert Path(start[0]).resolve().is_relative_to(venv.resolve()), start
    assert start[1] == "resnet18 30", start

    out = tmp_path / "demo_out"
    printed = _run([tool, "demo", "--quick", "--out", str(out)], cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "2"},
                   timeout=1200)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff", "stages", "seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["pq"] <= 100.0 and "PQ" in printed
    assert Path(metrics["config"]).resolve().is_relative_to(venv.resolve()), metrics["config"]
    assert (out / "report.html").is_file()
    assert not any(elsewhere.iterdir()), "the demo wrote into the working folder"


DEPENDENCY_CHECK = """
import importlib.metadata as m, re
missing = []
for req in m.requires("detr-panoptic") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[<>=!~\\[; ]", req, maxsplit=1)[0]
    try:
        version = m.version(name)
    except m.PackageNotFoundError:
        missing.append(req)
        continue
    try:
        from packaging.requirements import Requirement
    except ImportError:
        continue
    if not Requirement(req).specifier.contains(version, prereleases=True):
        missing.append(f"{req} (installed {version})")
assert not missing, missing
"""
