"""One training step of the full DETR-R50 panoptic model at 800x1600 with 30 target segments:
masks for the matched queries only (the default, ``train.matched_masks_only``) vs masks for all 100
queries (the reference's way). Both paths must give the same losses (checked, same weights, same
dropout masks); the figure is the median step time of each and their ratio (goal >= 3x).

A step = forward (Hungarian matching inside the forward for the matched path) + criterion + backward +
gradient clipping + AdamW step, with the recipe's default freezing (backbone frozen, lr 0). The optimizer
runs with lr 0 so that every repetition sees the same weights. Random weights, generated image and
targets (ellipses and rectangles of 19 Cityscapes-like classes).

A third, mask-free step measures the part both paths share (frozen backbone forward, transformer,
class and box losses), so the mask branch's own speedup can be reported beside the whole step's.

Precision and memory format, side by side in the same run: the matched path also runs under bf16
autocast (``train.amp: bf16``; losses in float32, as ``Trainer`` does) and with the conv parts NCHW
instead of channels-last (``--no-nchw`` skips that). The CPU model and its bf16 support are printed.

Usage: python bench/bench_train_step.py [--reps 3] [--height 800] [--width 1600] [--segments 30]
                                        [--queries 100] [--threads N] [--no-nchw]
Prints the figures and writes bench/results/bench_train_step.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import box_convert, masks_to_boxes

from detr_panoptic.engine.freezing import apply_freeze
from detr_panoptic.models.criterion import build_criterion
from detr_panoptic.models.detr import PanopticDETR
from detr_panoptic.models.matcher import QuerySelector
from detr_panoptic.utils.precision import autocast, hardware_summary

NUM_CLASSES = 19


def make_targets(height: int, width: int, segments: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(height)[:, None].float()
    xx = torch.arange(width)[None, :].float()
    masks = torch.zeros(segments, height, width, dtype=torch.bool)
    taken = torch.zeros(height, width, dtype=torch.bool)
    for k in range(segments):
        cy, cx = float(torch.rand(1, generator=g)) * height, float(torch.rand(1, generator=g)) * width
        ry = 20 + float(torch.rand(1, generator=g)) * height / 6
        rx = 20 + float(torch.rand(1, generator=g)) * width / 6
        shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 if k % 2 else \
            ((yy - cy).abs() < ry) & ((xx - cx).abs() < rx)
        masks[k] = shape & ~taken
        if not masks[k].any():
            masks[k, k, :10] = True
        taken |= masks[k]
    boxes = box_convert(masks_to_boxes(masks), "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
    return {"labels": torch.randint(0, NUM_CLASSES, (segments,), generator=g), "boxes": boxes, "masks": masks}


# variants of the matched path: name -> (autocast dtype, channels-last conv parts)
VARIANTS = {"matched": (None, True), "matched_bf16": (torch.bfloat16, True), "matched_nchw": (None, False),
            "all": (None, True), "shared": (None, True)}


def train_step(model, criterion, optimizer, image, mask, targets, *, path: str, seed: int
               ) -> tuple[tuple[float, float], dict[str, float]]:
    torch.manual_seed(seed)  # same dropout masks in both paths
    dtype, channels_last = VARIANTS[path]
    model.set_channels_last(backbone=channels_last, mask_head=channels_last)
    start, start_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    if path == "shared":  # no mask at all: the part both paths share (trunk, class and box losses)
        with autocast(image.device, dtype):
            outputs = model(image, mask, mask_queries=lambda out: [torch.empty(0, dtype=torch.long)] * len(targets))
        masks_flag, criterion.masks = criterion.masks, False
        losses = criterion(outputs, targets)
        criterion.masks = masks_flag
    else:
        selector = QuerySelector(criterion.matcher, targets) if path.startswith("matched") else None
        with autocast(image.device, dtype):
            outputs = model(image, mask, mask_queries=selector)
        matched = {"indices": selector.indices, "aux_indices": selector.aux_indices} if selector else {}
        losses = criterion(outputs, targets, **matched)
    total = criterion.weighted_total(losses)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    elapsed = (time.perf_counter() - start, time.process_time() - start_cpu)
    return elapsed, {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--segments", type=int, default=30)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-nchw", action="store_true", help="skip the NCHW variant of the matched path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hardware = hardware_summary()
    print(json.dumps(hardware), flush=True)

    torch.manual_seed(0)
    model = PanopticDETR(NUM_CLASSES, num_queries=args.queries, aux_loss=True)  # R50, official sizes
    model.train()
    report = apply_freeze(model, backbone=True)
    criterion = build_criterion(NUM_CLASSES, aux_loss=True, num_decoder_layers=6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=1e-4)
    image = torch.randn(1, 3, args.height, args.width)
    pad_mask = torch.zeros(1, args.height, args.width, dtype=torch.bool)
    targets = [make_targets(args.height, args.width, args.segments)]

    paths = ("matched", "matched_bf16", "all", "shared") if args.no_nchw else \
        ("matched", "matched_bf16", "matched_nchw", "all", "shared")
    times: dict[str, list[float]] = {p: [] for p in paths}
    cpu_times: dict[str, list[float]] = {p: [] for p in paths}
    losses: dict[str, dict[str, float]] = {}
    # warm-up rep (first-call allocations) of each path, then alternate so drift hits both equally
    for rep in range(args.reps + 1):
        for path in paths:
            (elapsed, cpu), values = train_step(model, criterion, optimizer, image, pad_mask, targets,
                                                path=path, seed=rep)
            print(f"rep {rep} {path:>7}: {elapsed:.2f} s wall, {cpu:.2f} s CPU  loss {values['loss']:.6f}", flush=True)
            if rep == 0:
                losses[path] = values
            else:
                times[path].append(elapsed)
                cpu_times[path].append(cpu)
    losses.pop("shared")

    def relative(a: str, b: str) -> float:
        return max(abs(losses[a][k] - losses[b][k]) / max(abs(losses[b][k]), 1e-12) for k in losses[b])

    worst = relative("matched", "all")
    bf16_difference = abs(losses["matched_bf16"]["loss"] - losses["matched"]["loss"]) / abs(losses["matched"]["loss"])
    bf16_worst_term = relative("matched_bf16", "matched")
    if worst > 1e-4:
        print(f"losses differ between the paths (max relative difference {worst:.2e}): {losses}", file=sys.stderr)
        return 1
    matched, full = statistics.median(times["matched"]), statistics.median(times["all"])
    matched_cpu, full_cpu = statistics.median(cpu_times["matched"]), statistics.median(cpu_times["all"])
    shared_cpu = statistics.median(cpu_times["shared"])
    bf16_s = statistics.median(times["matched_bf16"])
    figures = {
        "cpu": hardware["cpu"],
        "cpu_bf16_native": hardware["cpu_bf16_native"],
        "mkldnn_bf16_supported": hardware["mkldnn_bf16_supported"],
        "image_size": f"{args.width}x{args.height}",
        "segments": args.segments,
        "queries": args.queries,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "matched_only_s": round(matched, 3),
        "all_queries_s": round(full, 3),
        "speedup": round(full / matched, 2),
        "matched_only_bf16_s": round(bf16_s, 3),
        "matched_only_bf16_cpu_s": round(statistics.median(cpu_times["matched_bf16"]), 3),
        "speedup_bf16_vs_fp32": round(matched / bf16_s, 2),
        "bf16_relative_loss_difference": bf16_difference,
        "bf16_max_relative_term_difference": bf16_worst_term,
        "matched_only_cpu_s": round(matched_cpu, 3),
        "all_queries_cpu_s": round(full_cpu, 3),
        "speedup_cpu_time": round(full_cpu / matched_cpu, 2),
        "shared_part_cpu_s": round(shared_cpu, 3),
        "mask_branch_speedup_cpu_time": round((full_cpu - shared_cpu) / max(matched_cpu - shared_cpu, 1e-9), 2),
        "loss": round(losses["matched"]["loss"], 6),
        "max_relative_loss_difference": worst,
        **({"matched_only_nchw_s": round(statistics.median(times["matched_nchw"]), 3),
            "speedup_channels_last": round(statistics.median(times["matched_nchw"]) / matched, 2),
            "nchw_max_relative_loss_difference": relative("matched_nchw", "matched")}
           if "matched_nchw" in times else {}),
        "trainable_parameters": report.trainable,
    }
    print(json.dumps(figures, indent=2))
    result = {
        "name": "bench_train_step",
        "figures": figures,
        "command": "python " + " ".join(["bench/bench_train_step.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "notes": "median wall time of one training step (forward, criterion, backward, clip, AdamW) of "
                 "DETR-R50 panoptic (random weights, backbone frozen, aux losses) on one image; 'matched' = "
                 "fp32, conv parts channels-last (the default); '_bf16' = the same under bf16 autocast "
                 "(losses in fp32); '_nchw' = conv parts NCHW; matched-only "
                 "masks vs all queries; losses checked equal (same weights, same dropout masks); 'shared' = "
                 "the same step without any mask (backbone, transformer, class/box losses), which both paths "
                 "pay, so the whole-step ratio is bounded by (shared + all masks) / (shared + matched masks); "
                 "goal >= 3x; reps alternate between the paths after one warm-up rep each; process CPU "
                 "time is reported beside wall time because the machine is shared (load 5-8 on 2 cores)",
    }
    out = Path(__file__).resolve().parent / "results" / "bench_train_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
