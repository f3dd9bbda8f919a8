"""``detr-panoptic train CONFIG``: fine-tune; every stage of a chained config runs in order.

Distributed: ``torchrun --nproc_per_node N -m detr_panoptic.cli train CONFIG`` (or the
``detr-panoptic`` script path in place of ``-m detr_panoptic.cli``).
"""
from __future__ import annotations

import argparse
import os
import sys

from detr_panoptic.commands.common import add_config
from detr_panoptic.config import load_config
from detr_panoptic.utils.logging import process_rank


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model (every stage of a chained config, in order)",
        description="Fine-tune DETR panoptic per a YAML config, a file or a shipped config's name (the "
        "Cityscapes recipe: cityscapes/recipe_two_stages; detr-panoptic config --list). Resumes from "
        "<output_dir>/checkpoints/last.pth when it exists (train.resume). Multi-GPU/CPU: launch with "
        "torchrun --nproc_per_node N.")
    add_config(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: train.device)")
    parser.add_argument("--workers", "-j", type=int, default=None,
                        help="data-loading worker processes per training process (default: data.workers)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from detr_panoptic.engine.trainer import TrainingDiverged
    from detr_panoptic.engine.training import train

    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    config = load_config(args.config, overrides)
    for stage in config.resolve_stages():
        check_output_dir(stage.train.output_dir, what=f"{args.config} ({stage.name}): train.output_dir")
    try:
        results = train(config)
    except TrainingDiverged as exc:
        print(f"detr-panoptic train: error: {exc}", file=sys.stderr)
        return 1
    if process_rank() == 0:
        for result in results:
            best = f"best PQ {result.best_pq:.2f}" if result.best_pq >= 0 else "no validation"
            print(f"{result.name}: outputs in {result.output_dir} ({best}; checkpoints {result.best_checkpoint.name}, "
                  f"{result.last_checkpoint.name} in {result.last_checkpoint.parent}; metrics "
                  f"{result.output_dir / 'metrics.jsonl'})")
    return 0


def check_output_dir(output_dir: str | os.PathLike, *, what: str = "train.output_dir") -> None:
    """Fail before any work when ``output_dir`` cannot be created or written (creates nothing)."""
    from detr_panoptic.utils.io import check_writable_folder

    check_writable_folder(output_dir, what=what)
