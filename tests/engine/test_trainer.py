"""A short run on generated data: run folder, metrics, checkpoints, divergence, accumulation."""
from __future__ import annotations

import json

import pytest
import torch

from detr_panoptic.cli import main
from detr_panoptic.config import load_config
from detr_panoptic.engine import training
from detr_panoptic.engine.metrics_log import read_metrics
from detr_panoptic.engine.trainer import TrainingDiverged
from detr_panoptic.engine.training import train_stage
from detr_panoptic.utils.errors import UserInputError
from tests.engine.toys import ToyPanoptic, tiny_config, toy_datasets


class ScriptedEval:
    """Stand-in validation returning the given PQ values in turn."""

    def __init__(self, *pqs: float) -> None:
        self.pqs = list(pqs)
        self.calls = 0

    def __call__(self, model):
        assert not model.training
        pq = self.pqs[min(self.calls, len(self.pqs) - 1)]
        self.calls += 1
        return {"pq": pq, "sq": 80.0, "rq": pq / 0.8, "pq_things": pq, "pq_stuff": pq, "per_class": {"7": {"pq": pq}}}


def test_run_folder_metrics_and_checkpoints(tmp_path):
    config = tiny_config(tmp_path / "run", train={"checkpoint_every_steps": 3}, logging={"tensorboard": True})
    evaluate = ScriptedEval(30.0, 20.0)
    result = train_stage(config, datasets=toy_datasets(), evaluate=evaluate)
    out = tmp_path / "run"
    assert load_config(out / "config.yaml") == config
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    val_records = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train_records] == list(range(1, 9))  # 8 images, batch 2, 2 epochs
    for key in ("epoch", "lr", "loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice",
                "loss_ce_0", "class_accuracy", "class_error", "step_time", "data_time"):
        assert key in train_records[0]
    assert all(r["class_accuracy"] + r["class_error"] == pytest.approx(100.0) for r in train_records)
    assert [(r["step"], r["epoch"], r["pq"]) for r in val_records] == [(4, 0, 30.0), (8, 1, 20.0)]
    assert evaluate.calls == 2  # the end-of-training validation is not repeated at step 8
    assert list((out / "tb").iterdir())
    last = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    best = torch.load(out / "checkpoints" / "best.pth", weights_only=True)
    assert last["step"] == 8 and last["epoch"] == 2 and last["best_pq"] == 30.0
    assert best["step"] == 4 and "optimizer" not in best
    assert last["detr_panoptic"]["format_version"] == 1
    assert last["detr_panoptic"]["category_map"]["class_ids"] == [7, 24, 26]
    assert {"optimizer", "lr_scheduler", "rng", "run_state"} <= set(last)
    assert "detr.class_embed.weight" in last["model"] and "mask_head.lay1.weight" in last["model"]
    assert result.best_pq == 30.0 and result.best_checkpoint == out / "checkpoints" / "best.pth"
    # frozen backbone untouched, heads trained
    from detr_panoptic.checkpoints import load_checkpoint

    loaded = load_checkpoint(out / "checkpoints" / "last.pth")
    assert loaded.model.num_classes == 3 and loaded.category_map.class_ids == (7, 24, 26)
    # a second call finds the run complete and does nothing
    again = train_stage(config, datasets=toy_datasets(), evaluate=evaluate)
    assert evaluate.calls == 2 and again.best_pq == 30.0


class NaNAfter(ToyPanoptic):
    """Returns NaN images from the ``after``-th item read on (workers=0: reads happen in step order)."""

    def __init__(self, after: int) -> None:
        super().__init__(8)
        self.after = after
        self.reads = 0

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        self.reads += 1
        if self.reads > self.after:
            image = torch.full_like(image, float("nan"))
        return image, target


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path / "run", train={"checkpoint_every_steps": 2, "epochs": 3})
    datasets = (NaNAfter(after=6), ToyPanoptic(2), toy_datasets()[2])
    with pytest.raises(TrainingDiverged, match=r"step 4 \(epoch 0\): non-finite loss \(loss=nan.*last good checkpoint .*last\.pth \(step 2\)") as info:
        train_stage(config, datasets=datasets, evaluate=ScriptedEval(1.0))
    assert info.value.step == 4
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)
    assert last["step"] == 2 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_cli_exits_non_zero_on_divergence(tmp_path, monkeypatch, capsys):
    def diverge(config):
        raise TrainingDiverged("toy: training stopped at step 7 (epoch 0): non-finite loss (loss=nan)", step=7)

    monkeypatch.setattr(training, "train", diverge)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train: {output_dir: x}\n")
    assert main(["train", str(config_file)]) == 1
    assert "step 7" in capsys.readouterr().err


def _final_parameters(tmp_path, name, **train):
    config = tiny_config(tmp_path / name, model={"dropout": 0.0}, train={"max_steps": 3, **train},
                         freeze={"backbone": True})
    datasets = (ToyPanoptic(8, num_segments=3), ToyPanoptic(2), toy_datasets()[2])
    train_stage(config, datasets=datasets, evaluate=ScriptedEval(1.0))
    return torch.load(tmp_path / name / "checkpoints" / "last.pth", weights_only=True)["model"]


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    big = _final_parameters(tmp_path, "big", batch_size=2, accumulate_steps=1)
    accumulated = _final_parameters(tmp_path, "acc", batch_size=1, accumulate_steps=2)
    initial = _final_parameters(tmp_path, "init", batch_size=2, max_steps=0)
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=2e-5, msg=key)
    moved = (big["detr.class_embed.weight"] - initial["detr.class_embed.weight"]).abs().max()
    assert moved > 1e-4  # the runs did train


