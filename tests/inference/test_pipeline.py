"""The one prediction pipeline: training validation == evaluate, one preprocessing, one kept-query rule,
unused class indices, Pillow-exact resizing, and restartable outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_panoptic.checkpoints import save_checkpoint
from detr_panoptic.data.categories import coco_category_map
from detr_panoptic.engine.training import make_validator
from detr_panoptic.inference import (
    DatasetSamples,
    PanopticPredictor,
    PanopticWriter,
    PredictorSettings,
    evaluate_dataset,
    predict_to_folder,
    preprocess,
)
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.outputs import KeptQueries, PanopticResult
from detr_panoptic.models.postprocess import kept_queries, nearest_resize_ids
from detr_panoptic.utils.errors import UserInputError

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 32, "num_queries": 6, "dropout": 0.0}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """One intra-op thread for these model runs (the fixture lives in tests/conftest.py)."""


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    from detr_panoptic.data import convert_cityscapes, make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=0, val=4, size=(64, 128), seed=5)
    convert_cityscapes(root, splits=("val",), workers=1, progress=False)
    return root


def val_set(root: Path, **kwargs):
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset

    return cityscapes_panoptic_dataset(root, "val", min_size=48, max_size=96, **kwargs)


def confident_model(num_classes: int, *, seed: int = 0) -> PanopticDETR:
    """A tiny random model whose queries are kept at threshold 0 (segments of several classes)."""
    torch.manual_seed(seed)
    return PanopticDETR(num_classes, **TINY).eval()


class DegradedOracle(torch.nn.Module):
    """``predict`` returns the ground truth of the image it is given (found by the input tensor), with every
    image's first segment dropped and the right quarter of the second turned void: PQ strictly between
    0 and 100, the same whichever path asks."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.num_classes = dataset.category_map.num_classes
        self.truth = {}
        for sample in DatasetSamples(dataset, min_size=48, max_size=96):
            ids = sample.target["gt_id_map"].clone()
            segments = [dict(s) for s in sample.target["gt_segments"]]
            ids[ids == segments[0]["id"]] = 0
            second = ids == segments[1]["id"]
            second[:, : 3 * ids.shape[1] // 4] = False
            ids[second] = 0
            renumbered = torch.zeros_like(ids)
            kept = []
            for k, segment in enumerate(segments[1:], start=1):
                renumbered[ids == segment["id"]] = k
                kept.append({"id": k, "category_id": segment["category_id"], "isthing": False,
                             "area": int((ids == segment["id"]).sum()), "score": 1.0})
            nothing = torch.zeros(0, dtype=torch.long)
            self.truth[self._key(sample.image)] = PanopticResult(
                renumbered, kept, KeptQueries(nothing, nothing, nothing, torch.zeros(0), torch.zeros(0, 4)))

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return (tuple(image.shape), round(float(image.double().sum()), 4))

    def predict(self, images, *, target_sizes):
        return [self.truth[self._key(image)] for image in images]


class OraclePredictor(PanopticPredictor):
    """The real predictor (preprocessing, batching) around a ``DegradedOracle``'s canned results."""

    def predict_tensors(self, images, orig_sizes):
        return self.model.predict(images, target_sizes=list(orig_sizes))


def test_training_validation_pq_equals_evaluate_pq(cityscapes, tmp_path, monkeypatch):
    import detr_panoptic.inference

    monkeypatch.setattr(detr_panoptic.inference, "PanopticPredictor", OraclePredictor)  # make_validator's
    dataset = val_set(cityscapes)
    model = DegradedOracle(dataset)
    validate = make_validator(dataset, dataset.category_map, min_size=48, max_size=96, threshold=0.5,
                              batch_size=2, rank=0, world_size=1, device=torch.device("cpu"))
    during_training = validate(model)
    settings = PredictorSettings(dataset.category_map, min_size=48, max_size=96, threshold=0.5)
    predictor = OraclePredictor(model, settings, device="cpu")
    files = evaluate_dataset(predictor, dataset, tmp_path / "eval", workers=1, progress=False, chart=False)
    in_memory = evaluate_dataset(predictor, dataset, tmp_path / "mem", write=False, progress=False, chart=False)
    assert files["num_images"] == 4
    assert 0 < files["metrics"]["pq"] < 100 and files["metrics"]["sq"] < 100
    assert files["metrics"]["things_kept_ratio"] == 0.0  # the oracle keeps no queries: nothing found
    assert during_training["things_recall"] == 0.0 and during_training["detection_per_class"]
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff"):
        assert during_training[key] == pytest.approx(files["metrics"][key], abs=1e-9), key
        assert in_memory["metrics"][key] == pytest.approx(files["metrics"][key], abs=1e-9), key
    per_class = {str(k): v for k, v in during_training["per_class"].items()}
    assert per_class.keys() == files["metrics"]["per_class"].keys()
    for key, value in files["metrics"]["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert per_class[key][metric] == pytest.approx(value[metric], abs=1e-9), (key, metric)


def test_the_dataset_and_the_predictor_see_the_same_tensors(cityscapes):
    dataset = val_set(cityscapes)
    samples = DatasetSamples(dataset, min_size=48, max_size=96)
    for index in range(len(dataset)):
        transformed, _ = dataset[index]  # the dataset's evaluation transform
        sample = samples[index]
        assert torch.equal(transformed, sample.image)
        from_file = preprocess(Image.open(sample.path), 48, 96)  # what predict feeds the model
        assert torch.equal(from_file, sample.image)


def _unused_index_model() -> tuple[PanopticDETR, list[int]]:
    """250 classes in the official layout; queries 0-2 pick unused class indices, queries 3-5 'person'."""
    categories = coco_category_map()
    unused = [i for i, c in enumerate(categories.class_ids) if c < 0][:3]
    model = confident_model(250)
    with torch.no_grad():
        model.detr.class_embed.weight.zero_()
        model.detr.class_embed.bias.fill_(-10.0)
        model.detr.query_embed.weight.zero_()  # every query sees the same input ...
        model.detr.class_embed.bias[1] = 10.0  # ... and picks person (a thing) ...
    # ... except queries 0-2, whose class head output is steered to unused indices by a per-query offset
    offsets = torch.zeros(6, 251)
    for query, index in enumerate(unused):
        offsets[query, index] = 30.0
    head = model.detr.class_embed

    def steer(module, inputs, output):
        return output + offsets.to(output.dtype)

    head.register_forward_hook(steer)
    return model, unused


def test_unused_class_indices_are_no_object_everywhere(tmp_path):
    model, unused = _unused_index_model()
    categories = coco_category_map()
    image = torch.rand(3, 64, 96)
    with torch.no_grad():
        logits = model([image]).pred_logits
    assert set(logits[0, :3].argmax(-1).tolist()) == set(unused)  # the design: they would be kept ...
    assert kept_queries(logits, 0.5).sum() == 6
    keep = kept_queries(logits, 0.5, categories.class_to_category_tensor())
    assert keep[0].tolist() == [False] * 3 + [True] * 3  # ... but unused indices are no object
    predictor = PanopticPredictor(model, PredictorSettings(categories, min_size=64, max_size=96, threshold=0.5),
                                  device="cpu")
    result = predictor(image)[0]
    assert result.kept.indices.tolist() == [3, 4, 5] and set(result.kept.category_ids.tolist()) == {1}
    assert {s["category_id"] for s in result.segments_info} == {1}
    assert predictor.attention(Image.new("RGB", (96, 64))).queries.tolist() == [3, 4, 5]
    # predict writes it (it used to stop with "unknown category ids [-1]")
    Image.new("RGB", (96, 64), (90, 120, 30)).save(tmp_path / "a.png")
    summary = predict_to_folder(predictor, [str(tmp_path / "a.png")], tmp_path / "out", progress=False)
    data = json.loads(summary.predictions_json.read_text())
    assert {s["category_id"] for s in data["annotations"][0]["segments_info"]} <= {1}


@pytest.mark.parametrize("size_in, size_out", [((128, 192), (250, 390)), ((250, 390), (128, 192)),
                                                ((37, 53), (1000, 777)), ((1024, 2048), (800, 1600)),
                                                ((7, 3), (50, 29)), ((200, 334), (1024, 1711))])
def test_nearest_resize_is_bit_equal_to_pillow(size_in, size_out):
    ids = np.random.default_rng(1).integers(0, 2**31 - 1, size=size_in, dtype=np.int32)
    reference = np.asarray(Image.fromarray(ids, mode="I").resize(size_out[::-1], Image.NEAREST))
    ours = nearest_resize_ids(torch.from_numpy(ids.astype(np.int64)), size_out).numpy()
    assert ours.shape == reference.shape and (ours == reference).all()


def test_predictor_settings_come_from_the_checkpoint_and_flags_win(tmp_path, caplog):
    caplog.set_level("INFO", logger="detr_panoptic")
    dataset_map = coco_category_map()
    model = confident_model(250)
    path = save_checkpoint(tmp_path / "m.pth", model, category_map=dataset_map, model_config=model.config,
                           input_size={"min_size": 40, "max_size": 72},
                           postprocess={"threshold": 0.42, "merge_stuff": "merge", "min_area": 9})
    predictor = PanopticPredictor.from_pretrained(path, device="cpu")
    s = predictor.settings
    assert (s.min_size, s.max_size, s.threshold, s.merge_stuff, s.min_area) == (40, 72, 0.42, "merge", 9)
    assert "calibration" in caplog.text
    s = PanopticPredictor.from_pretrained(path, device="cpu", threshold=0.9, size=32).settings
    assert (s.min_size, s.max_size, s.threshold, s.merge_stuff) == (32, 72, 0.9, "merge")
    bare = save_checkpoint(tmp_path / "bare.pth", model, category_map=dataset_map, model_config=model.config)
    s = PanopticPredictor.from_pretrained(bare, device="cpu").settings
    assert (s.min_size, s.max_size, s.threshold, s.merge_stuff, s.min_area) == (800, 1333, 0.85, "reference", 4)
    assert not hasattr(predictor.model, "category_map")
    with pytest.raises(UserInputError, match="no categories"):
        torch.save({"model": PanopticDETR(7, **TINY).state_dict()}, tmp_path / "seven.pth")
        PanopticPredictor.from_pretrained(tmp_path / "seven.pth", device="cpu")


def test_evaluate_resumes_after_an_interruption(cityscapes, tmp_path, monkeypatch):
    dataset = val_set(cityscapes)
    predictor = PanopticPredictor(confident_model(dataset.category_map.num_classes),
                                  PredictorSettings(dataset.category_map, min_size=48, max_size=96, threshold=0.0),
                                  device="cpu")
    full = evaluate_dataset(predictor, dataset, tmp_path / "full", workers=1, progress=False, chart=False)
    calls = []
    real = PanopticWriter.process

    def crash_on_third(self, samples, results):
        calls.append(len(samples))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C would, after two images were written
        real(self, samples, results)

    monkeypatch.setattr(PanopticWriter, "process", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(predictor, dataset, tmp_path / "cut", workers=1, progress=False, chart=False,
                         num_workers=0)
    monkeypatch.setattr(PanopticWriter, "process", real)
    assert not (tmp_path / "cut" / "predictions.json").exists()
    written = sorted((tmp_path / "cut" / "predictions").glob("*.png"))
    assert len(written) == 2 and (tmp_path / "cut" / "predictions.json.progress.jsonl").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    again = evaluate_dataset(predictor, dataset, tmp_path / "cut", workers=1, progress=False, chart=False)
    assert {p.name: p.stat().st_mtime_ns for p in written} == stamps  # not predicted again
    assert again["metrics"]["pq"] == pytest.approx(full["metrics"]["pq"], abs=1e-9)
    assert not (tmp_path / "cut" / "predictions.json.progress.jsonl").exists()
    # other settings in the same folder: everything is predicted again
    other = predictor.with_settings(threshold=0.5)
    evaluate_dataset(other, dataset, tmp_path / "cut", workers=1, progress=False, chart=False)
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in written)


@pytest.mark.slow
def test_predict_killed_mid_run_finishes_without_redoing_images(tmp_path):
    """SIGKILL during ``detr-panoptic predict`` on a folder, then the same command again."""
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(40):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / f"{k:03d}.jpg")
    model = confident_model(250)
    checkpoint = save_checkpoint(tmp_path / "m.pth", model, category_map=coco_category_map(),
                                 model_config=model.config, postprocess={"threshold": 0.0})
    out = tmp_path / "out"
    arguments = ["predict", "-c", str(checkpoint), "--device", "cpu", "--size", "96", "--out", str(out), str(images)]
    command = [sys.executable, "-m", "detr_panoptic.cli", *arguments]
    # the killed run: the same command, which stops (until killed) once 6 images are in the journal
    victim = tmp_path / "victim.py"
    victim.write_text(
        "import sys, threading\n"
        "from detr_panoptic.cli import main\n"
        "from detr_panoptic.inference import evaluators\n"
        "append, count = evaluators.PanopticWriter._append, [0]\n"
        "def stopping_append(self, record):\n"
        "    append(self, record)\n"
        "    count[0] += 1\n"
        "    if count[0] == 6:\n"
        "        print('VICTIM STOPPED', flush=True)\n"
        "        threading.Event().wait()\n"
        "evaluators.PanopticWriter._append = stopping_append\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(victim), *arguments], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    journal = out / "predictions.json.progress.jsonl"
    lines = []
    while not (lines and lines[-1].startswith("VICTIM STOPPED")) and process.poll() is None:
        lines.append(process.stdout.readline())
    assert process.poll() is None, "predict ended before it could be killed: " + "".join(lines)
    assert len(journal.read_text().splitlines()) >= 6
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "predictions.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.png")}
    assert 5 <= len(done) < 40
    finished = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "kept from an interrupted run" in finished.stdout
    changed = [name for name, stamp in done.items() if (out / "predictions" / name).stat().st_mtime_ns != stamp]
    assert len(changed) <= 1  # at most the image whose journal line the kill cut off is predicted again
    data = json.loads((out / "predictions.json").read_text())
    assert len(data["images"]) == len(data["annotations"]) == 40
    assert sorted(a["file_name"] for a in data["annotations"]) == [f"{k:03d}.png" for k in range(40)]
    assert len(list((out / "overlays").glob("*.png"))) == 40
    leftovers = [p for p in out.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))]
    assert not leftovers and not journal.exists()


