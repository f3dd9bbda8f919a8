"""train.denoising_* and train.one_to_many_*: training steps, official checkpoints, exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_panoptic.config import config_from_dict
from detr_panoptic.engine import hooks
from detr_panoptic.engine.training import train_stage
from detr_panoptic.models.denoising import DenoisingQueries
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.utils.errors import UserInputError
from tests.engine.toys import TINY_MODEL, SometimesEmpty, ToyPanoptic, tiny_config, toy_datasets

OPTIONS = {
    "denoising": {"denoising_groups": 2},
    "one_to_many": {"one_to_many_repeats": 2},
    "all_with_groups": {"denoising_groups": 2, "one_to_many_repeats": 3, "one_to_many_queries": 20, "query_groups": 2},
}


def _train_records(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_a_training_step_with_each_option_keeps_official_checkpoints(tmp_path, option):
    config = tiny_config(tmp_path, train={**OPTIONS[option], "max_steps": 2, "batch_size": 2})
    datasets = (SometimesEmpty(6), ToyPanoptic(2), toy_datasets()[2])  # some images have no target at all
    train_stage(config, datasets=datasets, evaluate=lambda model: {"pq": 1.0})
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    branches = [name for key, name in (("denoising_groups", "dn"), ("one_to_many_repeats", "o2m"))
                if key in OPTIONS[option]]
    for name in branches:
        assert {f"loss_{name}_{kind}{s}" for kind in ("ce", "bbox", "giou") for s in ("", "_0")} <= set(records[0])
        assert all(torch.isfinite(torch.tensor(r[f"loss_{name}_bbox"])) for r in records)
    official = set(PanopticDETR(3, **TINY_MODEL).state_dict())
    for path in ("last.pth", "best.pth"):
        saved = torch.load(tmp_path / "checkpoints" / path, weights_only=True)
        assert set(saved["model"]) == official, path
    state = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)["training_state"]
    assert {key.split(".")[1] for key in state if key.startswith("query_branches.")} == set(branches)


def test_branches_train_with_a_frozen_decoder(tmp_path):
    """With the transformer frozen (the demo's stage 1) the branches' own parameters still train."""
    config = tiny_config(tmp_path, freeze={"transformer": True}, train={"denoising_groups": 2, "max_steps": 2})
    train_stage(config, datasets=toy_datasets(), evaluate=lambda model: {"pq": 1.0})
    state = torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)["training_state"]
    start = DenoisingQueries(3, TINY_MODEL["hidden_dim"], groups=2).state_dict()
    assert not torch.equal(state["query_branches.dn.box_embed.0.weight"], start["box_embed.0.weight"])


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("option", ["denoising", "one_to_many"])
def test_resume_with_each_option_continues_exactly(tmp_path, monkeypatch, option):
    """Killed after step 3 (last.pth of step 2) and resumed: the same losses at every step and the same
    weights, training-only branches and optimizer state as the uninterrupted run."""
    train = {**OPTIONS[option], "query_groups": 2, "max_steps": 5, "checkpoint_every_steps": 1}
    train_stage(tiny_config(tmp_path / "straight", train=train), datasets=toy_datasets(),
                evaluate=lambda model: {"pq": 1.0})

    original = hooks.LRSchedulerHook.after_step

    def stop_after_step_3(self, trainer, record):
        original(self, trainer, record)
        if record["step"] == 3:
            raise Interrupted

    monkeypatch.setattr(hooks.LRSchedulerHook, "after_step", stop_after_step_3)
    config = tiny_config(tmp_path / "resumed", train=train)
    with pytest.raises(Interrupted):
        train_stage(config, datasets=toy_datasets(), evaluate=lambda model: {"pq": 1.0})
    monkeypatch.setattr(hooks.LRSchedulerHook, "after_step", original)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)["step"] == 2
    train_stage(config, datasets=toy_datasets(), evaluate=lambda model: {"pq": 1.0})

    straight, resumed = (_train_records(tmp_path / name) for name in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [{k: v for k, v in r.items() if k.startswith("loss")} for r in resumed] == \
        [{k: v for k, v in r.items() if k.startswith("loss")} for r in straight]
    a, b = (torch.load(tmp_path / name / "checkpoints" / "last.pth", weights_only=True) for name in ("straight", "resumed"))
    for part in ("model", "training_state"):
        assert set(a[part]) == set(b[part]) and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


def test_bad_option_values_are_refused():
    assert config_from_dict({}).train.denoising_groups == 0 and config_from_dict({}).train.one_to_many_repeats == 0
    for key, value in (("denoising_groups", -1), ("one_to_many_repeats", -2), ("denoising_label_noise", 1.5),
                       ("denoising_box_noise", -0.1), ("one_to_many_weight", -1.0)):
        with pytest.raises(UserInputError, match=key):
            config_from_dict({"train": {key: value}})


DDP_RUNNER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
from tests.engine.toys import SometimesEmpty, ToyPanoptic, tiny_config, toy_datasets
from detr_panoptic.engine.training import train

out = sys.argv[1]

def evaluate(model):
    # every rank after the last step: its weights and training-only branches, for the test
    torch.save({{"model": model.state_dict(), "training": model.training_state_dict()}},
               f"{{out}}/rank{{dist.get_rank()}}.pt")
    return {{"pq": 1.0}}

config = tiny_config(out, train={{"batch_size": 1, "max_steps": 3, "query_groups": 2, "denoising_groups": 2,
                                  "one_to_many_repeats": 2}})
train(config, datasets=(SometimesEmpty(8), ToyPanoptic(2), toy_datasets()[2]), evaluate=evaluate)
"""


@pytest.mark.slow
def test_two_ddp_processes_keep_the_branches_equal(tmp_path):
    """Each rank noises its own targets (one has an image without any): the gradients of the model and of
    the branches are averaged, so both ranks hold the same weights and branches after every step."""
    script = tmp_path / "runner.py"
    script.write_text(DDP_RUNNER.format(here=str(Path(__file__).resolve().parents[2])))
    out = tmp_path / "ddp"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert {k.split(".")[1] for k in ranks[0]["training"] if k.startswith("query_branches.")} == {"dn", "o2m"}
    for part in ("model", "training"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), key
    start = DenoisingQueries(3, TINY_MODEL["hidden_dim"], groups=2).state_dict()
    assert not torch.equal(ranks[0]["training"]["query_branches.dn.label_embed.weight"], start["label_embed.weight"])
