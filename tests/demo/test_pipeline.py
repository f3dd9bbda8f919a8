"""The demo: ``detr-panoptic demo --quick`` end to end (files, metrics.json structure, resume), and its parts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_panoptic.cli import main
from detr_panoptic.demo import pipeline as demo
from detr_panoptic.utils.errors import UserInputError

METRIC_KEYS = ("pq", "sq", "rq", "pq_things", "pq_stuff")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "--out", str(out), "--device", "cpu"])
    return out, code, stdout.getvalue()


@pytest.mark.slow
def test_quick_demo_writes_everything(quick_run: tuple[Path, int, str]) -> None:
    out, code, printed = quick_run
    assert code == 0
    for path in ("metrics.json", "report.html", "source_model.pth", "data/cityscapes/gtFine/cityscapes_panoptic_val.json",
                 "data/source/panoptic_train.json", "stage1/checkpoints/best.pth", "stage2/checkpoints/best.pth",
                 "stage2/metrics.jsonl", "eval/start/metrics.json", "eval/stage1/predictions.json",
                 "eval/stage2/metrics.json", "summary/plots/losses.png", "summary/plots/pq.png"):
        assert (out / path).is_file(), path
    assert sorted(p.name for p in (out / "summary" / "overlays").glob("*.png"))
    assert list((out / "summary" / "attention").rglob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 100.0
    assert set(metrics["stages"]) == {"start", "stage1", "stage2"}
    for stage in metrics["stages"].values():
        assert all(isinstance(stage[k], float) and 0.0 <= stage[k] <= 100.0 for k in METRIC_KEYS)
        assert {"things_recall", "things_kept_per_gt", "things_kept_ratio"} <= set(stage)
        assert isinstance(stage["miou"], float) and 0.0 <= stage["miou"] <= 100.0  # Cityscapes' pixel-level score
        assert stage["ap"] is None or 0.0 <= stage["ap"] <= 100.0  # None: no instance of >= 100 pixels at 64x128
    # the top level is the model the report shows: stage 2 calibrated (the quick config calibrates too)
    assert metrics["final"] == "calibrated" and metrics["pq"] == metrics["calibrated"]["pq"]
    assert metrics["checkpoint"] == metrics["calibrated"]["checkpoint"]
    assert {"data", "pretrain", "finetune", "evaluate", "total"} <= set(metrics["seconds"])
    assert metrics["source_domain"] is not None and "pq" in metrics["source_domain"]
    html = (out / "report.html").read_text()
    assert "PQ, mIoU and AP on the synthetic val split, per stage" in html and "data:image/" in html
    assert html.count("things found") == 1 and html.index("per stage") < html.index("Configuration")
    # what the command prints: the PQ table and where things are
    assert "start point" in printed and "stage 2 (attention frozen)" in printed and "report.html" in printed
    assert "mIoU" in printed and "AP" in printed


@pytest.mark.slow
def test_quick_demo_calibrates_on_train_images_and_evaluates_that_setting_on_val(quick_run) -> None:
    """The calibrate phase: the sweep over the first train images (summary/calibration.json), its best
    setting stored in a copy of the final checkpoint, and that copy evaluated on val as a fourth row."""
    import torch

    from detr_panoptic.inference.calibrate import CalibrationTable

    out, _, printed = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    calibrated = metrics["calibrated"]
    table = CalibrationTable.from_json(json.loads((out / "summary" / "calibration.json").read_text()))
    assert table.num_images == calibrated["train_images"] == 4
    assert calibrated["setting"] == table.best.setting.as_dict()
    saved = torch.load(calibrated["checkpoint"], map_location="cpu", weights_only=True)
    assert saved["detr_panoptic"]["postprocess"] == calibrated["setting"]
    on_val = json.loads((out / "eval" / "calibrated" / "metrics.json").read_text())
    assert on_val["pq"] == pytest.approx(calibrated["pq"], abs=1e-3) and on_val["checkpoint"] == calibrated["checkpoint"]
    assert "stage 2, calibrated" in printed and "Chosen:" in (out / "report.html").read_text()
    assert "calibrate" in metrics["seconds"]


@pytest.mark.slow
def test_source_model_is_in_the_official_format(quick_run: tuple[Path, int, str]) -> None:
    out, _, _ = quick_run
    saved = torch.load(out / "source_model.pth", map_location="cpu", weights_only=True)
    assert "optimizer" not in saved and "detr.class_embed.weight" in saved["model"]
    assert any(k.startswith("detr.backbone.0.body.layer1.") for k in saved["model"])
    names = {c["name"] for c in saved["detr_panoptic"]["category_map"]["categories"]}
    assert {"person", "sky-other-merged", "building-other-merged"} <= names and "rider" not in names
    # the source label set differs from the fine-tuned model's (Cityscapes names)
    final = torch.load(out / "stage2" / "checkpoints" / "best.pth", map_location="cpu", weights_only=True)
    final_names = {c["name"] for c in final["detr_panoptic"]["category_map"]["categories"]}
    assert {"rider", "sky", "building"} <= final_names


@pytest.mark.slow
def test_rerun_reuses_finished_phases_and_refuses_other_settings(quick_run: tuple[Path, int, str]) -> None:
    out, _, _ = quick_run
    before = (out / "stage2" / "checkpoints" / "best.pth").stat().st_mtime_ns
    summary = demo.run_demo(out, quick=True, device="cpu", progress=False)
    assert (out / "stage2" / "checkpoints" / "best.pth").stat().st_mtime_ns == before
    assert summary["seconds"]["pretrain"] < 10 and summary["seconds"]["finetune"] < 10
    with pytest.raises(UserInputError, match="other settings"):
        demo.run_demo(out, quick=True, device="cpu", seed=1)


def test_source_segments_use_the_coarser_coco_label_set() -> None:
    from cityscapesscripts.helpers.labels import labels

    names = {label.id: label.name for label in labels}
    instances = {label.id: bool(label.hasInstances) for label in labels}
    ids = np.array([[23, 23, 11, 12],           # sky | building, wall -> one building-other-merged segment
                    [24000, 25000, 17, 24],     # person, rider -> two person instances | pole -> void | crowd
                    [7, 7, 26001, 26001]], np.uint16)
    id_map, segments = demo.source_segments(ids, names, instances)
    by_id = {s["id"]: s for s in segments}
    assert id_map[1, 2] == 0  # pole: no COCO class
    assert id_map[0, 2] == id_map[0, 3] and by_id[int(id_map[0, 2])]["category_id"] == 197
    person_a, person_b = by_id[int(id_map[1, 0])], by_id[int(id_map[1, 1])]
    assert person_a["id"] != person_b["id"] and person_a["category_id"] == person_b["category_id"] == 1
    assert by_id[int(id_map[1, 3])]["iscrowd"] == 1 and person_a["iscrowd"] == 0
    assert by_id[int(id_map[2, 2])]["category_id"] == 3
    assert {s["category_id"] for s in segments} == {187, 197, 1, 149, 3}


def test_calibrated_backbone_has_unit_scale_activations() -> None:
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(0)
    model = PanopticDETR(3, backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=4)
    images = [torch.randn(3, 64, 96) for _ in range(2)]
    batch, mask = torch.stack(images), torch.zeros(2, 64, 96, dtype=torch.bool)
    before = model.detr.backbone[0](batch, mask)[-1][0].std().item()
    assert demo.calibrate_frozen_batchnorm(model, images) == 20
    after = model.detr.backbone[0](batch, mask)[-1][0]
    assert after.std().item() != pytest.approx(before, rel=0.1)
    assert 0.2 < after.std().item() < 5.0  # ResNet-18 blocks add two unit-variance branches at most


def test_demo_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("demo: {sizes: [1, 2]}\nstages: [{name: pretrain}, {name: stage1}, {name: stage2}]\n")
    with pytest.raises(UserInputError, match="demo.sizes"):
        demo.load_demo_config(bad)
    bad.write_text("demo: {train_images: many}\nstages: [{name: pretrain}, {name: stage1}, {name: stage2}]\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: demo.train_images must be an integer, got 'many'"):
        demo.load_demo_config(bad)  # the training config's type check (config.section_from_dict)
    bad.write_text("demo: {size: [64, 16]}\nstages: [{name: pretrain}, {name: stage1}, {name: stage2}]\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: demo.size must be \[height, width\] \(>= 32\)"):
        demo.load_demo_config(bad)
    bad.write_text("demo: {scene: {near: 2}}\nstages: [{name: pretrain}, {name: stage1}, {name: stage2}]\n")
    with pytest.raises(UserInputError, match="demo.scene"):
        demo.load_demo_config(bad)
    bad.write_text("demo: {scene: {far: 1}}\nstages: [{name: pretrain}, {name: stage1}, {name: stage2}]\n")
    with pytest.raises(UserInputError, match="demo.scene"):
        demo.load_demo_config(bad)
    bad.write_text("demo: {size: [64, 128]}\nstages: [{name: stage1}]\n")
    with pytest.raises(UserInputError, match="pretrain, stage1, stage2"):
        demo.load_demo_config(bad)
    with pytest.raises(FileNotFoundError):
        demo.run_demo(tmp_path / "out", config_path=tmp_path / "missing.yaml")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something.txt").write_text("x")
    with pytest.raises(UserInputError, match="not a demo run folder"):
        demo.run_demo(tmp_path / "taken", quick=True)


def test_both_demo_configs_load() -> None:
    for quick in (False, True):
        settings, raw = demo.load_demo_config(demo.demo_config_path(quick))
        assert settings.val_images > 0 and [s["name"] for s in raw["stages"]] == ["pretrain", "stage1", "stage2"]


@pytest.fixture(scope="module")
def start_point_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    """``--pretrain-only`` on the quick config, then a quick demo whose ``demo.start_point`` is that file."""
    base = tmp_path_factory.mktemp("start_point")
    built = demo.run_demo(base / "source", quick=True, device="cpu", progress=False, pretrain_only=True)
    weights = Path(built["source_model"])
    text = demo.demo_config_path(quick=True).read_text()
    config = base / "quick_with_start.yaml"
    config.write_text(text.replace("demo:\n", f"demo:\n  start_point: {weights}\n", 1))
    summary = demo.run_demo(base / "run", config_path=config, device="cpu", progress=False)
    return weights, built, base / "run", summary


@pytest.mark.slow
def test_pretrain_only_writes_an_fp16_start_point_with_its_recipe(start_point_runs) -> None:
    from safetensors import safe_open

    from detr_panoptic.checkpoints import load_checkpoint, sidecar_path

    weights, built, _, _ = start_point_runs
    assert set(built) >= {"source_domain", "source_model", "seconds"} and "stages" not in built
    with safe_open(str(weights), "pt") as f:
        floats = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}  # noqa: SIM118
        assert floats == {torch.float16}
    about = json.loads(sidecar_path(weights).read_text())["demo"]
    assert "detr-panoptic demo --pretrain-only" in about["command"] and about["steps"] == 4
    assert about["command"].startswith(f"OMP_NUM_THREADS={about['threads']} ")
    assert set(about["source_domain"]) >= set(METRIC_KEYS)
    curve = about["source_val_curve"]  # every validation of the pre-training, the last one = source_domain
    assert curve and curve[-1]["step"] == 4 and abs(curve[-1]["pq"] - about["source_domain"]["pq"]) <= 0.01
    assert about["train_seconds"] > 0
    loaded = load_checkpoint(weights)
    assert next(loaded.model.parameters()).dtype == torch.float32  # loading casts back
    fp32 = load_checkpoint(weights.with_suffix(".pth")).model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, fp32[key].half().to(value.dtype)), key


@pytest.mark.slow
def test_a_start_point_replaces_the_pre_training(start_point_runs) -> None:
    weights, _, out, summary = start_point_runs
    assert not (out / "pretrain").exists() and not (out / "data" / "source").exists()
    assert weights.name in summary["init"] and summary["source_domain"]["pq"] == pytest.approx(
        json.loads(Path(weights).with_suffix(".json").read_text())["demo"]["source_domain"]["pq"])
    assert (out / "stage2" / "checkpoints" / "best.pth").is_file() and set(summary["stages"]) == set(demo.PHASES)
    assert str(weights) in (out / "stage1" / "config.yaml").read_text()  # stage 1 starts from it


def test_start_point_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="--init"):
        demo.run_demo(tmp_path / "a", quick=True, init="x.pth", pretrain=True)
    config = tmp_path / "c.yaml"
    config.write_text(demo.demo_config_path(quick=True).read_text().replace(
        "demo:\n", "demo:\n  start_point: no_such_start.safetensors\n", 1))
    with pytest.raises(UserInputError, match="no_such_start.safetensors"):
        demo.run_demo(tmp_path / "b", config_path=config)
    config.write_text(demo.demo_config_path(quick=True).read_text().replace("demo:\n", "demo:\n  start_point: 3\n", 1))
    with pytest.raises(UserInputError, match="demo.start_point"):
        demo.load_demo_config(config)


def test_the_packaged_start_point_fits_the_demo_config_and_its_recipe() -> None:
    """The default demo starts from the packaged fp16 start point: at most 25 MB, the model of the config's
    ``model:`` section, the source label set, and a sidecar naming the command and steps that built it."""
    from detr_panoptic.checkpoints import load_checkpoint, sidecar_path

    settings, raw = demo.load_demo_config(demo.demo_config_path())
    path = demo.start_point_path(settings.start_point)
    assert path.stat().st_size <= 25 * 1024 * 1024
    loaded = load_checkpoint(path)
    for key in ("backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries"):
        assert loaded.model.config[key] == raw["model"][key], key
    assert {c.name for c in loaded.category_map.categories} == {c["name"] for c in demo.source_categories()}
    about = json.loads(sidecar_path(path).read_text())["demo"]
    pretrain = next(s for s in raw["stages"] if s["name"] == "pretrain")
    assert about["steps"] == pretrain["train"]["max_steps"] and about["config"] == "demo.yaml"
    assert about["command"] == f"OMP_NUM_THREADS={about['threads']} detr-panoptic demo --pretrain-only --config demo --seed 0"
    assert about["source_domain"]["pq"] > 0


@pytest.mark.slow
def test_pretrain_only_with_init_continues_from_a_start_point(start_point_runs, tmp_path: Path) -> None:
    """``--pretrain-only --init``: the pre-training starts from that model (no random initialisation) and the
    new sidecar says from which file (digest) and how that one was made."""
    from detr_panoptic.checkpoints import sidecar_path
    from detr_panoptic.utils.io import file_digest

    weights, _, _, _ = start_point_runs
    out = tmp_path / "continued"
    summary = demo.run_demo(out, quick=True, device="cpu", progress=False, pretrain_only=True, init=str(weights))
    assert not (out / "pretrain_init.pth").exists()  # not a random start
    assert str(weights) in (out / "pretrain" / "config.yaml").read_text()
    about = json.loads(sidecar_path(summary["source_model"]).read_text())["demo"]
    assert about["command"].endswith(f"--init {weights.name}")
    first = json.loads(sidecar_path(weights).read_text())["demo"]
    assert about["continued_from"]["sha256"] == file_digest(weights)
    assert about["continued_from"]["steps"] == first["steps"] and about["continued_from"]["command"] == first["command"]
    # the same folder with another --init is another run: refused, not mixed
    with pytest.raises(UserInputError, match="other settings"):
        demo.run_demo(out, quick=True, device="cpu", progress=False, pretrain_only=True,
                      init=str(weights.with_suffix(".pth")))


def _quick_wsd_config(tmp_path: Path, max_steps: int) -> Path:
    text = demo.demo_config_path(quick=True).read_text().replace(
        "train: {lr_backbone: 4.0e-4, max_steps: 4,",
        f"train: {{lr_backbone: 4.0e-4, scheduler: wsd, decay_steps: 2, max_steps: {max_steps},")
    assert "scheduler: wsd" in text
    path = tmp_path / f"wsd_{max_steps}.yaml"
    path.write_text(text)
    return path


def test_a_wsd_pre_training_may_change_length_while_stable(tmp_path: Path) -> None:
    """The run folder's fingerprint leaves out a wsd pre-training's ``max_steps`` (its stable part does not
    depend on it) but not a cosine one's; resuming with another length is refused once either length's decay
    has begun."""
    from detr_panoptic.demo.pipeline import check_pretrain_length

    def fingerprint(path: Path) -> str:
        settings, raw = demo.load_demo_config(path)
        return demo.run_fingerprint(settings, raw, init=None, seed=0)

    short, long = _quick_wsd_config(tmp_path, 10), _quick_wsd_config(tmp_path, 20)
    assert fingerprint(short) == fingerprint(long)
    cosine, longer = demo.demo_config_path(quick=True), tmp_path / "cosine_5.yaml"
    longer.write_text(cosine.read_text().replace("train: {lr_backbone: 4.0e-4, max_steps: 4,",
                                                 "train: {lr_backbone: 4.0e-4, max_steps: 5,"))
    assert fingerprint(cosine) != fingerprint(longer)

    def pretrain_config(path: Path):
        _, raw = demo.load_demo_config(path)
        source = {s: tmp_path / f"panoptic_{s}.json" for s in ("train", "val")}
        return demo.demo_configs(raw, out=tmp_path / "run", target_root=tmp_path, source=source, init=None,
                                 device="cpu", seed=0)[0]

    folder = tmp_path / "run" / "pretrain"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("train: {max_steps: 10}\n")
    check_pretrain_length(pretrain_config(long))  # no checkpoint yet: nothing to check
    for step, allowed in ((5, True), (8, True), (9, False), (10, False)):
        torch.save({"step": step}, folder / "checkpoints" / "last.pth")
        if allowed:  # 10 -> 20 before step 8 (= 10 - decay_steps 2): the rates so far are those of 20
            check_pretrain_length(pretrain_config(long))
        else:
            with pytest.raises(UserInputError, match="cannot be resumed with that length"):
                check_pretrain_length(pretrain_config(long))
    check_pretrain_length(pretrain_config(short))  # the same length resumes anywhere