def test_training_validation_cityscapes_scores_equal_cityscapes_eval(cityscapes, tmp_path, monkeypatch):
    """train.val_metrics [pq, miou, ap]: the in-memory scores equal those of evaluate's written files
    scored against gtFine (cityscapes-eval's evaluators, equal to cityscapesScripts')."""
    import detr_panoptic.inference

    monkeypatch.setattr(detr_panoptic.inference, "PanopticPredictor", OraclePredictor)
    dataset = val_set(cityscapes)
    model = DegradedOracle(dataset)
    validate = make_validator(dataset, dataset.category_map, min_size=48, max_size=96, threshold=0.5,
                              batch_size=2, rank=0, world_size=1, device=torch.device("cpu"),
                              metrics=("pq", "miou", "ap"))
    during_training = validate(model)
    settings = PredictorSettings(dataset.category_map, min_size=48, max_size=96, threshold=0.5)
    files = evaluate_dataset(OraclePredictor(model, settings, device="cpu"), dataset, tmp_path / "eval", workers=1,
                             progress=False, chart=False)["metrics"]
    assert 0 < files["miou"] < 100
    for key in ("miou", "iiou", "category_miou", "category_iiou", "ap", "ap50"):
        assert during_training[key] == pytest.approx(files[key], abs=1e-9), key
    plain = make_validator(dataset, dataset.category_map, min_size=48, max_size=96, threshold=0.5, batch_size=2,
                           rank=0, world_size=1, device=torch.device("cpu"))(model)
    assert "miou" not in plain  # PQ alone by default
