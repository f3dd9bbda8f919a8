"""Channels-last vs NCHW for the convolutional parts, in float32 and under bf16 autocast, side by side.

* the ResNet-50 backbone (``ResNetBackbone.features``: layer1..layer4, frozen batch norms folded) on one
  800x1600 image;
* the mask head's per-query decode (``MaskHeadSmallConv.decode``, what ``predict`` runs once per kept
  query) at the sizes of an 800x1600 image (memory 25x50, layer1 200x400), in three layouts: ``nchw``
  (inputs converted to NCHW), ``mixed`` (the backbone's channels-last features fed as they
  come, attention maps NCHW: what the head did before it converted them) and ``channels_last`` (the default).

Random weights; reps interleave the variants after one warm-up each, medians of wall and process CPU time.
Usage: python bench/bench_channels_last.py [--reps 3] [--queries 5]
Writes bench/results/bench_channels_last.json.
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

from detr_panoptic.models.backbone import ResNetBackbone
from detr_panoptic.models.mask_head import MaskHeadSmallConv
from detr_panoptic.utils.precision import autocast, hardware_summary

CL = torch.channels_last
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5, help="decodes per mask-head measurement")
    args = parser.parse_args()
    hardware = hardware_summary()
    print(json.dumps(hardware))
    torch.manual_seed(0)

    backbone = ResNetBackbone("resnet50").eval().requires_grad_(False)
    image = torch.randn(1, 3, 800, 1600)
    outputs = {}

    def run_backbone(channels_last: bool, dtype: str):
        def run():
            backbone.channels_last = channels_last
            with torch.inference_mode(), autocast("cpu", DTYPES[dtype]):
                outputs[(channels_last, dtype)] = [f.float() for f in backbone.features(image)]
        return run

    head = MaskHeadSmallConv(256, 8, [1024, 512, 256]).eval().requires_grad_(False)
    h, w = 25, 50
    projected = torch.randn(1, 256, h, w)
    fpns = [torch.randn(1, 1024, 2 * h, 2 * w), torch.randn(1, 512, 4 * h, 4 * w), torch.randn(1, 256, 8 * h, 8 * w)]
    attention = torch.randn(1, 8, h, w).softmax(1)
    one = torch.zeros(1, dtype=torch.long)

    def run_head(layout: str, dtype: str):
        def run():
            head.channels_last = layout == "channels_last"
            with torch.inference_mode(), autocast("cpu", DTYPES[dtype]):
                if layout == "mixed":  # the pre-conversion behaviour: prepare() on channels-last features as is
                    head.channels_last = False
                    w_context = head.lay1.weight[:, : head.context_dim]
                    context = torch.nn.functional.conv2d(projected.contiguous(memory_format=CL), w_context,
                                                         head.lay1.bias, padding=1)
                    laterals = [getattr(head, f"adapter{i}")(f.contiguous(memory_format=CL))
                                for i, f in enumerate(fpns, start=1)]
                else:
                    context, laterals = head.prepare(projected.contiguous(memory_format=CL),
                                                     [f.contiguous(memory_format=CL) for f in fpns])
                for _ in range(args.queries):
                    head.decode(context, attention, laterals, one)
        return run

    variants = {f"backbone_{'channels_last' if cl else 'nchw'}_{dt}": run_backbone(cl, dt)
                for dt in DTYPES for cl in (False, True)}
    variants.update({f"mask_head_{layout}_{dt}": run_head(layout, dt)
                     for dt in DTYPES for layout in ("nchw", "mixed", "channels_last")})
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for name, fn in variants.items():
            w_s, c_s = timed(fn)
            if rep:
                wall[name].append(w_s)
                cpu[name].append(c_s)
            print(f"rep {rep} {name:>30}: {w_s:.3f} s wall, {c_s:.3f} s CPU", flush=True)

    figures: dict[str, object] = {"cpu": hardware["cpu"], "cpu_bf16_native": hardware["cpu_bf16_native"],
                                  "mkldnn_bf16_supported": hardware["mkldnn_bf16_supported"],
                                  "threads": torch.get_num_threads(), "reps": args.reps}
    for name in variants:
        scale = 1 / args.queries if name.startswith("mask_head") else 1.0
        unit = "s_per_query" if name.startswith("mask_head") else "s"
        figures[f"{name}_{unit}"] = round(statistics.median(wall[name]) * scale, 4)
        figures[f"{name}_cpu_{unit}"] = round(statistics.median(cpu[name]) * scale, 4)
    for dt in DTYPES:
        figures[f"backbone_speedup_channels_last_{dt}"] = round(
            statistics.median(wall[f"backbone_nchw_{dt}"]) / statistics.median(wall[f"backbone_channels_last_{dt}"]), 2)
        figures[f"mask_head_speedup_nchw_vs_mixed_{dt}"] = round(
            statistics.median(wall[f"mask_head_mixed_{dt}"]) / statistics.median(wall[f"mask_head_nchw_{dt}"]), 2)
    figures["backbone_bf16_speedup_channels_last_vs_fp32_channels_last"] = round(
        statistics.median(wall["backbone_channels_last_fp32"]) / statistics.median(wall["backbone_channels_last_bf16"]), 2)
    reference = outputs[(False, "fp32")]
    figures["backbone_channels_last_max_relative_difference_fp32"] = max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs[(True, "fp32")], reference))
    figures["backbone_bf16_max_relative_difference"] = max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs[(True, "bf16")], reference))
    print(json.dumps(figures, indent=2))
    result = {
        "name": "bench_channels_last",
        "figures": figures,
        "command": "python " + " ".join(["bench/bench_channels_last.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": "ResNet-50 backbone (folded frozen BN) forward on one 800x1600 image and the mask head's "
                 "per-query decode at 800x1600 sizes, NCHW vs channels-last, fp32 vs bf16 autocast; random "
                 "weights; median over reps after a warm-up; 'mixed' = channels-last features with NCHW "
                 "attention maps (the head before it converted its inputs). The machine is shared by six "
                 "jobs on 2 cores: wall times are noisy, CPU times are given beside them.",
    }
    out = Path(__file__).resolve().parent / "results" / "bench_channels_last.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
