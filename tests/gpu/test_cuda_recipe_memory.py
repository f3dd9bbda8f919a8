"""Peak GPU memory of one step of the Cityscapes recipe (R50, 800x1600, batch 1): masks of the matched
queries only need less than masks of all 100 queries, and both give the same losses."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("gpu_recipe", BENCH / "gpu_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_step(recipe, device, matched_only: bool):
    torch.cuda.empty_cache()
    model, criterion, optimizer = recipe.recipe_parts(device, seed=0)
    model.detr.transformer.eval()  # dropout off: both paths then see the same computation
    image, mask, targets = recipe.recipe_inputs(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    losses = recipe.recipe_step(model, criterion, optimizer, image, mask, targets, matched_only=matched_only)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, criterion, optimizer
    return losses, peak


def test_matched_only_masks_need_less_memory_than_all_queries(recipe, cuda, strict_fp32):
    matched, matched_peak = _peak_step(recipe, cuda, True)
    full, full_peak = _peak_step(recipe, cuda, False)
    print(f"\npeak GPU memory, one recipe step: matched-only {matched_peak / 2**30:.2f} GiB, "
          f"all queries {full_peak / 2**30:.2f} GiB")
    assert all(math.isfinite(v) for v in matched.values())
    for key in full:
        assert matched[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    assert matched_peak < full_peak
