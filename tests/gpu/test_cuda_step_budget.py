"""The training step's host syncs (``torch.cuda.set_sync_debug_mode``) against a budget, peak GPU memory at
batch 2, 800x1333, with and without query groups against absolute budgets, and an exact-to-rounding resume
on CUDA. Figures go to ``$GPU_FIGURES`` (a JSON file, set by bench/gpu.sh) when set."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from tests.gpu.common import make_trainer, tiny_model, toy_batch

# Per optimizer step, one micro-batch: the matching costs to the host (1, all layers and groups at once) and
# the logged losses (1); one spare for what the CUDA caching allocator or a library may add.
SYNC_BUDGET = 3
# Peak memory of one training step of the full model (R50, 100 queries, aux losses, stage-2 freezing) at
# batch 2, 800x1333, 30 segments per image: must fit a 16 GiB GPU without query groups, 24 GiB with 3.
MEMORY_BUDGET_GIB = {1: 14.0, 3: 22.0}


def record(key: str, value) -> None:
    path = os.environ.get("GPU_FIGURES")
    if not path:
        return
    figures = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    figures[key] = value
    with open(path, "w") as file:
        json.dump(figures, file, indent=2)


def count_syncs(function) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs:
        print(f"sync: {w.filename}:{w.lineno}: {w.message}")
    return len(syncs)


@pytest.mark.parametrize("groups", [1, 3])
def test_host_syncs_per_step_within_budget(cuda, groups):
    model = tiny_model().enable_query_groups(groups) if groups > 1 else tiny_model()
    trainer = make_trainer(model, cuda)
    batch = toy_batch(2)
    images, targets = batch
    batch = ([i.pin_memory() for i in images], [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                                 for k, v in t.items()} for t in targets])
    trainer.step([batch])  # warm-up: lazy initialisations sync once
    syncs = count_syncs(lambda: trainer.step([batch]))
    record(f"syncs_per_step_groups{groups}", syncs)
    assert syncs <= SYNC_BUDGET


def _full_step_peak(cuda, groups: int) -> float:
    from bench.bench_train_step import make_targets
    from bench.gpu_recipe import recipe_parts

    from detr_panoptic.models.matcher import QuerySelector

    torch.cuda.empty_cache()
    model, criterion, optimizer = recipe_parts(cuda, seed=0)
    if groups > 1:
        model.enable_query_groups(groups)
        optimizer.add_param_group({"params": [model.group_query_embed]})
    height, width = 800, 1333
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1)).to(cuda)
    mask = torch.zeros(2, height, width, dtype=torch.bool, device=cuda)
    targets = [{k: v.to(cuda) for k, v in make_targets(height, width, 30, seed=s).items()} for s in (0, 1)]
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    optimizer.zero_grad(set_to_none=True)
    selector = QuerySelector(criterion.matcher, targets)
    outputs = model(images, mask, mask_queries=selector)
    losses = criterion(outputs, targets, indices=selector.indices, aux_indices=selector.aux_indices)
    criterion.weighted_total(losses).backward()
    optimizer.step()
    torch.cuda.synchronize(cuda)
    peak = torch.cuda.max_memory_allocated(cuda) / 2**30
    del model, criterion, optimizer, outputs, losses
    return peak


@pytest.mark.parametrize("groups", [1, 3])
def test_peak_memory_at_batch_2_800x1333(cuda, groups):
    peak = _full_step_peak(cuda, groups)
    print(f"\npeak GPU memory, batch 2, 800x1333, {groups} query group(s): {peak:.2f} GiB")
    record(f"peak_gib_batch2_800x1333_groups{groups}", round(peak, 3))
    assert peak < MEMORY_BUDGET_GIB[groups]


def test_resume_on_cuda_continues_the_run(tmp_path, strict_fp32):
    """``train_stage`` on CUDA stopped after step 2 and resumed ends where the uninterrupted run ends (to
    float rounding: cuDNN's backward may sum in another order), query groups included."""
    from detr_panoptic.engine import training
    from detr_panoptic.engine.trainer import Hook
    from tests.engine.toys import tiny_config, toy_datasets

    def config(out):
        return tiny_config(out, train={"device": "cuda", "query_groups": 2, "max_steps": 4,
                                       "checkpoint_every_steps": 1})

    training.train_stage(config(tmp_path / "straight"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})

    class Stop(Exception):
        pass

    class StopAfterStep2(Hook):
        def after_step(self, trainer, record):
            if trainer.state.step == 2:
                raise Stop

    real = training.build_hooks
    training.build_hooks = lambda *a, **k: [*real(*a, **k), StopAfterStep2()]
    try:
        with pytest.raises(Stop):
            training.train_stage(config(tmp_path / "resumed"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})
    finally:
        training.build_hooks = real
    training.train_stage(config(tmp_path / "resumed"), datasets=toy_datasets(), evaluate=lambda m: {"pq": 1.0})
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pth", weights_only=True)
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.pth", weights_only=True)
    assert final["step"] == expected["step"] == 4
    for key, value in [*expected["model"].items(), *expected["training_state"].items()]:
        got = final["model"].get(key, final["training_state"].get(key))
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=key)
