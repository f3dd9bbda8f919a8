"""The converter against the real cityscapesscripts ``convert2panoptic``, restarts and input errors."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_panoptic.cli import main
from detr_panoptic.data import cityscapes
from detr_panoptic.data.cityscapes import cityscapes_image_path, convert_cityscapes, find_gtfine
from tests.data.cityscapes_trees import load_json, make_tree, write_instance_png

createPanopticImgs = pytest.importorskip("cityscapesscripts.preparation.createPanopticImgs")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("cityscapes"))


def reference_convert(gtfine: Path, out: Path, use_train_id: bool, splits: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        createPanopticImgs.convert2panoptic(str(gtfine), str(out), use_train_id, splits)


def assert_same_output(ours: Path, reference: Path) -> None:
    ref_files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    our_files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    assert our_files == ref_files
    assert any(f.suffix == ".json" for f in ref_files)
    for rel in ref_files:
        if rel.suffix == ".json":
            assert (ours / rel).read_bytes() == (reference / rel).read_bytes(), rel
        else:
            ref_img, our_img = Image.open(reference / rel), Image.open(ours / rel)
            assert our_img.mode == ref_img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(our_img), np.asarray(ref_img), err_msg=str(rel))


@pytest.mark.parametrize("use_train_id", [False, True])
def test_identical_to_cityscapesscripts(tree: Path, tmp_path: Path, use_train_id: bool) -> None:
    reference_convert(tree / "gtFine", tmp_path / "ref", use_train_id, ["val", "train"])
    convert_cityscapes(tree, tmp_path / "ours", splits=("val", "train"), use_train_id=use_train_id,
                       workers=2, progress=False)
    assert_same_output(tmp_path / "ours", tmp_path / "ref")
    suffix = "_trainId" if use_train_id else ""
    data = load_json(tmp_path / "ours" / f"cityscapes_panoptic_val{suffix}.json")
    # The tree really exercises the special cases.
    by_image = {a["image_id"]: a["segments_info"] for a in data["annotations"]}
    assert by_image["a_000000_000019"] and by_image["a_000002_000019"] == []  # stuff only / all void
    crowded = {s["id"]: s for s in by_image["a-b_000001_000019"]}
    assert crowded[24]["iscrowd"] == crowded[26]["iscrowd"] == crowded[33]["iscrowd"] == 1
    assert crowded[26000]["iscrowd"] == 0 and crowded[7001]["iscrowd"] == 0
    assert not {18, 29, 29000, 30001, 5, 9, 0} & set(crowded)
    assert [img["id"] for img in data["images"]][:3] == ["a-b_000001_000019", "a_000000_000019", "a_000002_000019"]


def test_identical_without_zlib_ng_and_the_c_extension(tree: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from detr_panoptic.utils import png

    monkeypatch.setattr(png, "_unfilter_grey16", None)  # instance ids decoded by Pillow
    monkeypatch.setattr(png, "_zlib_ng", None)  # panoptic PNGs deflated by stock zlib
    reference_convert(tree / "gtFine", tmp_path / "ref", False, ["val"])
    convert_cityscapes(tree, tmp_path / "ours", splits=("val",), workers=1, progress=False)  # in this process
    assert_same_output(tmp_path / "ours", tmp_path / "ref")


def test_default_output_is_the_gtfine_folder(tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tree / "gtFine", copy / "gtFine")
    written = convert_cityscapes(copy / "gtFine", splits=["train"], workers=1, progress=False)
    assert written == {"train": copy / "gtFine" / "cityscapes_panoptic_train.json"}
    assert (copy / "gtFine" / "cityscapes_panoptic_train").is_dir()
    assert not list((copy / "gtFine").glob(".*"))  # the work folder is gone
    assert find_gtfine(copy) == copy / "gtFine"


def test_restart_reuses_finished_images_and_leaves_no_temporaries(tree: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = cityscapes._convert_and_record
    calls: list[str] = []

    def dies_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the run
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(cityscapes, "_convert_and_record", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert_cityscapes(tree, out, splits=["val"], workers=1, progress=False)
    panoptic = out / "cityscapes_panoptic_val"
    assert not (out / "cityscapes_panoptic_val.json").exists()
    assert len(list(panoptic.glob("*.png"))) == 2
    assert len(list((out / ".cityscapes_panoptic_val.work").glob("*.json"))) == 2
    # A temporary file as a kill during a write would leave it.
    (panoptic / ".x_gtFine_panoptic.png.abc123.tmp.png").write_bytes(b"half a png")

    calls.clear()

    def counting(job):
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(cityscapes, "_convert_and_record", counting)
    convert_cityscapes(tree, out, splits=["val"], workers=1, progress=False)
    total = len(list((tree / "gtFine" / "val").glob("*/*_instanceIds.png")))
    assert len(calls) == total - 2  # the two finished images were not redone
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    reference_convert(tree / "gtFine", tmp_path / "ref", False, ["val"])
    assert_same_output(out, tmp_path / "ref")


def test_changed_source_is_reconverted(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    shutil.copytree(tree / "gtFine" / "train", src / "gtFine" / "train")
    out = tmp_path / "out"
    real = cityscapes._convert_and_record

    def dies(job):
        real(job)
        raise KeyboardInterrupt

    monkeypatch.setattr(cityscapes, "_convert_and_record", dies)
    with pytest.raises(KeyboardInterrupt):
        convert_cityscapes(src, out, splits=["train"], workers=1, progress=False)
    first = min((src / "gtFine" / "train").glob("*/*_instanceIds.png"))
    write_instance_png(first, np.full((64, 128), 26003, np.uint16))  # edited after the interrupted run
    monkeypatch.setattr(cityscapes, "_convert_and_record", real)
    path = convert_cityscapes(src, out, splits=["train"], workers=1, progress=False)["train"]
    first_annotation = load_json(path)["annotations"][0]
    assert [s["id"] for s in first_annotation["segments_info"]] == [26003]


def test_cityscapes_image_path() -> None:
    assert cityscapes_image_path("/data/cs", "val", "bad-honnef_000012_000019") == Path(
        "/data/cs/leftImg8bit/val/bad-honnef/bad-honnef_000012_000019_leftImg8bit.png")


# -- errors through the CLI ---------------------------------------------------------------------------
def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def single_image_tree(root: Path) -> Path:
    path = root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_instanceIds.png"
    write_instance_png(path, np.full((8, 16), 7, np.uint16))
    return path


def test_error_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["convert-cityscapes", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err and "Traceback" not in err


def test_error_split_without_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single_image_tree(tmp_path)
    code, err = run_cli(["convert-cityscapes", str(tmp_path), "--splits", "val", "train"], capsys)
    assert code == 2
    assert str(tmp_path / "gtFine" / "train" / "*" / "*_instanceIds.png") in err
    assert not (tmp_path / "gtFine" / "cityscapes_panoptic_val.json").exists()  # checked before any work


@pytest.mark.parametrize("workers", ["1", "2"])
def test_error_truncated_png(tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str) -> None:
    path = single_image_tree(tmp_path)
    write_instance_png(path, np.random.default_rng(0).integers(0, 34, (64, 128)).astype(np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    second = path.with_name("lindau_000001_000019_gtFine_instanceIds.png")
    write_instance_png(second, np.full((8, 16), 7, np.uint16))
    code, err = run_cli(["convert-cityscapes", str(tmp_path / "gtFine"), "--splits", "val", "--workers", workers], capsys)
    assert code == 2 and str(path) in err and "corrupt or truncated" in err


def test_error_not_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = single_image_tree(tmp_path)
    path.write_bytes(b"this is not an image")
    code, err = run_cli(["convert-cityscapes", str(tmp_path), "--splits", "val"], capsys)
    assert code == 2 and str(path) in err


@pytest.mark.parametrize("value, label", [(40, 40), (35001, 35)])
def test_error_undefined_label(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: int, label: int) -> None:
    path = single_image_tree(tmp_path)
    ids = np.full((8, 16), 7, np.uint16)
    ids[2, 3] = value
    write_instance_png(path, ids)
    code, err = run_cli(["convert-cityscapes", str(tmp_path), "--splits", "val", "--workers", "1"], capsys)
    assert code == 2 and str(path) in err and str(value) in err and f"[{label}]" in err


def test_error_eight_bit_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = single_image_tree(tmp_path)
    Image.fromarray(np.full((8, 16), 7, np.uint8)).save(path)
    code, err = run_cli(["convert-cityscapes", str(tmp_path), "--splits", "val"], capsys)
    assert code == 2 and str(path) in err and "8-bit" in err


def test_cli_convert(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert-cityscapes", str(tree / "gtFine"), "--output", str(tmp_path / "cli"), "--splits", "train",
                 "--use-train-id", "--workers", "2", "--no-progress"])
    assert code == 0
    assert str(tmp_path / "cli" / "cityscapes_panoptic_train_trainId.json") in capsys.readouterr().out
    reference_convert(tree / "gtFine", tmp_path / "ref", True, ["train"])
    assert_same_output(tmp_path / "cli", tmp_path / "ref")
