"""``detr-panoptic demo``: the whole system on generated data (synthetic Cityscapes), no download."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_panoptic.commands.common import add_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate synthetic Cityscapes, fine-tune the packaged start point in two stages, measure PQ, "
        "calibrate, draw the report",
        description="The demo: a synthetic Cityscapes tree converted to COCO panoptic; a start point (the "
        "packaged source-domain model, pre-trained on synthetic scenes with a COCO-style label set; --init a "
        "real checkpoint; --pretrain a pre-training in this run); the recipe's two fine-tuning stages "
        "(transformer frozen, then attention frozen); PQ, mIoU and AP on the synthetic val split after each; "
        "the final model's post-processing calibrated on train images; predictions, overlays, attention maps, curves and "
        "an HTML report. Re-running with the same settings reuses finished phases.")
    parser.add_argument("--out", "-o", default=None,
                        help="output folder (default: runs/demo, or runs/demo_quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version in about a minute (the shipped config demo_quick): checks the plumbing")
    parser.add_argument("--init", default=None, metavar="PATH_OR_ALIAS",
                        help="start from this checkpoint (file, URL, Hugging Face folder or alias such as "
                        "coco-r50-panoptic) instead of the synthetic source-domain pre-training; with "
                        "--pretrain-only, continue the pre-training from it (a packaged start point's name such "
                        "as demo_start_point.safetensors, or any of those)")
    parser.add_argument("--config", default=None,
                        help="demo config: a YAML file or a shipped config's name (default: demo; demo_quick "
                        "with --quick)")
    parser.add_argument("--pretrain", action="store_true",
                        help="pre-train the source model in this run (as --pretrain-only does, about two hours on "
                        "one core with the default config) instead of starting from the packaged start point")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="only generate the source domain and pre-train on it: writes <out>/source_model.pth "
                        "and <out>/source_model.safetensors (fp16), the format of the demo's packaged start point")
    add_device(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: 0)")
    parser.add_argument("--bench-json", default=None, metavar="PATH",
                        help="also write the timing and PQ figures as a benchmark result (bench/results/demo.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from detr_panoptic.demo import pq_table, run_demo

    out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    summary = run_demo(out, quick=args.quick, init=args.init, device=args.device, seed=args.seed,
                       config_path=args.config, pretrain=args.pretrain,
                       pretrain_only=args.pretrain_only)
    if args.pretrain_only:
        source = summary.get("source_domain") or {}
        print(f"\ndetr-panoptic demo --pretrain-only: done in {summary['seconds']['total']:.0f} s; source val PQ "
              f"{source.get('pq', float('nan')):.1f} (things {source.get('pq_things', float('nan')):.1f}, stuff "
              f"{source.get('pq_stuff', float('nan')):.1f})")
        print(f"  source model  {out}/source_model.pth, {summary['source_model']} (fp16)")
        return 0
    seconds = summary["seconds"]
    print(f"\ndetr-panoptic demo: done in {seconds['total']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})")
    print(f"\nPQ, mIoU and AP (Cityscapes' benchmarks) on the synthetic Cityscapes val split "
          f"({summary['settings']['val_images']} images):\n")
    print(pq_table(summary))
    if summary.get("source_domain"):
        print(f"\n(source-domain model on its own val images: PQ {summary['source_domain'].get('pq', 0):.1f})")
    print(f"\n  report        {out}/report.html")
    print(f"  metrics       {out}/metrics.json")
    print(f"  final model   {summary['checkpoint']}")
    source_model = Path(out) / "source_model.pth"
    pretrained_here = source_model.is_file() and not args.init
    print(f"  start point   {f'{source_model} (official format)' if pretrained_here else summary['init']}")
    print(f"  runs          {out}/pretrain, {out}/stage1, {out}/stage2 (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"  predictions   {out}/eval/<start|stage1|stage2>/ (COCO panoptic PNG + JSON, metrics.json)")
    print(f"  pictures      {out}/summary/ (overlays/, attention/, plots/)")
    if args.bench_json:
        from detr_panoptic.demo import bench_record
        from detr_panoptic.utils.io import atomic_write_json

        atomic_write_json(args.bench_json, bench_record(summary, command="detr-panoptic " + " ".join(sys.argv[1:])))
        print(f"  benchmark     {args.bench_json}")
    return 0