def test_metrics_records_are_json_lines(tmp_path):
    config = tiny_config(tmp_path / "run", train={"max_steps": 2}, logging={"log_every_steps": 5})
    train_stage(config, datasets=toy_datasets(), evaluate=ScriptedEval(5.0))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["train", "train", "val"]  # every step in the JSONL file; final validation at the end


class _RandomItems(torch.utils.data.Dataset):
    """Items that are pure randomness, like a random augmentation."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.rand(1), {"index": index}


def _read(epoch, *, workers=0, start=0):
    from detr_panoptic.engine.trainer import EpochBatches

    batches = EpochBatches(_RandomItems(), batch_size=2, seed=1, workers=workers)
    return [(int(t["index"]), float(x)) for images, targets in batches.iterate(epoch, start)
            for x, t in zip(images, targets)]


def test_item_randomness_is_independent_of_workers_and_restart_position():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    full = _read(2)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG stream is not consumed
    assert _read(2, workers=2) == full
    assert _read(2, start=1) == full[2:]
    assert dict(_read(3)) != dict(full)  # a new epoch draws new randomness for the same items


def test_last_checkpoint_is_rewritten_at_an_epoch_end_that_follows_a_step_save(tmp_path, monkeypatch):
    from detr_panoptic.engine import hooks

    writes = []
    original = hooks.CheckpointHook._write

    def spy(self, trainer, extra, path, alias):
        if extra is not None and alias == "last":
            writes.append((extra["step"], extra["run_state"]["epoch"], extra["run_state"]["position"], extra["best_pq"]))
        original(self, trainer, extra, path, alias)

    monkeypatch.setattr(hooks.CheckpointHook, "_write", spy)
    config = tiny_config(tmp_path / "run", train={"checkpoint_every_steps": 2})
    train_stage(config, datasets=toy_datasets(), evaluate=ScriptedEval(30.0, 20.0))
    # step 4 ends epoch 0: saved by the step hook, then again with the new epoch and the best PQ
    assert (4, 0, 4, -1.0) in writes and (4, 1, 0, 30.0) in writes
    assert writes[-1] == (8, 2, 0, 30.0)


def test_resume_with_other_trainable_parameters_is_refused(tmp_path):
    from detr_panoptic.utils.errors import UserInputError

    config = tiny_config(tmp_path / "run", train={"max_steps": 1, "epochs": 1})
    train_stage(config, datasets=toy_datasets(), evaluate=ScriptedEval(1.0))
    changed = tiny_config(tmp_path / "run", train={"epochs": 2}, freeze={"transformer": True})
    with pytest.raises(UserInputError, match="trainable parameters differ"):
        train_stage(changed, datasets=toy_datasets(), evaluate=ScriptedEval(1.0))


def test_trainable_batch_norms_keep_the_checkpoint_layout_and_resume(tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detr_panoptic.checkpoints import load_pretrained

    config = tiny_config(tmp_path, freeze={"backbone": False, "batch_norm": False},
                         train={"lr_backbone": 1e-3, "epochs": 1})
    train_stage(config, datasets=toy_datasets(4), evaluate=ScriptedEval(1.0))
    saved = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)
    fresh = training.build_model(config.model, toy_datasets()[2])
    assert set(saved["model"]) == set(fresh.state_dict())  # the official layout: no num_batches_tracked
    model = load_pretrained(tmp_path / "checkpoints" / "last.pth")  # frozen norms again
    body, fresh_body = model.detr.backbone[0].body, fresh.detr.backbone[0].body
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert not torch.equal(body.layer2[0].bn1.running_var, fresh_body.layer2[0].bn1.running_var)  # trained
    assert torch.equal(body.bn1.running_var, fresh_body.bn1.running_var)  # the stem stays frozen (reference)
    # Resuming (more epochs) rebuilds the trainable norms and continues with the saved optimizer state.
    longer = tiny_config(tmp_path, freeze={"backbone": False, "batch_norm": False},
                         train={"lr_backbone": 1e-3, "epochs": 2})
    result = train_stage(longer, datasets=toy_datasets(4), evaluate=ScriptedEval(1.0))
    assert result.steps == 4


def test_trainable_batch_norms_need_a_training_backbone(tmp_path):
    config = tiny_config(tmp_path, freeze={"batch_norm": False})
    with pytest.raises(UserInputError, match="batch_norm"):
        train_stage(config, datasets=toy_datasets(4), evaluate=ScriptedEval(1.0))


def test_query_groups_train_through_train_stage_and_keep_official_checkpoints(tmp_path, monkeypatch):
    """``train.query_groups: 2`` reaches the model (its extra queries train), checkpoints hold the official keys
    only, and a resumed run rebuilds the groups and continues."""
    seen = []
    real = training.prepare_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model)
        return model

    monkeypatch.setattr(training, "prepare_model", spy)
    config = tiny_config(tmp_path / "run", train={"query_groups": 2, "max_steps": 2})
    train_stage(config, datasets=toy_datasets(), evaluate=ScriptedEval(10.0))
    model = seen[-1]
    assert model.query_groups == 2 and model.group_query_embed is not None
    from detr_panoptic.models.detr import QUERY_GROUPS_SEED

    initial = torch.Generator().manual_seed(QUERY_GROUPS_SEED)
    start = torch.randn(model.group_query_embed.shape, generator=initial)
    assert not torch.equal(model.group_query_embed.detach().cpu(), start)  # the extra queries were trained
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)
    assert not any("group_query" in key for key in last["model"])
    resumed = tiny_config(tmp_path / "run", train={"query_groups": 2, "max_steps": 4})
    train_stage(resumed, datasets=toy_datasets(), evaluate=ScriptedEval(10.0))
    assert seen[-1].query_groups == 2
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)["step"] == 4
