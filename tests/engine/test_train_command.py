"""End to end: synthetic Cityscapes -> conversion -> `detr-panoptic train` on a chained two-stage config,
with the real datasets and the in-memory PQ validation. Also the recipes' reference hyper-parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from detr_panoptic.cli import main
from detr_panoptic.config import load_config
from detr_panoptic.data.cityscapes import convert_cityscapes
from detr_panoptic.data.synthetic import make_synthetic_cityscapes
from detr_panoptic.engine.metrics_log import read_metrics
from detr_panoptic.utils.errors import UserInputError
from tests.engine.toys import TINY_MODEL


@pytest.mark.parametrize("name", ["stage1_freeze_transformer", "stage2_freeze_attention", "recipe_two_stages"])
def test_recipes_use_the_reference_hyper_parameters(name):
    for stage in load_config(f"cityscapes/{name}").resolve_stages():
        t = stage.train
        assert (t.lr, t.weight_decay, t.lr_backbone, t.batch_size, t.clip_max_norm, t.scheduler) == \
            (1e-4, 1e-4, 0.0, 1, 0.1, "step")
        assert stage.data.augment is False and stage.data.min_size == 800 and stage.data.max_size == 1333
        assert stage.data.root == "data/cityscapes" and stage.freeze.backbone


def test_two_stage_recipe_chains_stage2_to_stage1_best():
    stage1, stage2 = load_config("cityscapes/recipe_two_stages").resolve_stages()
    assert stage1.model.init == "coco-r50-panoptic" and stage1.freeze.transformer and not stage1.freeze.attention
    assert stage2.model.init == str(Path(stage1.train.output_dir) / "checkpoints" / "best.pth")
    assert stage2.freeze.attention and not stage2.freeze.transformer


def test_train_command_runs_both_stages_on_synthetic_cityscapes(tmp_path, capsys):
    root = make_synthetic_cityscapes(tmp_path / "cityscapes", train=4, val=2, size=(64, 128), seed=1)
    convert_cityscapes(root, splits=["train", "val"], workers=1, progress=False)
    config = {
        "name": "synthetic",
        "model": dict(TINY_MODEL, num_queries=12),
        "data": {"dataset": "cityscapes", "root": str(root), "min_size": 64, "max_size": 128, "workers": 0},
        "train": {"output_dir": str(tmp_path / "runs"), "batch_size": 2, "epochs": 1, "lr": 1e-3,
                  "eval_threshold": 0.0},
        "logging": {"progress": False, "tensorboard": False},
        "stages": [{"name": "stage1", "freeze": {"transformer": True}},
                   {"name": "stage2", "model": {"init": "@stage1/best"}, "freeze": {"attention": True}}],
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file), "--device", "cpu", "--set", "train.seed=5"]) == 0
    printed = capsys.readouterr().out
    for stage in ("stage1", "stage2"):
        out = tmp_path / "runs" / stage
        assert f"synthetic/{stage}: outputs in {out}" in printed
        assert (out / "checkpoints" / "best.pth").is_file() and (out / "config.yaml").is_file()
        val = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"]
        assert len(val) == 1 and 0.0 <= val[0]["pq"] <= 100.0 and "per_class" in val[0]
        # the collapse diagnostics and the detection figures of things ride along in every validation
        assert 0.0 <= val[0]["diag_memory_image_var"] <= 1.0 and "diag_box_centre_spread" in val[0]
        assert "things_recall" in val[0] and "detection_per_class" in val[0]
        assert load_config(out / "config.yaml").train.seed == 5
    stage2 = load_config(tmp_path / "runs" / "stage2" / "config.yaml")
    assert stage2.model.init == str(tmp_path / "runs" / "stage1" / "checkpoints" / "best.pth")
    # stage 2 started from stage 1's weights: its frozen attention layers still hold them
    best1 = torch.load(tmp_path / "runs" / "stage1" / "checkpoints" / "best.pth", weights_only=True)["model"]
    last2 = torch.load(tmp_path / "runs" / "stage2" / "checkpoints" / "last.pth", weights_only=True)["model"]
    key = "detr.transformer.encoder.layers.0.self_attn.in_proj_weight"
    assert torch.equal(best1[key], last2[key])
    assert not torch.equal(best1["detr.class_embed.weight"], last2["detr.class_embed.weight"])
    # The checkpoints record the resize they were trained with, for predict/evaluate/attention.
    from detr_panoptic.checkpoints import load_checkpoint

    assert load_checkpoint(tmp_path / "runs" / "stage2" / "checkpoints" / "best.pth").input_size == (64, 128)


def test_wandb_without_the_package_gives_the_install_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    from detr_panoptic.engine.metrics_log import WandbWriter

    with pytest.raises(UserInputError, match=r"pip install 'detr-panoptic\[wandb\]'"):
        WandbWriter(project="p", mode="offline", run_dir=tmp_path, name="n", config={})


def test_wandb_gets_records_and_checkpoint_artifacts(tmp_path, monkeypatch):
    """With a stand-in ``wandb`` module (the real one is an optional extra)."""
    import sys
    import types

    from detr_panoptic.engine.training import train_stage
    from tests.engine.toys import tiny_config, toy_datasets

    calls = {"init": [], "log": [], "artifacts": [], "finish": 0}

    class Run:
        id = "run123"

        def log(self, data, step):
            calls["log"].append((step, data))

        def log_artifact(self, artifact, aliases):
            calls["artifacts"].append((artifact.files, aliases))

        def finish(self):
            calls["finish"] += 1

    class Artifact:
        def __init__(self, name, type, metadata):
            self.files = []

        def add_file(self, path, name):
            self.files.append(name)

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run(), Artifact=Artifact)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = tiny_config(tmp_path / "run", train={"max_steps": 2},
                         logging={"wandb": True, "wandb_log_checkpoints": True, "log_every_steps": 1})
    train_stage(config, datasets=toy_datasets(), evaluate=lambda model: {"pq": 12.0})
    assert calls["init"][0]["mode"] == "offline" and calls["init"][0]["project"] == "detr-panoptic"
    assert [step for step, _ in calls["log"]] == [1, 2, 2]
    assert "train/loss_ce" in calls["log"][0][1] and calls["log"][-1][1]["val/pq"] == 12.0
    assert {"train/class_error", "train/class_accuracy"} <= set(calls["log"][0][1])
    assert (["best.pth"], ["best", "step-2"]) in calls["artifacts"]
    assert (["last.pth"], ["last", "step-2"]) in calls["artifacts"]
    assert calls["finish"] == 1
