"""``detr-panoptic export``: safetensors and Hugging Face folders that read back bit-exactly, and bad input as
one error line with exit status 2."""
from __future__ import annotations

import pytest
import torch

from detr_panoptic.checkpoints import load_checkpoint, save_checkpoint
from detr_panoptic.cli import main
from tests.export.models import small_category_map, small_model

POSTPROCESS = {"threshold": 0.6, "merge_stuff": "merge", "min_area": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = small_model()
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, model, category_map=small_category_map(), model_config=model.config,
                    input_size={"min_size": 480, "max_size": 800}, postprocess=POSTPROCESS)
    return path, model


def _assert_same_checkpoint(loaded, model):
    expected, actual = model.state_dict(), loaded.model.state_dict()
    assert set(actual) == set(expected) and all(torch.equal(actual[k], expected[k]) for k in expected)
    assert loaded.category_map == small_category_map()
    assert loaded.input_size == (480, 800) and loaded.postprocess == POSTPROCESS


@pytest.mark.parametrize("fmt, reread", [("safetensors", "model.safetensors"), ("hf", ".")])
def test_export_reads_back_exactly(tmp_path, checkpoint, capsys, fmt, reread):
    path, model = checkpoint
    out = tmp_path / "out" / "nested"
    assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed and all((out / p).is_file() for p in printed)
    _assert_same_checkpoint(load_checkpoint(out / reread), model)


def _one_error_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("detr-panoptic export: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_format(tmp_path, checkpoint, capsys):
    _one_error_line(capsys, ["export", "-c", str(checkpoint[0]), "--format", "tflite", "--out", str(tmp_path)],
                    "tflite", "onnx, hf, safetensors")


def test_unwritable_out(tmp_path, checkpoint, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_error_line(capsys, ["export", "-c", str(checkpoint[0]), "-f", "hf", "--out", str(blocker)], str(blocker),
                    "not a folder")
    _one_error_line(capsys, ["export", "-c", str(checkpoint[0]), "-f", "hf", "--out", str(blocker / "sub")],
                    "cannot create")


def test_bad_checkpoint(tmp_path, capsys):
    _one_error_line(capsys, ["export", "-c", str(tmp_path / "missing.pth"), "-f", "hf", "--out", str(tmp_path)],
                    "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    _one_error_line(capsys, ["export", "-c", str(garbage), "-f", "safetensors", "--out", str(tmp_path / "o")],
                    "garbage.pth")


def test_missing_onnx_extra_gives_the_install_hint(tmp_path, checkpoint, capsys, monkeypatch):
    import importlib

    import detr_panoptic.export.onnx as onnx_export

    real = importlib.import_module

    def without_onnx(name, *args):
        if name in ("onnx", "onnxruntime", "onnxscript"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(onnx_export.importlib, "import_module", without_onnx)
    _one_error_line(capsys, ["export", "-c", str(checkpoint[0]), "-f", "onnx", "--out", str(tmp_path)],
                    "pip install 'detr-panoptic[onnx]'")
    from detr_panoptic.export.onnx_predictor import OnnxPredictor
    from detr_panoptic.utils.errors import UserInputError

    with pytest.raises(UserInputError, match="onnxruntime"):
        OnnxPredictor.from_pretrained(tmp_path)


def test_onnx_predictor_on_a_folder_that_is_not_an_export(tmp_path):
    from detr_panoptic.export.onnx_predictor import read_onnx_metadata

    with pytest.raises(FileNotFoundError, match="metadata.json"):
        read_onnx_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{\"format\": \"something else\"}")
    with pytest.raises(ValueError, match="not the metadata"):
        read_onnx_metadata(tmp_path)
