"""The Cityscapes recipe's training step on a CUDA GPU: step time, images/s and peak GPU memory.

DETR-R50 panoptic (19 classes, 100 queries, aux losses), one 800x1600 image (batch 1, as the recipe), 30
generated target segments (``bench_train_step.make_targets``), stage 2's freezing (backbone and
attention frozen: the stage where most of the model trains) and its AdamW; for each of masks of the
matched queries only (``train.matched_masks_only``, the default) and masks of all 100 queries (the
reference), in fp32 and under bf16 / fp16 autocast (fp16 with a ``GradScaler``, as ``Trainer`` does).
Random weights. Each variant: one warm-up step, then ``--reps`` timed steps (``torch.cuda.synchronize``
around each); peak memory = ``torch.cuda.max_memory_allocated`` over that variant's steps.

Not a ``bench_*.py`` script: ``run_all.py`` runs on CPU machines; ``bench/gpu.sh`` runs this one.
Usage: python bench/gpu_recipe.py [--reps 5] [--json PATH]   (needs CUDA; exits 2 without it)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
NUM_CLASSES = 19


def _make_targets():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_targets


def recipe_parts(device: torch.device, *, queries: int = 100, seed: int = 0):
    """Model (on ``device``, train mode, stage-2 freezing), criterion and AdamW of the recipe."""
    from detr_panoptic.engine.freezing import apply_freeze
    from detr_panoptic.models.criterion import build_criterion
    from detr_panoptic.models.detr import PanopticDETR

    torch.manual_seed(seed)
    model = PanopticDETR(NUM_CLASSES, num_queries=queries, aux_loss=True).to(device).train()
    apply_freeze(model, backbone=True, attention=True)
    criterion = build_criterion(NUM_CLASSES, aux_loss=True, num_decoder_layers=6).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    return model, criterion, optimizer


def recipe_inputs(device: torch.device, height: int = 800, width: int = 1600, segments: int = 30):
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.zeros(1, height, width, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in _make_targets()(height, width, segments).items()}]
    return image, mask, targets


def recipe_step(model, criterion, optimizer, image, mask, targets, *, matched_only: bool,
                dtype: torch.dtype | None = None, scaler=None) -> dict[str, float]:
    """One optimizer step as ``engine.trainer.Trainer.step`` runs it; returns the losses."""
    from detr_panoptic.models.matcher import QuerySelector
    from detr_panoptic.utils.precision import autocast

    optimizer.zero_grad(set_to_none=True)
    selector = QuerySelector(criterion.matcher, targets) if matched_only else None
    with autocast(image.device, dtype):
        outputs = model(image, mask, mask_queries=selector)
    matched = {"indices": selector.indices, "aux_indices": selector.aux_indices} if selector is not None else {}
    losses = criterion(outputs, targets, **matched)
    total = criterion.weighted_total(losses)
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def measure(device: torch.device, *, matched_only: bool, dtype: torch.dtype | None, reps: int) -> dict:
    """Median step time and peak memory of one variant, in a fresh model (same seed for all variants)."""
    torch.cuda.empty_cache()
    model, criterion, optimizer = recipe_parts(device)
    image, mask, targets = recipe_inputs(device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for rep in range(reps + 1):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        values = recipe_step(model, criterion, optimizer, image, mask, targets, matched_only=matched_only,
                             dtype=dtype, scaler=scaler)
        torch.cuda.synchronize(device)
        if rep:
            times.append(time.perf_counter() - start)
        losses.append(values["loss"])
    step = statistics.median(times)
    result = {"step_s": round(step, 4), "images_per_s": round(1 / step, 2),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
              "first_loss": round(losses[0], 5), "finite": all(math.isfinite(v) for v in losses)}
    del model, criterion, optimizer
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to measure (run this on a machine with a GPU)", file=sys.stderr)
        return 2
    from detr_panoptic.utils.precision import hardware_summary

    device = torch.device("cuda", 0)
    hardware = hardware_summary()
    print(json.dumps(hardware), flush=True)
    precisions = {"fp32": None, "fp16": torch.float16}
    if torch.cuda.is_bf16_supported(including_emulation=False):
        precisions = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    figures: dict[str, object] = {"gpu": hardware["cuda"], "torch": torch.__version__,
                                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                                  "tf32_cudnn": torch.backends.cudnn.allow_tf32, "reps": args.reps}
    for name, dtype in precisions.items():
        for matched_only in (True, False):
            key = f"{'matched_only' if matched_only else 'all_queries'}_{name}"
            figures[key] = measure(device, matched_only=matched_only, dtype=dtype, reps=args.reps)
            print(f"{key:>22}: {figures[key]}", flush=True)
    fp32 = figures["matched_only_fp32"], figures["all_queries_fp32"]
    figures["all_queries_vs_matched_memory_ratio_fp32"] = round(fp32[1]["peak_memory_gib"] / fp32[0]["peak_memory_gib"], 2)
    figures["all_queries_vs_matched_time_ratio_fp32"] = round(fp32[1]["step_s"] / fp32[0]["step_s"], 2)
    result = {"name": "gpu_recipe", "figures": figures,
              "command": "python " + " ".join(["bench/gpu_recipe.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "notes": "Cityscapes recipe step (DETR-R50, 800x1600, batch 1, 30 segments, stage-2 freezing, AdamW, "
                       "clip 0.1) on one GPU; median of reps after one warm-up; peak = max_memory_allocated; "
                       "fp32 with PyTorch's default TF32 settings (printed)"}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = [k for k, v in figures.items() if isinstance(v, dict) and not v["finite"]]
    if bad:
        print(f"non-finite losses: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
